"""Templates made from this host's configuration: `vmrun template create/list`, and the
template a new sandbox clones (built on first use when it is missing or stale)."""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from dataclasses import dataclass

from vmrun.bootfiles import BootFiles, boot_files
from vmrun.config import Config
from vmrun.errors import VmrunError
from vmrun.hypervisor.accel import Acceleration, detect_acceleration
from vmrun.hypervisor.templates import Template, TemplateDefinition, TemplateStore, fingerprint

log = logging.getLogger("vmrun.templating")


def _build(config: Config, store: TemplateStore, definition: TemplateDefinition, expected: dict,
           files: BootFiles, acceleration: Acceleration) -> Template:
    """Build `definition` now (the caller holds its build lock)."""
    work_dir = config.run_dir / f"template-{definition.name}"
    shutil.rmtree(work_dir, ignore_errors=True)
    work_dir.mkdir(parents=True, mode=0o700)
    try:
        return store.create(definition, expected, work_dir, qemu=config.qemu, acceleration=acceleration,
                            files=files)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


def create_template(config: Config, name: str) -> tuple[Template, float]:
    """Build (or rebuild) the template `name`."""
    definition = TemplateDefinition.load(name)
    files = boot_files(config)
    acceleration = detect_acceleration(config.acceleration, config.run_dir)
    expected = fingerprint(definition, config.qemu, files, acceleration)
    store = TemplateStore(config.templates_dir)
    started = time.monotonic()
    with store.building(name):
        template = _build(config, store, definition, expected, files, acceleration)
    return template, time.monotonic() - started


@dataclass
class TemplateLease:
    """A template a clone may copy; it is not replaced or removed until `release()`."""

    template: Template
    definition: TemplateDefinition
    _hold: contextlib.ExitStack

    def release(self) -> None:
        self._hold.close()


def lease_template(config: Config, files: BootFiles, acceleration: Acceleration) -> TemplateLease | None:
    """The configured template, held for copying; built first if it is missing or stale.

    None when templating is off, or when the template cannot be built (then the sandbox
    boots, and the warning says why)."""
    if not config.template:
        return None
    definition = TemplateDefinition.load(config.template)
    expected = fingerprint(definition, config.qemu, files, acceleration)
    store = TemplateStore(config.templates_dir)
    lease, reason = _hold_if_usable(store, definition, expected)
    if lease is not None:
        return lease
    with store.building(definition.name):
        # Another sandbox may have built it while we waited for the build lock.
        template = store.get(definition.name)
        if template is None or template.why_unusable(expected):
            log.info("building template %r (%s)", definition.name, reason)
            try:
                _build(config, store, definition, expected, files, acceleration)
            except VmrunError as exc:
                log.warning("cannot build template %r (%s): booting instead", definition.name, exc)
                return None
    lease, reason = _hold_if_usable(store, definition, expected)
    if lease is None:
        log.warning("template %r is still unusable (%s): booting", definition.name, reason)
    return lease


def _hold_if_usable(store: TemplateStore, definition: TemplateDefinition,
                    expected: dict) -> tuple[TemplateLease | None, str]:
    """The template, held, if clones may restore it; else None and why not."""
    hold = contextlib.ExitStack()
    hold.enter_context(store.in_use(definition.name))
    template = store.get(definition.name)
    reason = template.why_unusable(expected) if template else "it does not exist"
    if template is None or reason:
        hold.close()
        return None, reason
    return TemplateLease(template, definition, hold), ""


def describe_templates(config: Config) -> list[str]:
    """One line per saved template: its name, and whether clones may restore it."""
    store = TemplateStore(config.templates_dir)
    files = boot_files(config)
    acceleration = detect_acceleration(config.acceleration, config.run_dir)
    lines = []
    for template in store.list():
        name = template.path.name
        try:
            definition = TemplateDefinition.load(name)
            reason = template.why_unusable(fingerprint(definition, config.qemu, files, acceleration))
        except Exception as exc:  # noqa: BLE001 - a listing reports, it does not fail
            reason = str(exc)
        try:
            created = str(template.record().get("created", "?"))
        except (OSError, ValueError, AttributeError):
            created = "?"  # a damaged record: why_unusable said so
        lines.append(f"{name:<16}{'usable' if not reason else 'stale: ' + reason:<60}{created}")
    return lines

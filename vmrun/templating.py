"""`vmrun template create/list`: templates made from this host's configuration."""

from __future__ import annotations

import shutil
import time

from vmrun.config import Config
from vmrun.hypervisor.accel import detect_acceleration
from vmrun.hypervisor.templates import Template, TemplateDefinition, TemplateStore, fingerprint
from vmrun.sandbox import boot_files


def create_template(config: Config, name: str) -> tuple[Template, float]:
    definition = TemplateDefinition.load(name)
    files = boot_files(config)
    acceleration = detect_acceleration(config.acceleration, config.run_dir)
    expected = fingerprint(definition, config.qemu, files.kernel, files.initrd, acceleration)
    work_dir = config.run_dir / f"template-{name}"
    shutil.rmtree(work_dir, ignore_errors=True)
    work_dir.mkdir(parents=True)
    started = time.monotonic()
    try:
        template = TemplateStore(config.templates_dir).create(
            definition, expected, work_dir, qemu=config.qemu, acceleration=acceleration,
            kernel=files.kernel, initrd=files.initrd)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    return template, time.monotonic() - started


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
            reason = template.usable_for(fingerprint(definition, config.qemu, files.kernel, files.initrd,
                                                     acceleration))
        except Exception as exc:  # noqa: BLE001 - a listing reports, it does not fail
            reason = str(exc)
        created = template.record().get("created", "?")
        lines.append(f"{name:<16}{'usable' if not reason else 'stale: ' + reason:<60}{created}")
    return lines

"""Specs as callers write them: any 1.x version runc takes runs (crun in the guest reads
1.0.x/1.1.0 only), and kernel memory limits runc ignores do not stop a container."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.integration


def test_specs_of_every_1x_version_run(vm_env):
    vm_env.use_templates()  # one guest boot for the template, a clone for each version
    for version in ("1.0.2", "1.1.0", "1.2.1", "1.3.0"):
        name = "v" + version.replace(".", "")
        bundle = vm_env.bundle(name, ["echo", f"spec {version} ran"])
        spec = json.loads((bundle / "config.json").read_text())
        spec["ociVersion"] = version
        (bundle / "config.json").write_text(json.dumps(spec))
        result = vm_env.vmrun("run", "--bundle", str(bundle), name)
        assert (result.returncode, result.stdout) == (0, f"spec {version} ran\n".encode()), result.stderr


def test_kernel_memory_limits_are_ignored_with_a_warning(vm_env):
    vm_env.use_templates()
    bundle = vm_env.bundle("kmem", ["echo", "ran"])
    spec = json.loads((bundle / "config.json").read_text())
    spec["linux"]["resources"]["memory"] = {"limit": 256 << 20, "kernel": 64 << 20, "kernelTCP": 16 << 20}
    (bundle / "config.json").write_text(json.dumps(spec))
    result = vm_env.vmrun("run", "--bundle", str(bundle), "kmem")
    assert (result.returncode, result.stdout) == (0, b"ran\n"), result.stderr
    assert b"kernel memory" in result.stderr

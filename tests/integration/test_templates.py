"""VM templating with virtio-fs: template create/list/rm, clones, staleness, independence."""

from __future__ import annotations

import hashlib
import json
import mmap
import secrets
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from leftovers import clone_memory_of

from vmrun.hypervisor.accel import detect_acceleration


pytestmark = pytest.mark.integration


@pytest.fixture
def templated(vm_env):
    """vm_env with templating on and the default template made."""
    vm_env.use_templates()
    created = vm_env.vmrun("template", "create")
    assert created.returncode == 0, created.stderr
    return vm_env


def test_the_first_sandbox_builds_the_missing_template(vm_env):
    vm_env.use_templates()
    assert vm_env.vmrun("template", "list").stdout == b""
    bundle = vm_env.bundle("first", ["echo", "first-ok"])
    result = vm_env.vmrun("--debug", "run", "--bundle", str(bundle), "first")
    assert result.returncode == 0 and result.stdout == b"first-ok\n", result.stderr
    assert b"building template 'default' (it does not exist)" in result.stderr
    assert b"cloned first from template default" in result.stderr
    assert vm_env.vmrun("template", "list").stdout.split()[:2] == [b"default", b"usable"]


def digest(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def test_clone_reads_the_hosts_file_and_leaves_the_template_untouched(templated):
    template_memory = templated.base / "templates" / "default" / "memory"
    before = digest(template_memory)
    listing = templated.vmrun("template", "list")
    assert listing.stdout.split()[:2] == [b"default", b"usable"]
    bundle = templated.bundle("clone", ["sh", "-c", "cat /hostfile; echo scribble > /dev/shm/mark; uname -r"])
    (bundle / "rootfs" / "hostfile").write_text("written by the host\n")
    result = templated.vmrun("--debug", "run", "--bundle", str(bundle), "clone")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(b"written by the host\n")
    assert b"cloned clone from template default" in result.stderr
    # The clone wrote into its own copy of the RAM: the template's is as it was.
    assert digest(template_memory) == before


def test_five_concurrent_clones(templated):
    bundle = templated.bundle("many", ["sh", "-c", "echo clone-ok"])

    def one(i: int) -> subprocess.CompletedProcess:
        return templated.vmrun("--debug", "run", "--bundle", str(bundle), f"many{i}")

    with ThreadPoolExecutor(5) as pool:
        results = list(pool.map(one, range(5)))
    for result in results:
        assert result.returncode == 0, result.stderr
        assert result.stdout == b"clone-ok\n" and b"from template default" in result.stderr


def test_a_stale_template_is_rebuilt_before_it_is_cloned(templated):
    record_path = templated.base / "templates" / "default" / "record.json"
    record = json.loads(record_path.read_text())
    record["fingerprint"]["kernel"] = "/boot/some-other-kernel:1:1"
    record_path.write_text(json.dumps(record))
    assert b"stale: it was built from another kernel" in templated.vmrun("template", "list").stdout
    bundle = templated.bundle("stale", ["echo", "cloned"])
    result = templated.vmrun("--debug", "run", "--bundle", str(bundle), "stale")
    assert result.returncode == 0 and result.stdout == b"cloned\n", result.stderr
    assert b"building template 'default' (it was built from another kernel)" in result.stderr
    assert b"cloned stale from template default" in result.stderr
    assert templated.vmrun("template", "list").stdout.split()[:2] == [b"default", b"usable"]


def test_template_rm(templated):
    assert templated.vmrun("template", "rm", "default").returncode == 0
    assert templated.vmrun("template", "list").stdout == b""
    again = templated.vmrun("template", "rm", "default")
    assert again.returncode == 1 and b"does not exist" in again.stderr
    assert not (templated.base / "templates" / "default").exists()


def test_a_clones_clock_goes_on_from_its_templates(vm_env):
    """Under TCG guests keep time with the TSC (not the HPET, an emulated device); a clone's
    TSC continues from where its template stopped instead of jumping by the time the
    template lay saved (a jump of minutes would overflow the kernel's clock arithmetic)."""
    vm_env.use_templates()
    started = time.monotonic()
    assert vm_env.vmrun("template", "create").returncode == 0
    creating = time.monotonic() - started
    time.sleep(8)  # the template lies saved: a clock that ran on would count this too
    bundle = vm_env.bundle("clock", ["cat", "/sys/devices/system/clocksource/clocksource0/current_clocksource",
                                     "/proc/uptime"])
    started = time.monotonic()
    result = vm_env.vmrun("run", "--bundle", str(bundle), "clock")
    running = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    clocksource, uptime = result.stdout.decode().split("\n")[:2]
    translated = detect_acceleration(vm_env.config().acceleration, vm_env.config().run_dir).translates
    assert clocksource == ("tsc" if translated else "kvm-clock")
    # The guest lived while the template was made and while the clone ran, not in between.
    assert float(uptime.split()[0]) < creating + running


def test_clones_draw_different_random_bytes(templated):
    # Each clone starts from the template's RNG state; the agent reseeds it with host entropy.
    bundle = templated.bundle("rng", ["sh", "-c", "head -c 16 /dev/urandom | od -An -tx1"])
    outputs = [templated.vmrun("run", "--bundle", str(bundle), f"rng{i}").stdout for i in range(2)]
    assert len(outputs[0].split()) == 16 and outputs[0] != outputs[1]


def test_a_write_in_one_clones_memory_is_not_in_the_next(templated):
    token = secrets.token_hex(16)
    written = token[::-1]  # what the guest writes; the spec (also in guest memory) has only `token`

    def start(name: str, script: str) -> subprocess.Popen:
        bundle = templated.bundle(name, ["sh", "-c", script])
        process = templated.popen("run", "--bundle", str(bundle), name, stdin=subprocess.DEVNULL,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert process.stdout.readline() == b"up\n", process.stderr.read()
        return process

    def in_memory_of(name: str, data: bytes) -> bool:
        vm_dir = Path(json.loads((templated.root / name / "state.json").read_text())["vm_dir"])
        with open(clone_memory_of(vm_dir), "rb") as ram, mmap.mmap(ram.fileno(), 0, prot=mmap.PROT_READ) as view:
            return view.find(data) != -1

    first = start("first", f"echo {token} | rev > /dev/shm/x; echo up; sleep 600")
    try:
        second = start("second", "echo up; sleep 600")
        try:
            # The write is in the first clone's RAM (so the check below can fail), not the second's.
            assert in_memory_of("first", written.encode())
            assert not in_memory_of("second", written.encode())
        finally:
            templated.vmrun("kill", "second", "KILL")
            second.wait(60)
    finally:
        templated.vmrun("kill", "first", "KILL")
        first.wait(60)

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from guest.image_cache import find_image
from leftovers import vmrun_host_footprint
from vmrun.config import Config


def pytest_collection_modifyitems(config, items):
    # Integration tests boot guests: run the quick unit tests first.
    items.sort(key=lambda item: "integration" in item.keywords)


@pytest.fixture(scope="session")
def guest_image():
    """The built guest image every test that boots a guest needs."""
    image = find_image(Config().image_dir)
    if image is None:
        pytest.fail("no guest image: run `vmrun image build` (scripts/setup.sh does)")
    return image


@pytest.fixture(scope="session")
def vm_templates_dir():
    """A templates_dir for the session's client tests: their sandboxes clone the default
    template (templating is on by default), which the first of them builds."""
    path = Path(tempfile.mkdtemp(prefix="vmrun-templates-", dir="/var/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _cgroup_dirs() -> set[Path]:
    """Every cgroup directory on the host (all hierarchies under /sys/fs/cgroup)."""
    found: set[Path] = set()
    for root in Path("/sys/fs/cgroup").iterdir() if Path("/sys/fs/cgroup").is_dir() else ():
        if root.is_dir() and (root / "cgroup.procs").exists():
            found.update(p for p in root.rglob("*") if p.is_dir() and (p / "cgroup.procs").exists())
    return found


@pytest.fixture(scope="session", autouse=True)
def host_cgroups_left_as_found():
    """The pods the tests start make their host cgroups (linux.cgroupsPath, as callers name
    them: /docker/<id>, /k8s.io/<id>, ...); vmrun removes each pod's own, and leaves the
    parents it had to make, as runc does. Those the session made, and left empty, go."""
    before = _cgroup_dirs()
    yield
    for made in sorted(_cgroup_dirs() - before, key=lambda p: len(p.parts), reverse=True):
        try:
            made.rmdir()
        except OSError:
            pass  # not empty: something still runs there, and the tests' own checks say so


@pytest.fixture(scope="session", autouse=True)
def nothing_of_vmrun_left_on_the_host():
    """After the whole session, no process, mount, network namespace, host link or
    virtiofsd pid file of vmrun's is left that was not there before it. Sessions run side
    by side see each other's: VMRUN_TEST_SHARED_HOST=1 turns the check off for them."""
    if os.environ.get("VMRUN_TEST_SHARED_HOST") == "1":
        yield
        return
    before = vmrun_host_footprint()
    yield
    deadline = time.monotonic() + 20  # shims and guests that are on their way out
    while (left := vmrun_host_footprint() - before) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, "left on the host after the test session:\n" + "\n".join(sorted(left))

import shutil
import tempfile
from pathlib import Path

import pytest

from guest.image_cache import find_image
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

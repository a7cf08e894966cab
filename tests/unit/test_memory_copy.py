import os
from pathlib import Path

import pytest

from vmrun.errors import HypervisorError
from vmrun.hypervisor.memory_copy import MemoryCopy, data_extents, punch_zero_pages

MIB = 1 << 20


def sparse_file(path: Path) -> dict[int, bytes]:
    """A 64 MiB file with data at three places and holes elsewhere."""
    chunks = {0: os.urandom(MIB), 20 * MIB: os.urandom(3 * MIB), 63 * MIB: os.urandom(MIB)}
    with open(path, "wb") as f:
        f.truncate(64 * MIB)
        for offset, data in chunks.items():
            f.seek(offset)
            f.write(data)
    return chunks


@pytest.fixture
def target():
    """A clone's memory, as the sandbox makes it: an empty memfd."""
    fd = os.memfd_create("test-clone", os.MFD_CLOEXEC)
    yield fd
    os.close(fd)


def contents(fd: int) -> bytes:
    return os.pread(fd, os.fstat(fd).st_size, 0)


def test_copy_has_the_same_bytes_and_keeps_the_holes(tmp_path: Path, target: int) -> None:
    source = tmp_path / "template.mem"
    sparse_file(source)
    with MemoryCopy(source, target) as copy:
        copy.wait(30)
    assert contents(target) == source.read_bytes()
    # Only the data was written: the clone's memory takes no more space than the template's.
    assert os.fstat(target).st_blocks <= source.stat().st_blocks
    assert [offset for offset, _ in data_extents(target, 64 * MIB)][:1] == [0]


def test_target_has_its_final_size_as_soon_as_started(tmp_path: Path, target: int) -> None:
    source = tmp_path / "template.mem"
    sparse_file(source)
    copy = MemoryCopy(source, target).start()
    try:
        assert os.fstat(target).st_size == 64 * MIB  # QEMU may map it at once
    finally:
        copy.close()
    os.fstat(target)  # still the caller's, open


def test_a_source_that_shrinks_meanwhile_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     target: int) -> None:
    source = tmp_path / "template.mem"
    sparse_file(source)
    real_extents = data_extents

    def extents_then_truncate(fd: int, size: int) -> list[tuple[int, int]]:
        found = real_extents(fd, size)
        os.truncate(source, MIB // 2)
        return found

    monkeypatch.setattr("vmrun.hypervisor.memory_copy.data_extents", extents_then_truncate)
    copy = MemoryCopy(source, target).start()
    with pytest.raises(HypervisorError, match="ended early"):
        copy.wait(30)
    copy.close()


def test_zero_pages_become_holes_and_the_file_reads_the_same(tmp_path: Path) -> None:
    page = 4096
    path = tmp_path / "template.mem"
    # Data, 3 zero pages, data, 2 zero pages at the end of the extent, a hole, data.
    layout = [os.urandom(page), bytes(3 * page), os.urandom(page), bytes(2 * page)]
    with open(path, "wb") as f:
        f.write(b"".join(layout))
        f.seek(MIB)
        f.write(os.urandom(page))
    before = path.read_bytes()
    assert punch_zero_pages(path) == 5 * page
    assert path.read_bytes() == before
    with open(path, "rb") as f:
        assert data_extents(f.fileno(), path.stat().st_size) == [(0, page), (4 * page, page), (MIB, page)]
    assert punch_zero_pages(path) == 0  # nothing left to punch

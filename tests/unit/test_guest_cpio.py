import io
import os
import stat

from guest.cpio import Node, write_newc


def read_newc(data: bytes):
    """Minimal newc reader: [(name, mode, rdev major, rdev minor, content)]."""
    entries, off = [], 0
    while True:
        assert data[off : off + 6] == b"070701", off
        fields = [int(data[off + 6 + 8 * i : off + 14 + 8 * i], 16) for i in range(13)]
        mode, size, rmaj, rmin, namesize = fields[1], fields[6], fields[9], fields[10], fields[11]
        name_start = off + 110
        name = data[name_start : name_start + namesize - 1].decode()
        off = (name_start + namesize + 3) & ~3
        content = data[off : off + size]
        off = (off + size + 3) & ~3
        if name == "TRAILER!!!":
            return entries
        entries.append((name, mode, rmaj, rmin, content))


def test_newc_round_trip(tmp_path):
    root = tmp_path / "root"
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/tool").write_bytes(b"#!/bin/sh\necho hi\n")
    (root / "usr/bin/tool").chmod(0o755)
    (root / "bin").symlink_to("usr/bin")
    (root / "etc").mkdir()
    (root / "etc/hostname").write_text("vmrun\n")
    (root / "empty").write_bytes(b"")
    out = io.BytesIO()
    count = write_newc(root, out, [Node("dev/console", stat.S_IFCHR | 0o600, 5, 1)])
    data = out.getvalue()
    assert len(data) % 512 == 0
    entries = read_newc(data)
    assert count == len(entries)
    names = [e[0] for e in entries]
    # parents come before their children
    for name in names:
        parent = os.path.dirname(name)
        if parent:
            assert names.index(parent) < names.index(name), name
    by_name = {e[0]: e for e in entries}
    assert by_name["usr/bin/tool"][4] == b"#!/bin/sh\necho hi\n"
    assert stat.S_IMODE(by_name["usr/bin/tool"][1]) == 0o755
    assert stat.S_ISLNK(by_name["bin"][1]) and by_name["bin"][4] == b"usr/bin"
    assert stat.S_ISDIR(by_name["etc"][1])
    assert by_name["empty"][4] == b""
    console = by_name["dev/console"]
    assert stat.S_ISCHR(console[1]) and console[2:4] == (5, 1)
    # reproducible: same tree, same bytes
    again = io.BytesIO()
    write_newc(root, again, [Node("dev/console", stat.S_IFCHR | 0o600, 5, 1)])
    assert again.getvalue() == data

import shutil
from pathlib import Path

import pytest
from elf_samples import make_elf

from guest.elf import (
    XEN_ELFNOTE_PHYS32_ENTRY,
    ElfFile,
    ElfFormatError,
    ElfInfo,
    has_pvh_note,
    needed_closure,
    read_info,
)


def test_pvh_note_detected_and_trailing_data_ignored():
    pvh = make_elf([("Xen", 6, b"linux\0"), ("Xen", XEN_ELFNOTE_PHYS32_ENTRY, b"\0\0\0\x01")], b"RELOCS" * 10)
    assert has_pvh_note(pvh)
    elf = ElfFile(pvh)
    assert elf.content_end() == len(pvh) - 60
    assert [n.type for n in elf.notes()] == [6, XEN_ELFNOTE_PHYS32_ENTRY]


def test_no_pvh_note():
    assert not has_pvh_note(make_elf([("Xen", 6, b"linux\0"), ("GNU", 0x12, b"abcd")]))
    assert not has_pvh_note(make_elf())
    assert not has_pvh_note(b"MZ not an elf at all" * 10)


def test_rejects_non_elf_and_32bit():
    with pytest.raises(ElfFormatError):
        ElfFile(b"#!/bin/sh\n" + b"\0" * 100)
    with pytest.raises(ElfFormatError):
        ElfFile(b"\x7fELF" + bytes([1, 1, 1]) + b"\0" * 100)


def test_real_binary_needs_libc():
    true = shutil.which("true")
    if true is None:
        pytest.skip("no true(1) binary")
    info = read_info(Path(true))
    assert info is not None
    assert "libc.so.6" in info.needed
    assert info.interp and info.interp.endswith("ld-linux-x86-64.so.2")


def test_read_info_of_non_elf_is_none(tmp_path):
    script = tmp_path / "script"
    script.write_text("#!/bin/sh\necho hi\n")
    assert read_info(script) is None


def _fake_tree(tmp_path, graph):
    files = {}
    for name in graph:
        path = tmp_path / "lib" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
        files[name] = path
    return files


def test_closure_is_transitive_and_deduplicated(tmp_path):
    graph = {
        "prog": ElfInfo(needed=["liba.so.1", "libc.so.6"], interp="/lib64/ld-linux-x86-64.so.2"),
        "liba.so.1": ElfInfo(needed=["libb.so.2", "libc.so.6"]),
        "libb.so.2": ElfInfo(needed=["libc.so.6"]),
        "libc.so.6": ElfInfo(needed=["ld-linux-x86-64.so.2"]),
        "ld-linux-x86-64.so.2": ElfInfo(),
        "unused.so": ElfInfo(),
    }
    files = _fake_tree(tmp_path, graph)
    closure = needed_closure([files["prog"]], [tmp_path / "lib"], read=lambda p: graph[p.name])
    assert set(closure.libraries) == {"liba.so.1", "libb.so.2", "libc.so.6", "ld-linux-x86-64.so.2"}
    assert closure.missing == {}


def test_closure_reports_missing_with_users(tmp_path):
    graph = {"prog": ElfInfo(needed=["libgone.so.3"]), "other": ElfInfo(needed=["libgone.so.3"])}
    files = _fake_tree(tmp_path, graph)
    closure = needed_closure(
        [files["prog"], files["other"]], [tmp_path / "lib"], read=lambda p: graph[p.name]
    )
    assert closure.libraries == {}
    assert sorted(Path(u).name for u in closure.missing["libgone.so.3"]) == ["other", "prog"]


def test_closure_honours_origin_runpath(tmp_path):
    pkg = tmp_path / "site" / "pkg"
    libs = tmp_path / "site" / "pkg.libs"
    pkg.mkdir(parents=True)
    libs.mkdir(parents=True)
    (pkg / "ext.so").write_bytes(b"x")
    (libs / "libbundled.so").write_bytes(b"x")
    graph = {"ext.so": ElfInfo(needed=["libbundled.so"], runpath=["$ORIGIN/../pkg.libs"]), "libbundled.so": ElfInfo()}
    closure = needed_closure([pkg / "ext.so"], [tmp_path / "nowhere"], read=lambda p: graph[p.name])
    assert closure.libraries["libbundled.so"].resolve() == (libs / "libbundled.so").resolve()

import gzip
import shutil
import struct

import pytest

from guest import kernel
from guest.debs import Package
from guest.kernel import (
    UnknownModule,
    bzimage_payload,
    extract_vmlinux,
    load_order,
    module_name,
    parse_builtin,
    parse_module_list,
    parse_modules_dep,
)
from vmrun.errors import ImageError
from elf_samples import make_elf


MODULES_DEP = """\
kernel/net/vmw_vsock/vsock.ko:
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_ring.ko:
kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko: kernel/net/vmw_vsock/vsock.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko: kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko kernel/net/vmw_vsock/vsock.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/fs/fuse/fuse.ko:
kernel/fs/fuse/virtiofs.ko: kernel/fs/fuse/fuse.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/char/hw_random/virtio-rng.ko.xz: kernel/drivers/virtio/virtio.ko
"""


def deps_from(text):
    table = {name: deps for name, (_path, deps) in parse_modules_dep(text).items()}

    def depends(name):
        if name not in table:
            raise UnknownModule(name)
        return table[name]

    return depends


def test_parse_modules_dep_names_and_paths():
    table = parse_modules_dep(MODULES_DEP)
    path, deps = table["vmw_vsock_virtio_transport"]
    assert path == "kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko"
    assert deps == ["vmw_vsock_virtio_transport_common", "vsock", "virtio", "virtio_ring"]
    assert table["virtio_rng"][0].endswith("virtio-rng.ko.xz")  # '-' -> '_', suffix stripped


def test_load_order_puts_dependencies_first_once():
    order = load_order(["vmw_vsock_virtio_transport", "virtiofs", "vsock"], deps_from(MODULES_DEP))
    assert sorted(order) == sorted(set(order))
    for module, dep in [
        ("vmw_vsock_virtio_transport", "vmw_vsock_virtio_transport_common"),
        ("vmw_vsock_virtio_transport_common", "vsock"),
        ("virtio", "virtio_ring"),
        ("virtiofs", "fuse"),
        ("virtiofs", "virtio"),
    ]:
        assert order.index(dep) < order.index(module), (dep, module)
    assert order[-1] == "virtiofs"


def test_load_order_skips_builtin_modules():
    order = load_order(["virtiofs"], deps_from(MODULES_DEP), builtin={"virtio", "virtio_ring", "fuse"})
    assert order == ["virtiofs"]


def test_load_order_unknown_and_cycle():
    with pytest.raises(UnknownModule):
        load_order(["nosuchmod"], deps_from(MODULES_DEP))
    cyclic = deps_from("a.ko: b.ko\nb.ko: a.ko\n")
    with pytest.raises(ImageError, match="cycle"):
        load_order(["a"], cyclic)


def test_module_list_and_builtin_parsing():
    text = "# comment\nvirtio_pci\n\nvsock   # inline comment\nvirtio-rng?\n"
    assert parse_module_list(text) == [("virtio_pci", False), ("vsock", False), ("virtio_rng", True)]
    assert parse_builtin("kernel/fs/fuse/fuse.ko\nkernel/drivers/virtio/virtio-pci.ko\n") == {"fuse", "virtio_pci"}
    assert module_name("a/b/vmw_vsock-virtio.ko.zst") == "vmw_vsock_virtio"


def test_shipped_module_list_parses():
    wanted = dict(parse_module_list(kernel.Path(kernel.__file__).with_name("kernel-config").joinpath("modules.txt").read_text()))
    for name in ("vsock", "vmw_vsock_virtio_transport", "fuse", "virtiofs", "virtio_net"):
        assert wanted.get(name) is False, name


def _module_with_depends(depends: str) -> bytes:
    """A relocatable ELF with a .modinfo section (and the section name table)."""
    modinfo = f"license=GPL\0depends={depends}\0name=x\0".encode()
    shstr = b"\0.modinfo\0.shstrtab\0"
    data_off = 64
    shstr_off = data_off + len(modinfo)
    shoff = (shstr_off + len(shstr) + 7) & ~7
    ehdr = b"\x7fELF" + bytes([2, 1, 1]) + b"\0" * 9
    ehdr += struct.pack("<HHIQQQIHHHHHH", 1, 62, 1, 0, 0, shoff, 0, 64, 0, 0, 64, 3, 2)
    body = modinfo + shstr
    body += b"\0" * (shoff - data_off - len(body))
    null = b"\0" * 64
    sec_modinfo = struct.pack("<IIQQQQIIQQ", 1, 1, 0, 0, data_off, len(modinfo), 0, 0, 1, 0)
    sec_shstr = struct.pack("<IIQQQQIIQQ", 10, 3, 0, 0, shstr_off, len(shstr), 0, 0, 1, 0)
    return ehdr + body + null + sec_modinfo + sec_shstr


def test_module_tree_reads_depends_from_modinfo_when_no_modules_dep(tmp_path):
    root = tmp_path / "6.1.0-test"
    (root / "kernel/a").mkdir(parents=True)
    (root / "kernel/a/top.ko").write_bytes(_module_with_depends("mid-dep,base"))
    (root / "kernel/a/mid-dep.ko").write_bytes(_module_with_depends("base"))
    (root / "kernel/a/base.ko").write_bytes(_module_with_depends(""))
    (root / "kernel/a/inkernel.ko").write_bytes(_module_with_depends(""))
    (root / "modules.builtin").write_text("kernel/b/builtin_one.ko\n")
    tree = kernel.ModuleTree.load(root)
    logged = []
    order = tree.resolve([("top", False), ("builtin_one", False), ("maybe", True)], logged.append)
    assert order == ["base", "mid_dep", "top"]
    assert any("maybe" in line for line in logged)
    with pytest.raises(ImageError, match="nothere"):
        tree.resolve([("nothere", False)], logged.append)
    installed = kernel.install_modules(tree, order, tmp_path / "guest", "6.1.0-test")
    assert installed[0] == "/usr/lib/modules/6.1.0-test/kernel/a/base.ko"
    assert (tmp_path / "guest" / installed[-1].lstrip("/")).exists()


def _bzimage(payload: bytes) -> bytes:
    setup_sects = 3
    image = bytearray((setup_sects + 1) * 512)
    image[0x1F1] = setup_sects
    image[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", image, 0x206, 0x20F)
    struct.pack_into("<II", image, 0x248, 100, len(payload))
    return bytes(image) + b"\0" * 100 + payload + b"TAIL"


def test_bzimage_payload_follows_boot_header():
    assert bzimage_payload(_bzimage(b"PAYLOAD!")) == b"PAYLOAD!"
    with pytest.raises(ValueError):
        bzimage_payload(b"\0" * 4096)


def _with_size(compressed: bytes, raw: bytes) -> bytes:
    return compressed + struct.pack("<I", len(raw))  # like the kernel's size_append


def test_extract_vmlinux_gzip_pvh_and_non_pvh():
    pvh = make_elf([("Xen", 0x12, b"\0\0\0\x01")], trailing=b"relocs" * 100)
    out = extract_vmlinux(_bzimage(_with_size(gzip.compress(pvh), pvh)))
    assert out == pvh[: -600]  # trailing relocations cut off
    plain = make_elf([("Xen", 6, b"linux\0")])
    assert extract_vmlinux(_bzimage(_with_size(gzip.compress(plain), plain))) is None
    assert extract_vmlinux(_bzimage(b"\x00\x01garbage")) is None


@pytest.mark.skipif(shutil.which("lz4") is None, reason="needs lz4")
def test_extract_vmlinux_lz4_legacy(tmp_path):
    pvh = make_elf([("Xen", 0x12, b"\0\0\0\x01")])
    raw = tmp_path / "raw"
    raw.write_bytes(pvh)
    kernel.run(["lz4", "-l", "-q", "-f", raw, tmp_path / "raw.lz4"])
    compressed = (tmp_path / "raw.lz4").read_bytes()
    assert compressed.startswith(kernel.LZ4_LEGACY_MAGIC)
    assert extract_vmlinux(_bzimage(_with_size(compressed, pvh))) == pvh


def test_kernel_package_from_meta_depends():
    meta = Package("linux-image-cloud-amd64", "6.1.192-3", ("linux-image-6.1.0-57-cloud-amd64",))
    assert kernel.kernel_package(meta) == "linux-image-6.1.0-57-cloud-amd64"
    with pytest.raises(ImageError, match="linux-image-cloud-amd64"):
        kernel.kernel_package(Package("linux-image-cloud-amd64", "1", ("libc6",)))


def _signed(module: bytes, signature: bytes) -> bytes:
    # As scripts/sign-file appends it: the PKCS#7 signature, its information block
    # (algo, hash, id type, signer len, key id len, 3 pad bytes, sig len), then the magic.
    info = struct.pack(">BBBBB3xI", 0, 0, 2, 0, 0, len(signature))
    return module + signature + info + b"~Module signature appended~\n"


def test_a_modules_signature_is_stripped_and_the_rest_kept_whole():
    module = b"\x7fELF" + bytes(range(256)) * 10
    assert kernel.strip_signature(_signed(module, b"S" * 721)) == module
    assert kernel.strip_signature(module) == module  # unsigned: as it is


def test_a_signature_trailer_that_does_not_fit_is_an_error():
    with pytest.raises(ValueError):
        kernel.strip_signature(_signed(b"tiny", b"S" * 721)[-50:])
    with pytest.raises(ValueError):
        kernel.strip_signature(b"~Module signature appended~\n")

from pathlib import Path

from vmrun.hypervisor.accel import Acceleration
from vmrun.hypervisor.devices import QemuDevice
from vmrun.hypervisor.qemu import QemuVM, VMSpec, base_kernel_params, qemu_command


class RecordingVM:
    def __init__(self):
        self.calls = []

    def qmp(self, command, **arguments):
        self.calls.append((command, arguments))


def test_vhost_user_device_on_the_command_line_and_hotplugged():
    device = QemuDevice("vhost-user-fs-pci", "virtiofs0", {"tag": "vmrun"}, backend_socket=Path("/r/fs.sock"))
    assert device.command_line() == [
        "-chardev", "socket,id=virtiofs0-chr,path=/r/fs.sock",
        "-device", "vhost-user-fs-pci,id=virtiofs0,chardev=virtiofs0-chr,tag=vmrun",
    ]
    vm = RecordingVM()
    device.hotplug(vm, "hp0")
    assert vm.calls == [
        ("chardev-add", {"id": "virtiofs0-chr", "backend": {"type": "socket", "data": {
            "addr": {"type": "unix", "data": {"path": "/r/fs.sock"}}, "server": False}}}),
        ("device_add", {"driver": "vhost-user-fs-pci", "bus": "hp0", "id": "virtiofs0",
                        "chardev": "virtiofs0-chr", "tag": "vmrun"}),
    ]


def test_kernel_device_needs_no_chardev():
    vm = RecordingVM()
    QemuDevice("vhost-vsock-pci", "vsock0", {"guest-cid": 9}).hotplug(vm, "hp1")
    assert vm.calls == [("device_add", {"driver": "vhost-vsock-pci", "bus": "hp1", "id": "vsock0", "guest-cid": 9})]


def spec(**kwargs):
    return VMSpec(name="t", qemu="qemu", acceleration=Acceleration("tcg", "test"), vcpus=1, memory_mib=256,
                  kernel=Path("/k"), initrd=Path("/i"), kernel_params="console=ttyS0",
                  **{"console_log": Path("/c.log"), **kwargs})


def test_cold_boot_memory_is_a_shared_memfd():
    args = qemu_command(spec(), Path("/q.sock"))
    assert "memory-backend-memfd,id=mem,size=256M,share=on" in args
    assert "-incoming" not in args and not any("pcie-root-port" in a for a in args)


def test_template_and_clone_memory_is_a_shared_file_with_hotplug_ports():
    args = qemu_command(spec(memory_file=Path("/dev/shm/x.mem"), hotplug_ports=2, incoming=True), Path("/q.sock"))
    assert "memory-backend-file,id=mem,size=256M,share=on,mem-path=/dev/shm/x.mem" in args
    assert [a for a in args if "pcie-root-port" in a] == [
        "pcie-root-port,id=hp0,bus=pcie.0,chassis=1", "pcie-root-port,id=hp1,bus=pcie.0,chassis=2"]
    assert args[args.index("-incoming") + 1] == "defer"


def test_the_root_image_is_mapped_read_only_on_virtio_pmem(tmp_path):
    image = tmp_path / "root.erofs"
    image.write_bytes(b"\0" * (64 << 20))
    args = qemu_command(spec(root_image=image, max_memory_mib=1024), Path("/q.sock"))
    # Device memory holds virtio-mem's 768 MiB and the image's 64.
    assert args[args.index("-m") + 1] == "256M,maxmem=1088M"
    assert f"memory-backend-file,id=rootimg,mem-path={image},size=64M,share=on,readonly=on" in args
    assert "virtio-pmem-pci,memdev=rootimg,id=rootpmem" in args
    assert args[args.index("-append") + 1] == "console=ttyS0 swiotlb=noforce"


def test_without_a_root_image_nothing_changes():
    args = qemu_command(spec(), Path("/q.sock"))
    assert args[args.index("-m") + 1] == "256M" and not any("pmem" in a for a in args)
    assert args[args.index("-append") + 1] == "console=ttyS0"


def test_translated_guests_keep_time_with_the_tsc_and_kvm_guests_with_kvm_clock():
    assert "clocksource=tsc" in base_kernel_params(translated=True).split()
    assert "tsc=reliable" in base_kernel_params(translated=True).split()
    assert "clocksource" not in base_kernel_params(translated=False)
    assert base_kernel_params(translated=False).startswith("console=ttyS0")


def test_the_console_tail_is_one_printable_line_and_a_panic_says_why(tmp_path):
    console = tmp_path / "console.log"
    vm = QemuVM(spec(console_log=console), tmp_path / "q.sock", tmp_path / "q.log")
    assert vm.console_tail() == ""  # no console yet
    console.write_bytes(b"x" * 10000 + b"\nvmrun-init: starting\n\x1b[2Jcleared \x07\n\n")
    assert vm.console_tail() == "?[2Jcleared ?"  # a guest's escapes never reach a terminal
    console.write_bytes(b"Traceback ...\n[ 3.35] Kernel panic - not syncing: Attempted to kill init!\n"
                        b"[ 3.36] Call Trace:\n[ 3.36]  </TASK>\n[ 3.37] Kernel Offset: disabled\n")
    assert vm.with_console("QEMU exited with status 0") == (
        "QEMU exited with status 0 (guest console: [ 3.35] Kernel panic - not syncing: Attempted to kill init!)")

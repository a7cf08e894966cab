"""Does /dev/kvm really run guests? `python -m vmrun.hypervisor.kvm_probe` answers by exit code.

Some hosts (nested or paravirtualised, e.g. PVM) expose a /dev/kvm on which guests hang
or fail. This probe builds the smallest possible VM: one vCPU in 16-bit real mode running
`out 0x10, al; hlt`, and checks that KVM_RUN reports the port write and the halt. The
caller runs it in a child process with a short timeout, so a hang costs a second, once.
Exit 0: KVM works; anything else (or a timeout): it does not.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import struct
import sys

KVM_GET_API_VERSION = 0xAE00
KVM_CREATE_VM = 0xAE01
KVM_GET_VCPU_MMAP_SIZE = 0xAE04
KVM_CREATE_VCPU = 0xAE41
KVM_SET_USER_MEMORY_REGION = 0x4020AE46
KVM_RUN = 0xAE80
KVM_SET_REGS = 0x4090AE82
KVM_GET_SREGS = 0x8138AE83
KVM_SET_SREGS = 0x4138AE84

KVM_EXIT_IO = 2
KVM_EXIT_HLT = 5

_GUEST_ADDR = 0x1000
_PORT = 0x10
# mov al, 0x42 ; out 0x10, al ; hlt
_CODE = bytes([0xB0, 0x42, 0xE6, _PORT, 0xF4])


def probe() -> bool:
    kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    if fcntl.ioctl(kvm, KVM_GET_API_VERSION) != 12:
        return False
    vm = fcntl.ioctl(kvm, KVM_CREATE_VM, 0)
    memory = mmap.mmap(-1, 0x1000 * 4)
    memory[_GUEST_ADDR - 0x1000 : _GUEST_ADDR - 0x1000 + len(_CODE)] = _CODE
    host_addr = ctypes.addressof(ctypes.c_char.from_buffer(memory))
    # struct kvm_userspace_memory_region: slot, flags, guest_phys_addr, memory_size, userspace_addr
    region = struct.pack("IIQQQ", 0, 0, 0x1000, len(memory), host_addr)
    fcntl.ioctl(vm, KVM_SET_USER_MEMORY_REGION, region)
    vcpu = fcntl.ioctl(vm, KVM_CREATE_VCPU, 0)
    run_size = fcntl.ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE)
    run = mmap.mmap(vcpu, run_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)

    sregs = bytearray(312)
    fcntl.ioctl(vcpu, KVM_GET_SREGS, sregs)
    # cs is the first kvm_segment (base u64, limit u32, selector u16, ...): base 0, selector 0.
    struct.pack_into("QIH", sregs, 0, 0, 0xFFFF, 0)
    fcntl.ioctl(vcpu, KVM_SET_SREGS, bytes(sregs))
    regs = bytearray(144)  # 16 GPRs, rip, rflags
    struct.pack_into("QQ", regs, 16 * 8, _GUEST_ADDR, 0x2)
    fcntl.ioctl(vcpu, KVM_SET_REGS, bytes(regs))

    saw_io = False
    for _ in range(4):
        fcntl.ioctl(vcpu, KVM_RUN, 0)
        (reason,) = struct.unpack_from("I", run, 8)
        if reason == KVM_EXIT_IO:
            # kvm_run.io: direction u8, size u8, port u16, count u32, data_offset u64
            _, _, port, _, offset = struct.unpack_from("BBHIQ", run, 32)
            saw_io = port == _PORT and run[offset] == 0x42
        elif reason == KVM_EXIT_HLT:
            return saw_io
        else:
            return False
    return False


if __name__ == "__main__":
    try:
        sys.exit(0 if probe() else 1)
    except OSError as exc:
        print(f"kvm probe: {exc}", file=sys.stderr)
        sys.exit(2)

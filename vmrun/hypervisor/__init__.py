"""The hypervisor layer: QEMU over QMP, virtiofsd, vsock transports."""

"""vsock transports: kernel vhost-vsock where the host has it, our hybrid backend otherwise.

`transports.make_transport` picks one. This package imports nothing itself: the backend
process (`python -m vmrun.hypervisor.vsock.vhost_user`) then starts without the host side.
"""

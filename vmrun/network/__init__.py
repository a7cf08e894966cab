"""Pod networking: the interfaces CNI made in a network namespace, carried into the guest.

For each veth in the pod's namespace, a tap is made beside it and tc mirrors the two
(`tcfilter`, Kata's default model); QEMU gets the tap as a virtio-net NIC with the veth's
MAC, and the agent gives the guest's NIC the veth's MTU, addresses, routes and
neighbours. `none` makes the tap only, for callers that wire it themselves.
"""

"""containerd shim v2 for vmrun."""

"""vmrun: a runc-compatible runtime whose containers run inside a QEMU guest."""

__version__ = "0.1.0"

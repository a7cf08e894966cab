"""vmrun's guest image builder: a Debian cloud kernel plus an initramfs with the agent.

Public API: `build_image`, `find_image` and `GuestImage` (see guest.build).
"""

from guest.build import GuestImage, build_image, find_image

__all__ = ["GuestImage", "build_image", "find_image"]

"""vmrun's guest image builder: a Debian cloud kernel plus an initramfs with the agent.

`guest.build.build_image` builds it; `guest.image_cache.find_image` finds the current one
(without importing the builder).
"""

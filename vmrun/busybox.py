"""A tiny OCI bundle from Debian's busybox-static: the demo's, the tests' and the benches'."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from vmrun.errors import BundleError
from vmrun.oci import default_spec
from vmrun.proc import run

BUSYBOX = Path("/bin/busybox")


def make_busybox_bundle(bundle: Path, args: list[str], *, terminal: bool = False,
                        busybox: Path = BUSYBOX) -> Path:
    """Write bundle/rootfs (busybox and its applets) and bundle/config.json running `args`."""
    if not busybox.is_file():
        raise BundleError(f"{busybox} not found: install busybox-static")
    rootfs = bundle / "rootfs"
    for directory in ("bin", "proc", "sys", "dev", "etc", "tmp", "root"):
        (rootfs / directory).mkdir(parents=True, exist_ok=True)
    shutil.copy2(busybox, rootfs / "bin" / "busybox")
    applets = run([busybox, "--list"]).stdout.decode().split()
    for applet in applets:
        link = rootfs / "bin" / applet
        if applet != "busybox" and not link.exists():
            os.symlink("busybox", link)
    (rootfs / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (rootfs / "etc" / "group").write_text("root:x:0:\n")
    spec = default_spec()
    spec["process"]["args"] = list(args)
    spec["process"]["terminal"] = terminal
    spec["process"]["env"] = ["PATH=/bin", "TERM=xterm"]
    (bundle / "config.json").write_text(json.dumps(spec, indent=2))
    return bundle

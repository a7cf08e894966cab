"""The agent's read-only pin of a binary (what spares crun its self-copy on every call),
exercised in a private mount namespace of the host so nothing leaks out of the test."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

_CHILD = r"""
import errno, fcntl, json, os, sys
from vmrun.common import linux

path, store = sys.argv[1], sys.argv[2]
linux.pin_read_only_copy(path, store)
result = {"content": open(path).read(), "read_only": bool(os.statvfs(path).f_flag & os.ST_RDONLY)}
try:
    open(path, "a").close()
    result["write"] = "allowed"
except OSError as exc:
    result["write"] = errno.errorcode[exc.errno]
with open(path, "rb") as pinned:
    try:
        fcntl.fcntl(pinned, fcntl.F_GET_SEALS)
        result["seals"] = "shmem"  # crun would take this for an unsealed memfd and copy itself
    except OSError as exc:
        result["seals"] = errno.errorcode[exc.errno]
print(json.dumps(result))
"""


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare(1)")
def test_pinned_copy_is_read_only_and_not_shmem(tmp_path: Path) -> None:
    binary = tmp_path / "tool"
    binary.write_text("#!/bin/sh\necho pinned\n")
    store = tmp_path / "store"
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", sys.executable, "-c", _CHILD, str(binary), str(store)],
        capture_output=True, text=True, check=True,
    )
    seen = json.loads(result.stdout)
    assert seen == {"content": "#!/bin/sh\necho pinned\n", "read_only": True, "write": "EROFS", "seals": "EINVAL"}
    # The mounts lived and died with the namespace: the original is writable as before.
    with open(binary, "a") as original:
        original.write("# still ours\n")
    assert not os.path.ismount(store)

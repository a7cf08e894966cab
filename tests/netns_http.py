"""HTTP from inside a network namespace, for tests whose addresses live only there."""

from __future__ import annotations

import subprocess
import sys

_FETCH = """\
import sys, time, urllib.request
url, deadline = sys.argv[1], time.time() + float(sys.argv[2])
while True:
    try:
        print(urllib.request.urlopen(url, timeout=5).read().decode(), end="")
        break
    except OSError as exc:
        if time.time() > deadline:
            sys.exit(f"fetch failed: {exc}")
        time.sleep(0.2)
"""


def fetch_in_netns(netns: str, url: str, timeout: float = 60) -> str:
    """GET `url` from inside `netns`, retrying while the server comes up; the body."""
    result = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", _FETCH, url, str(timeout)],
                            capture_output=True, text=True, timeout=timeout + 10)
    assert result.returncode == 0, result.stderr
    return result.stdout

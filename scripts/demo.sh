#!/usr/bin/env bash
# Set up vmrun and run a busybox container inside a QEMU guest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
work=$(mktemp -d /tmp/vmrun-demo.XXXXXX)
trap 'rm -rf "$work"' EXIT
python3 - "$work/bundle" <<'PY'
import sys
from pathlib import Path
from vmrun.busybox import make_busybox_bundle
make_busybox_bundle(Path(sys.argv[1]), ["sh", "-c",
    'echo "Hello from a container in a vmrun guest: kernel $(uname -r) on $(uname -m), host name $(hostname)"'])
PY
echo "host kernel: $(uname -r)"
vmrun run --bundle "$work/bundle" "demo-$$"

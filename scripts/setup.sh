#!/usr/bin/env bash
# Installs everything vmrun needs on Debian 12 (as root), then builds the guest image.
# Safe to run again: apt, pip and the image build are all no-ops when up to date.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  qemu-system-x86 qemu-system-common   # QEMU, qboot, virtiofsd (/usr/lib/qemu/virtiofsd)
  busybox-static                       # the demo and test containers
  runc                                 # bench: the baseline vmrun is compared with
  lz4 cpio kmod binutils erofs-utils   # the guest image builder (erofs: the guest's root image)
  make bc bison flex libelf-dev libssl-dev xz-utils  # building the guest kernel (guest/kernel_build.py)
  iproute2
  containernetworking-plugins          # tests: the CRI pod network (bridge, host-local, loopback)
  containerd                           # tests/clients: containerd + ctr drive vmrun as a real client
  dpkg-dev golang-github-gogo-protobuf-dev  # tests/clients/test_cri.py: `apt-get source containerd` (CRI api.proto) + gogo.proto
  podman conmon                        # tests/clients: podman + conmon drive vmrun as a real client
  gcc libc6-dev                        # the guest kernel; tests/security: a static vsock probe for the guest
)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
elif [ ! -d /var/lib/apt/lists ] || [ -z "$(ls /var/lib/apt/lists 2>/dev/null | grep -v lock)" ]; then
  apt-get update -q   # the image builder downloads guest packages with apt-get download
fi

python3 -m pip install -q --disable-pip-version-check -e '.[test]'
# Byte-compile vmrun, as a distribution's package install does: an editable install does
# not, and where PYTHONDONTWRITEBYTECODE is set nothing ever writes the cache, so every vmrun
# process (each CLI call, shim, vsock backend) would compile its modules again (~40 ms).
python3 -m compileall -q vmrun guest
# Callers are configured with a fixed path (containerd's BinaryName, podman's --runtime, ...).
ln -sf "$(python3 -c 'import os, sys; print(os.path.join(os.path.dirname(sys.executable), "vmrun"))')" /usr/local/bin/vmrun
# containerd finds its shims on its PATH: runtime_type "io.containerd.vmrun.v2" runs this one.
ln -sf "$(python3 -c 'import os, sys; print(os.path.join(os.path.dirname(sys.executable), "containerd-shim-vmrun-v2"))')" \
  /usr/local/bin/containerd-shim-vmrun-v2
vmrun image build

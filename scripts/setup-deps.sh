#!/usr/bin/env bash
# Installs what building and testing loip needs on a Debian machine that has
# the Rust toolchain (rustup) and python3, and nothing that is already there.
# Usage: scripts/setup-deps.sh [build|test]   (test adds rustfmt and clippy)
set -euo pipefail
mode="${1:-build}"

apt_install() {
  local sudo=()
  [ "$(id -u)" -eq 0 ] || sudo=(sudo)
  echo "installing with apt: $*"
  "${sudo[@]}" apt-get update -qq
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"
}

command -v cargo >/dev/null || {
  echo "error: cargo not found: install the Rust toolchain (https://rustup.rs)" >&2
  exit 1
}
command -v python3 >/dev/null || apt_install python3
# The linker rustc calls, and pip for scripts/fetch-model.sh.
command -v cc >/dev/null || apt_install gcc libc6-dev
python3 -m pip --version >/dev/null 2>&1 || apt_install python3-pip

if [ "$mode" = test ]; then
  # tests/cluster_mdns.rs builds network namespaces with `ip`.
  command -v ip >/dev/null || apt_install iproute2
  for c in fmt clippy; do
    cargo "$c" --version >/dev/null 2>&1 && continue
    command -v rustup >/dev/null || {
      echo "error: cargo $c is missing and rustup is not there to add it" >&2
      exit 1
    }
    case "$c" in fmt) rustup component add rustfmt ;; clippy) rustup component add clippy ;; esac
  done
  # The appliance tests (tests/appliance.rs): systemd-analyze for the unit
  # file, qemu-img and mkfs.ext4 for a loop-mounted image.
  missing=()
  command -v systemd-analyze >/dev/null || missing+=(systemd)
  command -v qemu-img >/dev/null || missing+=(qemu-utils)
  command -v mkfs.ext4 >/dev/null || missing+=(e2fsprogs)
  command -v unshare >/dev/null || missing+=(util-linux)
  # tests/offload_io_error.rs: a FUSE file system that answers EIO.
  command -v fusermount3 >/dev/null || missing+=(fuse3)
  /usr/bin/python3 -c "import fusepy" >/dev/null 2>&1 || missing+=(python3-fusepy)
  # The aarch64 checks (the Jetsons' ISA): a cross C compiler and linker,
  # the aarch64 C library, and qemu's user-mode emulator to run the tests.
  command -v aarch64-linux-gnu-gcc >/dev/null || missing+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
  command -v qemu-aarch64 >/dev/null || missing+=(qemu-user)
  [ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}"
  if ! rustup target list --installed 2>/dev/null | grep -qx aarch64-unknown-linux-gnu; then
    command -v rustup >/dev/null || {
      echo "error: Rust's aarch64 library is missing and rustup is not there to add it" >&2
      exit 1
    }
    rustup target add aarch64-unknown-linux-gnu
  fi
  # The HTTP client tests (tests/serve_clients.rs): headless Chromium with
  # its driver, and the openai and selenium Python packages.
  if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
    apt_install chromium chromium-driver
  fi
  # NVRTC for tests/cuda_ptx.rs (the kernels compiled to PTX, no GPU
  # needed): the python module nvidia.cuda_nvrtc comes from the package
  # nvidia-cuda-nvrtc-cu12.
  for pm in openai:openai selenium:selenium nvidia.cuda_nvrtc:nvidia-cuda-nvrtc-cu12; do
    m="${pm%%:*}" p="${pm#*:}"
    python3 -c "import $m" >/dev/null 2>&1 && continue
    echo "installing with pip: $p"
    # Debian's python3 refuses system-wide pip installs (PEP 668) unless told.
    python3 -m pip install --quiet "$p" 2>/dev/null ||
      python3 -m pip install --quiet --break-system-packages "$p"
  done
fi

#!/usr/bin/env bash
# All the checks: install what is missing, fetch the model, then formatting,
# lints and every test in release mode (so numeric tests run at speed and
# validation is checked as shipped). Ends with cargo test's summary lines.
# The fixture tests read ../shared/fixtures (or $LOIP_FIXTURES).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup-deps.sh test
./scripts/fetch-model.sh
cargo fmt --check
cargo clippy --all-targets -- -D warnings
cargo clippy --all-targets --features cuda -- -D warnings

# aarch64, the Jetsons' ISA: cross-built with the linker and run under the
# qemu that setup-deps.sh installed.
arm=aarch64-unknown-linux-gnu
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
cargo clippy --all-targets --target "$arm" -- -D warnings
# tests/cross_isa.rs compares this aarch64 loip's logits with the native one's.
cargo build --release --target "$arm" --bin loip
export LOIP_AARCH64_LOIP="$PWD/target/$arm/release/loip" LOIP_REQUIRE_AARCH64=1

# As root (CI), the network-namespace tests of tests/cluster_mdns.rs and the
# FUSE tests of tests/offload_io_error.rs must run, not skip.
if [ "$(id -u)" -eq 0 ]; then export LOIP_REQUIRE_NETNS=1 LOIP_REQUIRE_FUSE=1; fi

log="$(mktemp)"
trap 'rm -f "$log"' EXIT
status=0
# The client tests must not skip here: their software was installed above.
LOIP_REQUIRE_CLIENTS=1 cargo test --release --no-fail-fast 2>&1 | tee "$log" || status=$?
# The CUDA build: every kernel of kernels/ compiled to PTX by NVRTC (from the
# pip package installed above; no GPU needed), and the CLI's --backend paths.
LOIP_REQUIRE_NVRTC=1 cargo test --release --features cuda --test cuda_ptx --test cli_backend 2>&1 |
  tee -a "$log" || status=$?
# The kernels, block formats and forward pass on aarch64, under qemu (the
# real-model tests would take most of an hour emulated; cross_isa.rs above
# checks the real model's bits instead).
cargo test --release --target "$arm" --lib --test kernels --test dtypes --test forward 2>&1 |
  tee -a "$log" || status=$?
echo
echo "summary of cargo test --release (and --features cuda, and on aarch64 under qemu):"
grep -E '^test result:' "$log" || true
awk '/^test result:/ { for (i = 1; i < NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^ignored/) s += $i } }
     END { printf "total: %d passed, %d failed, %d skipped\n", p, f, s }' "$log"
exit "$status"

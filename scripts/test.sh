#!/usr/bin/env bash
# The whole test suite: unit tests, and the hw-tests that need root, a real
# kernel and a local registry. Run as root on Debian 12; installs what it needs.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh

if [ "$(id -u)" -ne 0 ]; then
    echo "the hw-tests need root (namespaces, cgroups, mounts): run scripts/test.sh as root" >&2
    exit 1
fi
# A fresh clone gains nothing from the incremental cache, which was half of
# what a cold run wrote to disk; export CARGO_INCREMENTAL=1 to keep it.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
echo "==> building"
cargo build --workspace --all-targets --quiet
echo "==> testing"
status=0
cargo test --workspace --no-fail-fast || status=$?
echo "==> testing the patched rumqttd (third_party/rumqttd/OUTPOST-PATCHES.md)"
CARGO_TARGET_DIR=target/third-party cargo test --manifest-path third_party/rumqttd/Cargo.toml \
    --no-default-features --lib --locked --quiet || status=$?
# The features the hub uses: the client-certificate patch compiles only with them.
CARGO_TARGET_DIR=target/third-party cargo test --manifest-path third_party/rumqttd/Cargo.toml \
    --no-default-features --features use-rustls,verify-client-cert --lib --locked --quiet outpost_patch || status=$?
exit $status

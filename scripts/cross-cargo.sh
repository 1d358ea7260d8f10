#!/usr/bin/env bash
# cargo for an arm target, with Debian's rustc-web/cargo-web (1.96; the
# rustup toolchain here is x86_64 only): sets the cross linker, the C compiler
# for the crates that build C (ring, zstd-sys) and pkg-config for the target,
# then runs /usr/bin/cargo with --target. Builds into $OUTPOST_CROSS_TARGET_DIR
# (default target/cross), never the shared target/. Installs nothing: as root,
# `source scripts/deps.sh; cross_deps arm64` does (armhf for armv7).
#
#   scripts/cross-cargo.sh aarch64-unknown-linux-gnu build --release -p edge-agent
#   scripts/cross-cargo.sh armv7-unknown-linux-gnueabihf build --release -p hub
#   scripts/cross-cargo.sh aarch64-unknown-linux-gnu test --no-run -p hw-tests
#   scripts/cross-cargo.sh aarch64-unknown-linux-gnu build --profile cross-test -p edge-agent   # hw-tests/tests/arm.rs
set -euo pipefail
cd "$(dirname "$0")/.."

if [ $# -lt 2 ]; then
    echo "usage: $0 TARGET-TRIPLE CARGO-SUBCOMMAND [ARGS...]" >&2
    exit 2
fi
triple=$1
subcommand=$2
shift 2
case "$triple" in
    aarch64-unknown-linux-gnu) gnu=aarch64-linux-gnu deb=arm64 ;;
    armv7-unknown-linux-gnueabihf) gnu=arm-linux-gnueabihf deb=armhf ;;
    *)
        echo "cross-cargo.sh: no cross set-up for $triple (aarch64-unknown-linux-gnu, armv7-unknown-linux-gnueabihf)" >&2
        exit 2
        ;;
esac

# Each thing the build needs, and the package that brings it.
missing=()
[ -x /usr/bin/cargo ] && /usr/bin/cargo --version 2>/dev/null | grep -q . || missing+=(cargo-web)
[ -x /usr/bin/rustc ] || missing+=(rustc-web)
[ -d "/usr/lib/rustlib/$triple/lib" ] || missing+=("libstd-rust-web-dev:$deb")
command -v "$gnu-gcc" >/dev/null || missing+=("gcc-${gnu}")
[ -e "/usr/lib/$gnu/libseccomp.so" ] || missing+=("libseccomp-dev:$deb")
if [ ${#missing[@]} -gt 0 ]; then
    echo "cross-cargo.sh: cannot build for $triple: missing ${missing[*]}." >&2
    echo "  As root: dpkg --add-architecture $deb && apt-get update && apt-get install ${missing[*]}" >&2
    echo "  (or: source scripts/deps.sh; cross_deps $deb)" >&2
    exit 1
fi

# Run from a test of another cargo (hw-tests/tests/arm.rs): drop what that
# cargo set for its test. Build scripts track some of it (ring:
# CARGO_MANIFEST_DIR), and a value that differs from the last build's would
# rebuild ring and all that depends on it.
for var in $(compgen -e); do
    case "$var" in
        CARGO | CARGO_MANIFEST_DIR | CARGO_MANIFEST_PATH | CARGO_PKG_* | CARGO_CRATE_NAME | CARGO_BIN_NAME | \
            CARGO_BIN_EXE_* | CARGO_PRIMARY_PACKAGE | CARGO_TARGET_TMPDIR | CARGO_RUSTC_CURRENT_DIR)
            unset "$var"
            ;;
    esac
done

env_triple=${triple//-/_}
upper_triple=${env_triple^^}
export "CARGO_TARGET_${upper_triple}_LINKER=$gnu-gcc"
export "CC_${env_triple}=$gnu-gcc" "AR_${env_triple}=$gnu-ar"
# No crate in the tree uses pkg-config today (libseccomp-sys just links
# -lseccomp, which the cross gcc finds in /usr/lib/$gnu); set for the target
# only, so a future one finds the target's .pc files, never the host's.
export PKG_CONFIG_ALLOW_CROSS=1
export "PKG_CONFIG_LIBDIR_${env_triple}=/usr/lib/$gnu/pkgconfig:/usr/share/pkgconfig"
# /usr/bin/cargo would otherwise run the first rustc on PATH: rustup's, which has no arm std.
export RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc
export CARGO_TARGET_DIR=${OUTPOST_CROSS_TARGET_DIR:-$PWD/target/cross}
exec /usr/bin/cargo "$subcommand" --target "$triple" "$@"

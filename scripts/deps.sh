# Sourced by the other scripts: installs what building and testing Outpost
# needs on Debian 12, only when it is missing.
set -euo pipefail

need_apt=()
for pkg in libseccomp-dev pkg-config busybox-static skopeo docker-registry runc mosquitto gcc iproute2 e2fsprogs nftables faketime; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need_apt+=("$pkg")
done
if ! command -v cargo >/dev/null 2>&1 && [ ! -x "$HOME/.cargo/bin/cargo" ]; then
    # No rustup toolchain: Debian's newer Rust packages (bookworm-updates).
    need_apt+=(rustc-web cargo-web)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "missing packages: ${need_apt[*]}; run this script as root, or install them with apt-get" >&2
        exit 1
    fi
    echo "==> installing ${need_apt[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# Cross builds for arm (scripts/release.sh, scripts/cross-cargo.sh,
# hw-tests/tests/arm.rs): Debian's rustc-web/cargo-web, whose std comes
# packaged for each Debian arch given (arm64, armhf), that arch's gcc and
# libseccomp (the agent links it), and qemu-user to run what was built
# (Debian 12's 7.2 runs it: arm.rs says which libraries it must load).
# release.sh calls it for the arches it builds; the test suite for arm64 (below).
cross_deps() {
    local arch gnu pkg need=() add_arch=() foreign
    # Read once: `dpkg ... | grep -q` could fail on SIGPIPE under pipefail.
    foreign=$(dpkg --print-foreign-architectures)
    for arch in "$@"; do
        case "$arch" in
            arm64) gnu=aarch64-linux-gnu ;;
            armhf) gnu=arm-linux-gnueabihf ;;
            *) echo "cross_deps: no cross set-up for the Debian arch $arch (arm64, armhf)" >&2; return 1 ;;
        esac
        grep -qx "$arch" <<<"$foreign" || add_arch+=("$arch")
        need+=("libstd-rust-web-dev:$arch" "gcc-$gnu" "libseccomp-dev:$arch" "libc6:$arch")
    done
    local missing=()
    for pkg in rustc-web cargo-web qemu-user-static "${need[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && [ ${#add_arch[@]} -eq 0 ] && return 0
    if [ "$(id -u)" -ne 0 ]; then
        echo "missing packages: ${missing[*]} (dpkg --add-architecture ${add_arch[*]:-}); run this script as root, or install them with apt-get" >&2
        return 1
    fi
    for arch in "${add_arch[@]}"; do
        dpkg --add-architecture "$arch"
    done
    [ ${#missing[@]} -gt 0 ] || return 0
    echo "==> installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}
# scripts/test.sh runs hw-tests/tests/arm.rs, which cross-builds the agent for
# aarch64 and runs it under qemu-user, on x86_64 hosts (on an arm64 host the
# suite runs the native agent and arm.rs is not compiled): the arm64 set, on a
# machine with none of it about 240 packages, 375 MiB to download and half a
# minute to unpack, nothing after. The scripts that only build or run Outpost
# (quickstart.sh, the examples) do not take it.
if [ "${BASH_SOURCE[1]##*/}" = test.sh ] && [ "$(uname -m)" = x86_64 ]; then
    cross_deps arm64
fi
[ -d "$HOME/.cargo/bin" ] && export PATH="$HOME/.cargo/bin:$PATH"
true

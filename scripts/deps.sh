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
[ -d "$HOME/.cargo/bin" ] && export PATH="$HOME/.cargo/bin:$PATH"
true

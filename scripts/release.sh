#!/usr/bin/env bash
# Release artifacts: edge-agent and hub, stripped, for x86_64 (the rustup
# toolchain), aarch64 (Raspberry Pi 3/4/5 with a 64-bit OS) and armv7 (32-bit
# Raspberry Pi OS), both cross-built with Debian's rustc-web/cargo-web
# (scripts/cross-cargo.sh, into target/cross). Writes dist/<arch>/{edge-agent,
# hub,SHA256SUMS} and dist/systemd/edge-agent.service. Run on an x86_64
# Debian 12, as root the first time: it installs what it needs
# (scripts/deps.sh, and its cross_deps for the arm arches).
#
#   scripts/release.sh                  # x86_64 aarch64 armv7
#   scripts/release.sh aarch64          # only the arches named
#
# A binary that fails to build for an arch is reported loudly at the end
# (exit 1); the others are built all the same.
set -euo pipefail
cd "$(dirname "$0")/.."

arches=("$@")
[ ${#arches[@]} -gt 0 ] || arches=(x86_64 aarch64 armv7)
debian_arches=()
for arch in "${arches[@]}"; do
    case "$arch" in
        x86_64) ;;
        aarch64) debian_arches+=(arm64) ;;
        armv7) debian_arches+=(armhf) ;;
        *) echo "release.sh: unknown arch $arch (x86_64, aarch64, armv7)" >&2; exit 2 ;;
    esac
done

source scripts/deps.sh
if [ ${#debian_arches[@]} -gt 0 ]; then
    cross_deps "${debian_arches[@]}"
fi

mkdir -p dist/logs
failed=()
timings=()
for arch in "${arches[@]}"; do
    case "$arch" in
        x86_64) triple=x86_64-unknown-linux-gnu strip=strip ;;
        aarch64) triple=aarch64-unknown-linux-gnu strip=aarch64-linux-gnu-strip ;;
        armv7) triple=armv7-unknown-linux-gnueabihf strip=arm-linux-gnueabihf-strip ;;
    esac
    out=dist/$arch
    rm -rf "$out"
    mkdir -p "$out"
    # One binary per cargo run: each gets only its own dependencies' features
    # (the size it has when built alone), and one that cannot be built for
    # this arch leaves the other.
    for bin in edge-agent hub; do
        log=dist/logs/$arch-$bin.log
        echo "==> building $bin for $arch (release; log: $log)"
        start=$SECONDS
        args=(build --release --locked -p "$bin" --bin "$bin")
        status=0
        if [ "$arch" = x86_64 ]; then
            # The normal toolchain and target dir, as the quickstart builds them.
            built=${CARGO_TARGET_DIR:-target}/release
            cargo "${args[@]}" >"$log" 2>&1 || status=$?
        else
            built=${OUTPOST_CROSS_TARGET_DIR:-target/cross}/$triple/release
            scripts/cross-cargo.sh "$triple" "${args[@]}" >"$log" 2>&1 || status=$?
        fi
        if [ "$status" -ne 0 ]; then
            echo "!!! $bin for $arch: the build FAILED; the errors in $log:" >&2
            grep -E '^error' "$log" | sort | uniq -c | head -n 10 >&2 || tail -n 15 "$log" >&2
            failed+=("$bin for $arch")
            continue
        fi
        timings+=("$bin for $arch: $((SECONDS - start)) s")
        cp "$built/$bin" "$out/$bin"
        # The release profile strips already (strip = true); the target's own
        # strip makes sure, whatever the profile says.
        "$strip" "$out/$bin"
    done
    (cd "$out" && find . -maxdepth 1 -type f ! -name SHA256SUMS -printf '%f\n' | sort | xargs -r sha256sum > SHA256SUMS)
done

mkdir -p dist/systemd
cp packaging/systemd/edge-agent.service dist/systemd/

echo "==> dist/"
for arch in "${arches[@]}"; do
    for bin in edge-agent hub; do
        [ -f "dist/$arch/$bin" ] || continue
        bytes=$(stat -c %s "dist/$arch/$bin")
        awk -v a="$arch" -v b="$bin" -v n="$bytes" 'BEGIN { printf "  %-8s %-10s %6.2f MiB (%d bytes)\n", a, b, n / 1048576, n }'
    done
done
printf '  build time: %s\n' "${timings[@]}"
if [ ${#failed[@]} -gt 0 ]; then
    printf '!!! NOT BUILT: %s\n' "${failed[@]}" >&2
    echo "!!! (logs in dist/logs/; whatever did build is in dist/)" >&2
    exit 1
fi

#!/usr/bin/env bash
# The offline-site demo (docs/federation.md): a cloud hub on this machine, a
# site hub and a device (a real edge-agent running a real container) each in
# a network namespace of their own. The operator rolls a deployment out from
# the cloud; then the WAN link between cloud and site goes down
# (`ip link set DEV down`): the site keeps running, and its operator restarts
# the workload and reads the device's events on site; then the link comes
# back and the cloud catches up with what happened. Run as root on Debian 12;
# everything it makes is removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
if [ "$(id -u)" -ne 0 ]; then
    echo "the demo makes network namespaces and runs containers: run it as root" >&2
    exit 1
fi

echo "==> building edge-agent, hub and ota (release)"
cargo build --release --quiet -p edge-agent -p hub -p ota -p outpost-examples \
    --bin edge-agent --bin hub --bin ota --bin busybox-image
bin=$(pwd)/${CARGO_TARGET_DIR:-target}/release
work=$(mktemp -d /tmp/outpost-offline-site.XXXXXX)
site_ns=outpost-demo-site
dev_ns=outpost-demo-dev
pids=()

cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    done
    # The workload outlives its agent (its shim): remove it too.
    for name in $("$bin/edge-agent" --data-dir "$work/device" --run-dir "$work/device-run" ps --json 2>/dev/null |
        grep -o '"name": *"[^"]*"' | cut -d'"' -f4); do
        "$bin/edge-agent" --data-dir "$work/device" --run-dir "$work/device-run" rm "$name" >/dev/null 2>&1 || true
    done
    ip netns del "$site_ns" 2>/dev/null || true
    ip netns del "$dev_ns" 2>/dev/null || true
    ip link del outpost-wan 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

step() { printf '\n==> %s\n' "$*"; }

step "the network: cloud (this host, 10.214.1.1) --WAN-- site (10.214.1.2 | 10.214.2.1) --LAN-- device (10.214.2.2)"
for ns in "$site_ns" "$dev_ns"; do
    ip netns del "$ns" 2>/dev/null || true
    ip netns add "$ns"
    ip -n "$ns" link set lo up
done
ip link del outpost-wan 2>/dev/null || true
ip link add outpost-wan type veth peer name outpost-wan-s
ip link set outpost-wan-s netns "$site_ns"
ip addr add 10.214.1.1/24 dev outpost-wan && ip link set outpost-wan up
ip -n "$site_ns" addr add 10.214.1.2/24 dev outpost-wan-s && ip -n "$site_ns" link set outpost-wan-s up
ip -n "$site_ns" link add outpost-lan type veth peer name outpost-lan-d
ip -n "$site_ns" link set outpost-lan-d netns "$dev_ns"
ip -n "$site_ns" addr add 10.214.2.1/24 dev outpost-lan && ip -n "$site_ns" link set outpost-lan up
ip -n "$dev_ns" addr add 10.214.2.2/24 dev outpost-lan-d && ip -n "$dev_ns" link set outpost-lan-d up

step "the operator's keys and root (on a real fleet they stay on the operator's machine)"
"$bin/ota" keygen --out "$work/root.key" >/dev/null
"$bin/ota" keygen --out "$work/deployments.key" >/dev/null
"$bin/ota" new-root --root-key "$work/root.key" --deployments-key "$work/deployments.key" --out "$work/root.json"

step "the cloud hub, on this host"
cat > "$work/cloud.toml" <<TOML
data-dir = "$work/cloud"
http = "10.214.1.1:18180"
mqtt-listen = "10.214.1.1:18830"
trust-root = "$work/root.json"
[sites]
shop-12 = "site-token"
TOML
"$bin/hub" serve --config "$work/cloud.toml" > "$work/cloud.log" 2>&1 &
pids+=($!)

step "the site hub, in the site's namespace"
cat > "$work/site.toml" <<TOML
data-dir = "$work/site"
http = "0.0.0.0:8080"
mqtt-listen = "0.0.0.0:1883"
[devices]
till-1 = "device-token"
[upstream]
mqtt = "mqtt://10.214.1.1:18830"
site = "shop-12"
token = "site-token"
http = "http://10.214.1.1:18180"
TOML
# nsenter execs the program: $! is the hub's own pid.
nsenter --net="/run/netns/$site_ns" -- "$bin/hub" serve --config "$work/site.toml" > "$work/site.log" 2>&1 &
pids+=($!)

step "the device: an edge-agent in the device's namespace, with a small busybox image"
cat > "$work/agent.toml" <<TOML
device-id = "till-1"
hub = "mqtt://10.214.2.1:1883"
hub-token = "device-token"
trust-root = "$work/root.json"
report-interval = "1s"
TOML
agent=("$bin/edge-agent" --config "$work/agent.toml" --data-dir "$work/device" --run-dir "$work/device-run")
"$bin/busybox-image" "$work/image" busybox:demo >/dev/null
"${agent[@]}" import "$work/image" >/dev/null
nsenter --net="/run/netns/$dev_ns" -- "${agent[@]}" daemon > "$work/agent.log" 2>&1 &
pids+=($!)

cloud=("$bin/hub" --hub-url http://10.214.1.1:18180)
site=(nsenter --net="/run/netns/$site_ns" -- "$bin/hub" --hub-url http://127.0.0.1:8080)
wait_for() {
    local what=$1; shift
    for _ in $(seq 1 600); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.2
    done
    echo "$what did not happen; logs in $work" >&2
    tail -n 20 "$work"/*.log >&2
    exit 1
}
wait_for "the device known at the cloud through its site" \
    bash -c "$(printf '%q ' "${cloud[@]}") devices --json | grep -q '\"site\": \"shop-12\"'"
"${cloud[@]}" devices

step "the operator applies a signed deployment at the cloud; it reaches the device through the site"
digest=$(grep -o 'sha256:[0-9a-f]\{64\}' "$work/image/index.json" | head -n 1)
cat > "$work/shop-web.toml" <<TOML
name = "shop-web"
[strategy]
waves = ["100%"]
min-healthy = "2s"
[[workloads]]
name = "shop-web"
image = "busybox:demo@$digest"
command = ["/bin/sh", "-c", "while true; do date; sleep 5; done"]
stop-grace-period = "1s"
TOML
"${cloud[@]}" apply -f "$work/shop-web.toml" --key "$work/deployments.key"
"${cloud[@]}" rollout watch shop-web --timeout 120s

step "the WAN goes down (ip link set outpost-wan down)"
ip link set outpost-wan down
sleep 2
echo "--- at the site, its operator sees the device running and restarts the workload:"
"${site[@]}" devices
"${site[@]}" restart till-1 shop-web
sleep 3
"${site[@]}" events till-1 | tail -n 5
echo "--- the device runs on:"
"${agent[@]}" ps
echo "--- the cloud cannot see any of it yet: its view of the device is as the cut left it."
"${cloud[@]}" devices

step "the WAN comes back (ip link set outpost-wan up); the site's link notices and reconnects"
ip link set outpost-wan up
wait_for "the cloud catching up" bash -c \
    "[ \"\$($(printf '%q ' "${cloud[@]}") devices --json | grep -o '\"report_seq\": [0-9]*')\" = \
       \"\$($(printf '%q ' "${site[@]}") devices --json | grep -o '\"report_seq\": [0-9]*')\" ]"
echo "--- the cloud now has what happened on site, each event once:"
"${cloud[@]}" devices
"${cloud[@]}" events till-1 | tail -n 5
step "done; cleaning up"

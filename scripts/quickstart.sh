#!/usr/bin/env bash
# Quickstart: builds Outpost, starts a hub (with its embedded MQTT broker) and
# an agent on this machine, and has the operator set, through the hub, the
# demo workload the agent then runs. Run as root on Debian 12.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
if [ "$(id -u)" -ne 0 ]; then
    echo "edge-agent runs containers (namespaces, cgroups, mounts): run the quickstart as root" >&2
    exit 1
fi

echo "==> building edge-agent, hub and ota (release)"
cargo build --release --quiet -p edge-agent -p hub -p ota -p outpost-examples \
    --bin edge-agent --bin hub --bin ota --bin busybox-image
bin=${CARGO_TARGET_DIR:-target}/release
agent=$bin/edge-agent
hub=$bin/hub
ota=$bin/ota
qs=/var/lib/outpost-quickstart
mkdir -p "$qs"

# A re-run starts from the same place: stop what the last one started.
for name in hub agent; do
    if [ -f "$qs/$name.pid" ] && kill "$(cat "$qs/$name.pid")" 2>/dev/null; then
        echo "==> stopped the previous quickstart $name"
        sleep 1
    fi
done

# The operator's keys and root: nothing runs on the device unless the
# deployments key signed it. Kept across re-runs; the agent trusts the root it
# first stored. On a real fleet the keys stay on the operator's machine.
if [ ! -f "$qs/root.json" ]; then
    echo "==> making the operator's keys and root ($qs/keys, $qs/root.json)"
    mkdir -p "$qs/keys"
    $ota keygen --out "$qs/keys/root.key" > /dev/null
    $ota keygen --out "$qs/keys/deployments.key" > /dev/null
    $ota new-root --root-key "$qs/keys/root.key" --deployments-key "$qs/keys/deployments.key" --out "$qs/root.json"
fi

device=quickstart-device
[ -f "$qs/token" ] || head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$qs/token"
token=$(cat "$qs/token")
cat > "$qs/hub.toml" <<TOML
data-dir = "$qs/hub"
http = "127.0.0.1:18080"
mqtt-listen = "127.0.0.1:18830"
trust-root = "$qs/root.json"
[devices]
$device = "$token"
TOML
cat > "$qs/agent.toml" <<TOML
device-id = "$device"
hub = "mqtt://127.0.0.1:18830"
hub-token = "$token"
report-interval = "1s"
trust-root = "$qs/root.json"
TOML
export OUTPOST_HUB_URL=http://127.0.0.1:18080

echo "==> starting the hub (log: $qs/hub.log)"
nohup $hub serve --config "$qs/hub.toml" > "$qs/hub.log" 2>&1 &
echo $! > "$qs/hub.pid"

echo "==> making the image busybox:quickstart from this machine's busybox-static, and importing it"
$bin/busybox-image /tmp/outpost-quickstart-image busybox:quickstart
$agent --config "$qs/agent.toml" import /tmp/outpost-quickstart-image

echo "==> starting the agent (log: $qs/agent.log)"
nohup $agent --config "$qs/agent.toml" daemon > "$qs/agent.log" 2>&1 &
echo $! > "$qs/agent.pid"

for _ in $(seq 1 50); do
    $hub devices --json 2>/dev/null | grep -q '"online": true' && break
    sleep 0.2
done
$hub devices

echo "==> the operator signs the device's desired state and sets it through the hub (examples/quickstart/desired.toml)"
# The image is pinned by the digest of the manifest just built, so the
# signature covers the image's content too.
digest=$(grep -o 'sha256:[0-9a-f]\{64\}' /tmp/outpost-quickstart-image/index.json | head -n 1)
generation=$(date +%s)
sed -e "s/^generation = .*/generation = $generation/" -e "s/^revision = .*/revision = $generation/" \
    -e "s/@sha256:[0-9a-f]*/@$digest/" examples/quickstart/desired.toml > "$qs/desired.toml"
$hub set-desired $device -f "$qs/desired.toml" --key "$qs/keys/deployments.key"
$hub watch $device --timeout 120s

echo "==> the workload's web page, from the device:"
busybox wget -qO- http://127.0.0.1:8088/
echo "==> its logs:"
$agent --config "$qs/agent.toml" logs hello --tail 3
cat <<TXT

The hub and the agent keep running in the background; the workload runs under
its own shim and keeps running even when the agent stops.
  OUTPOST_HUB_URL=$OUTPOST_HUB_URL $hub devices                 # the fleet, as the hub sees it
  $agent --config $qs/agent.toml ps             # the device's workloads
  $agent --config $qs/agent.toml events         # applied, healthy, failed, rolled back
  kill \$(cat $qs/hub.pid) \$(cat $qs/agent.pid)  # stop both (the workload stays)
TXT

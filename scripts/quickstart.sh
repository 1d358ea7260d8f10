#!/usr/bin/env bash
# Quickstart: builds edge-agent, makes a small busybox image, imports it and
# runs a workload from examples/quickstart/hello.toml. Run as root on Debian 12.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
if [ "$(id -u)" -ne 0 ]; then
    echo "edge-agent runs containers (namespaces, cgroups, mounts): run the quickstart as root" >&2
    exit 1
fi

echo "==> building edge-agent (release)"
cargo build --release --quiet -p edge-agent -p outpost-examples --bin edge-agent --bin busybox-image
agent=target/release/edge-agent
export OUTPOST_DATA_DIR=${OUTPOST_DATA_DIR:-/var/lib/outpost}
export OUTPOST_RUN_DIR=${OUTPOST_RUN_DIR:-/run/outpost}

echo "==> making the image busybox:quickstart from this machine's busybox-static"
target/release/busybox-image /tmp/outpost-quickstart-image busybox:quickstart
$agent import /tmp/outpost-quickstart-image

if $agent rm hello >/dev/null 2>&1; then
    echo "==> removed the previous quickstart workload"
fi
echo "==> running examples/quickstart/hello.toml"
$agent run -f examples/quickstart/hello.toml
for _ in $(seq 1 20); do
    $agent ps --json | grep -q '"health": "healthy"' && break
    sleep 0.5
done
$agent ps
echo "==> its web page, from the device:"
busybox wget -qO- http://127.0.0.1:8088/
echo "==> its logs:"
$agent logs hello --tail 5
cat <<TXT

The workload runs under its own shim and keeps running if edge-agent stops.
  $agent ps                 # state, health, restarts
  $agent logs -f hello      # follow its output
  $agent stop hello         # SIGTERM, grace period, SIGKILL
  $agent rm hello           # remove it (named volumes stay)
TXT

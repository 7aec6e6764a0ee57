#!/usr/bin/env bash
# A small demo lab, no root needed: two Linux network stacks, each in its
# own user + network namespace with a tap device, plugged into a ulan lan
# through vde_plug, ping each other through ulan's userspace switch.
# Then a port is moved to another lan at runtime and the ping stops.
set -euo pipefail
cd "$(dirname "$0")/.."
ULAN=${ULAN:-target/release/ulan}
export ULAN_LAB=${ULAN_LAB:-demo}
pids=()

cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    "$ULAN" stop >/dev/null 2>&1 || true
}
trap cleanup EXIT

# A host: a namespace whose tap u0 is plugged into the ulan port at $1.
host() { # port-path mac address command...
    local port=$1 mac=$2 addr=$3
    shift 3
    unshare --user --map-root-user --net sh -c '
        vde_plug "vde://$0" tap://u0 & plug=$!
        for i in $(seq 100); do ip link show u0 >/dev/null 2>&1 && break; sleep 0.05; done
        ip link set u0 address "$1" && ip link set u0 up && ip addr add "$2/24" dev u0
        shift 2; "$@"; rc=$?; kill $plug; exit $rc' "$port" "$mac" "$addr" "$@"
}

echo "== starting the daemon for lab $ULAN_LAB"
"$ULAN" daemon --detach
"$ULAN" lan add office
"$ULAN" lan add lab
h1=$("$ULAN" --json port add h1 --kind vde --lan office | sed -n 's/.*"path": "\(.*\)".*/\1/p')
h2=$("$ULAN" --json port add h2 --kind vde --lan office | sed -n 's/.*"path": "\(.*\)".*/\1/p')

echo "== h2 (10.99.0.2) waits in its own namespace; h1 (10.99.0.1) pings it"
host "$h2" 02:00:00:00:00:02 10.99.0.2 sleep 120 &
pids+=($!)
sleep 1
host "$h1" 02:00:00:00:00:01 10.99.0.1 ping -c 3 -i 0.2 10.99.0.2

echo; "$ULAN" port ls
echo; "$ULAN" fdb office

echo; echo "== moving h2 to lan 'lab': the ping must fail now"
"$ULAN" port move h2 lab
if host "$h1" 02:00:00:00:00:01 10.99.0.1 ping -c 2 -i 0.2 -W 1 10.99.0.2 >/dev/null; then
    echo "unexpected: h2 still answers from another lan" >&2
    exit 1
fi
echo "no answer, as expected"
"$ULAN" port move h2 office
host "$h1" 02:00:00:00:00:01 10.99.0.1 ping -c 2 -i 0.2 10.99.0.2 | tail -2

echo; "$ULAN" port stats h2 | head -12
echo; echo "== demo done; stopping the daemon"

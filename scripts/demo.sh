#!/usr/bin/env bash
# The demo lab, no root needed: three QEMU guests of ulan's built-in image
# (made here from this machine's kernel, busybox and iperf3), two lans and
# a router between them, all wired through ulan's userspace switch.
# h1 pings h2 across the router; moving r1's right-hand NIC to another lan
# at runtime cuts them apart, moving it back joins them again.
set -euo pipefail
cd "$(dirname "$0")/.."
ULAN=${ULAN:-target/release/ulan}
export ULAN_LAB=${ULAN_LAB:-demo}

cleanup() { "$ULAN" down >/dev/null 2>&1 || true; }
trap cleanup EXIT

echo "== ulan doctor"
"$ULAN" doctor || true

echo; echo "== the built-in guest image (built once, then reused)"
"$ULAN" image build

echo; echo "== ulan up examples/router.yaml (lab $ULAN_LAB)"
"$ULAN" up examples/router.yaml

echo; echo "== h1 (10.0.1.10, lan left) pings h2 (10.0.2.10, lan right) through r1"
"$ULAN" exec h1 -- ping -c 3 10.0.2.10

echo; echo "== moving r1's NIC on the right to a new lan 'elsewhere': no route now"
"$ULAN" lan add elsewhere
"$ULAN" port move r1.eth1 elsewhere
if "$ULAN" exec h1 -- ping -c 2 -W 1 10.0.2.10 >/dev/null; then
    echo "unexpected: h2 still answers" >&2
    exit 1
fi
echo "no answer, as expected"
"$ULAN" port move r1.eth1 right
"$ULAN" exec h1 -- ping -c 2 10.0.2.10 | tail -2
"$ULAN" lan rm elsewhere

echo; echo "== ulan ls"
"$ULAN" ls

echo; echo "== ulan save (the running lab as a lab file)"
"$ULAN" save

echo; echo "== ulan down"
trap - EXIT
"$ULAN" down

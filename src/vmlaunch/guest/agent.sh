#!/bin/sh
# ulan's exec agent, on the virtio-serial port named org.ulan.agent.
# Host to guest: "PING <id>\n", or "EXEC <id> <timeout_s> <len>\n" and
# <len> bytes of shell command line. Guest to host: "PONG <id>\n", or
# "RESULT <id> <exit> <outlen> <errlen>\n", stdout bytes, stderr bytes.
# A command killed at its timeout exits 137 (SIGKILL).
dev=
for p in /sys/class/virtio-ports/vport*; do
    [ "$(cat "$p/name" 2>/dev/null)" = org.ulan.agent ] && dev=/dev/$(basename "$p")
done
if [ -z "$dev" ]; then
    # No agent port in this guest: stay idle rather than respawn in a loop.
    exec sleep 2147483647
fi
exec 3<>"$dev"
while :; do
    # With no host connected the port reads as end of file: wait, retry.
    if ! read -r verb id a b <&3; then
        sleep 0.2
        continue
    fi
    case "$verb" in
    PING) printf 'PONG %s\n' "$id" >&3 ;;
    EXEC)
        head -c "$b" <&3 >/tmp/.agent.cmd
        # The command leads its own process group, so the watchdog's kill at
        # the timeout takes whatever it started with it.
        setsid sh /tmp/.agent.cmd </dev/null >/tmp/.agent.out 2>/tmp/.agent.err &
        pid=$!
        setsid sh -c "sleep $a; kill -KILL -- -$pid" >/dev/null 2>&1 &
        watchdog=$!
        wait "$pid"
        rc=$?
        kill -KILL -- "-$watchdog" 2>/dev/null
        printf 'RESULT %s %s %s %s\n' "$id" "$rc" \
            "$(wc -c </tmp/.agent.out)" "$(wc -c </tmp/.agent.err)" >&3
        cat /tmp/.agent.out /tmp/.agent.err >&3
        rm -f /tmp/.agent.cmd /tmp/.agent.out /tmp/.agent.err
        ;;
    esac
done

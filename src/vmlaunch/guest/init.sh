#!/bin/sh
# /init of ulan's built-in guest image (PID 1, busybox sh).
# Mounts, loads the virtio modules, configures the network from the kernel
# command line (ulan.hostname=, ulan.ip=MAC,CIDR, ulan.route=DEST,VIA,
# ulan.forward=1), then hands over to busybox init, which runs a shell on
# the console, the exec agent and the power-button watcher.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
bb=/bin/busybox
$bb mount -t proc proc /proc
$bb mount -t sysfs sys /sys
$bb mount -t devtmpfs dev /dev
$bb mkdir -p /dev/pts /dev/shm
$bb mount -t devpts devpts /dev/pts
$bb mount -t tmpfs tmp /tmp
$bb mount -t tmpfs run /run
# The applets as commands (needs /proc to find busybox itself).
$bb --install -s /bin

for m in $(cat /lib/modules/order); do
    insmod "/lib/modules/$m.ko" 2>/dev/null
done

ip link set lo up

# The interface with MAC $1 (lower case), waiting briefly for it to appear.
ifname_of() {
    for _ in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do
        for d in /sys/class/net/*; do
            if [ "$(cat "$d/address" 2>/dev/null)" = "$1" ]; then
                basename "$d"
                return 0
            fi
        done
        sleep 0.1
    done
    return 1
}

for d in /sys/class/net/*; do
    n=$(basename "$d")
    [ "$n" = lo ] || ip link set "$n" up
done

hostname=ulan
forward=0
for word in $(cat /proc/cmdline); do
    case "$word" in
    ulan.hostname=*) hostname=${word#ulan.hostname=} ;;
    ulan.forward=1) forward=1 ;;
    ulan.ip=*)
        v=${word#ulan.ip=}
        mac=${v%%,*}
        cidr=${v#*,}
        if dev=$(ifname_of "$mac"); then
            ip addr add "$cidr" dev "$dev"
        else
            echo "ulan-init: no interface with MAC $mac for $cidr"
        fi
        ;;
    esac
done
# Routes after every address, so their gateways are reachable.
for word in $(cat /proc/cmdline); do
    case "$word" in
    ulan.route=*)
        v=${word#ulan.route=}
        ip route add "${v%%,*}" via "${v#*,}" || echo "ulan-init: cannot add route $v"
        ;;
    esac
done
hostname "$hostname"
echo "$hostname" >/etc/hostname
echo "127.0.0.1 localhost $hostname" >/etc/hosts
echo "$forward" >/proc/sys/net/ipv4/ip_forward

echo "ulan-init: ready"
exec /bin/busybox init

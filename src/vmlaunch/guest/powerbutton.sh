#!/bin/sh
# Powers the guest off when the ACPI power button is pressed (QMP
# system_powerdown): any event from a "Power Button" input device.
# (evdev refuses reads shorter than one event: 24 bytes on x86_64.)
for i in /sys/class/input/input*; do
    [ "$(cat "$i/name" 2>/dev/null)" = "Power Button" ] || continue
    for e in "$i"/event*; do
        [ -e "$e" ] || continue
        (dd if="/dev/input/$(basename "$e")" bs=24 count=1 of=/dev/null 2>/dev/null && poweroff -f) &
    done
done
wait
exec sleep 2147483647

#!/bin/sh
# /init of Strata's Linux test guest (busybox). Loads the virtio modules in dependency order,
# then runs the test named by strata.test= on the kernel command line against /dev/vda and
# reports on the console; every line the host checks starts with "STRATA ".
#   strata.test=disk  read the host's pattern (1 MiB at 0), write ours (1 MiB at 1 MiB), sync,
#                     discard 1 MiB at 2 MiB, report the serial (GET_ID)
#   strata.test=fio   run fio on /dev/vda (and /dev/vdb when present) per strata.fio= options
#   strata.test=powerbutton  wait for the ACPI power button (the input device the kernel's
#                     button driver makes for it, as acpid or systemd-logind would), then say
#                     so and power off
#   strata.test=net   (no disk) give eth0 the address strata.addr=A/N, ping strata.peer=P three
#                     times, then run iperf3 to P (port 5201) and from P (-R, port 5202) for
#                     strata.secs= seconds (3 when not given); needs initramfs-net.gz
PATH=/bin
echo "STRATA init"   # the first sign of /init, for boot-time benchmarks (benches/vmm_kvm.sh)
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules.order); do
    insmod "/lib/modules/$m" || echo "STRATA insmod-failed $m"
done
test_name=$(sed -n 's/.*strata\.test=\([a-z]*\).*/\1/p' /proc/cmdline)
arg() { # the value of strata.NAME= on the kernel command line
    sed -n "s/.*strata\.$1=\([^ ]*\).*/\1/p" /proc/cmdline
}
if [ "$test_name" != net ]; then
    n=0
    while [ ! -b /dev/vda ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
    if [ ! -b /dev/vda ]; then
        echo "STRATA FAIL no /dev/vda"
        poweroff -f
    fi
    echo "STRATA disk $(cat /sys/block/vda/size) sectors, serial '$(cat /sys/block/vda/serial 2>/dev/null)'"
fi

pattern() { # the guest's pattern: 1 MiB of a repeated line
    yes "strata guest pattern 0123456789abcdef" | head -c 1048576
}

case "$test_name" in
disk)
    echo "STRATA host-data $(dd if=/dev/vda bs=65536 count=16 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)"
    pattern > /tmp/p
    dd if=/tmp/p of=/dev/vda bs=65536 seek=16 oflag=direct conv=fsync 2>/dev/null \
        && echo "STRATA wrote $(sha256sum < /tmp/p | cut -d' ' -f1)" \
        || echo "STRATA FAIL write"
    if blkdiscard -o 2097152 -l 1048576 /dev/vda 2>/dev/null; then
        echo "STRATA discarded"
    else
        echo "STRATA discard-unsupported"
    fi
    sync
    echo "STRATA readback $(dd if=/dev/vda bs=65536 skip=16 count=16 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)"
    ;;
powerbutton)
    ev=""
    n=0
    while [ -z "$ev" ] && [ $n -lt 100 ]; do
        for d in /sys/class/input/event*; do
            [ "$(cat "$d/device/name" 2>/dev/null)" = "Power Button" ] && ev=$(basename "$d")
        done
        [ -n "$ev" ] || { sleep 0.1; n=$((n + 1)); }
    done
    if [ -z "$ev" ]; then
        echo "STRATA FAIL no power button input device"
    else
        echo "STRATA waiting-for-power-button $ev"
        # One input event (24 bytes on x86-64) is the key press.
        dd if=/dev/input/$ev of=/dev/null bs=24 count=1 2>/dev/null
        echo "STRATA power-button pressed"
    fi
    ;;
fio)
    opts=$(sed -n 's/.*strata\.fio=\([^ ]*\).*/\1/p' /proc/cmdline | tr ':' ' ')
    for d in vda vdb; do
        [ -b /dev/$d ] || continue
        echo "STRATA fio $d $(fio --name=$d --filename=/dev/$d --direct=1 --ioengine=libaio \
            --rw=randread --bs=4k --runtime=10 --time_based --output-format=terse $opts \
            | cut -d';' -f8)"
    done
    ;;
net)
    addr=$(arg addr)
    peer=$(arg peer)
    secs=$(arg secs)
    [ -n "$secs" ] || secs=3
    n=0
    while [ ! -e /sys/class/net/eth0 ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
    if [ ! -e /sys/class/net/eth0 ]; then
        echo "STRATA FAIL no eth0"
    else
        ip link set lo up
        ip addr add "$addr" dev eth0
        ip link set eth0 up
        echo "STRATA nic eth0 $(cat /sys/class/net/eth0/address) features $(cat /sys/class/net/eth0/device/features 2>/dev/null)"
        echo "STRATA address $(ip -4 addr show dev eth0 | awk '/inet / {print $2}')"
        got=$(ping -c 3 -W 5 "$peer" | sed -n 's/.* \([0-9]*\) packets received.*/\1/p')
        echo "STRATA ping ${got:-0}/3"
        for dir in send recv; do
            if [ $dir = send ]; then flags="-p 5201"; else flags="-p 5202 -R"; fi
            if iperf3 -c "$peer" $flags -t "$secs" -f m > /tmp/iperf 2>&1; then
                echo "STRATA iperf3-$dir $(awk '/receiver/ {print $7, $8}' /tmp/iperf)"
            else
                echo "STRATA FAIL iperf3-$dir"
                sed 's/^/STRATA iperf3: /' /tmp/iperf
            fi
        done
    fi
    ;;
*)
    echo "STRATA FAIL unknown test '$test_name'"
    ;;
esac
echo "STRATA done"
sync
poweroff -f

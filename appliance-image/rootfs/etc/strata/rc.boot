#!/bin/sh
# Brings the installed Strata appliance up: kernel file systems, drivers, /boot, host name and
# network, from /etc/strata/appliance.conf (written by `strata install`).
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
# The boot initramfs hands over /dev (devtmpfs) already mounted.
mount -t proc proc /proc
mount -t sysfs sysfs /sys
grep -q ' /dev ' /proc/mounts || mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=0755 tmpfs /run
mount -t tmpfs -o mode=1777 tmpfs /tmp
. /etc/strata/appliance.conf

/usr/lib/strata/coldplug
[ -d /sys/firmware/efi ] && modprobe -q efivarfs &&
  mount -t efivarfs efivarfs /sys/firmware/efi/efivars 2>/dev/null
hostname "$HOSTNAME"
if [ -n "$BOOT_UUID" ]; then
  modprobe -q vfat
  dev=$(findfs "UUID=$BOOT_UUID" 2>/dev/null)
  if [ -n "$dev" ]; then
    mount -t vfat -o umask=0077 "$dev" /boot
  else
    echo "strata: boot file system UUID=$BOOT_UUID not found; /boot is not mounted"
  fi
fi

ip link set lo up
case "$NETWORK" in
  dhcp)
    for path in /sys/class/net/*; do
      ifc=${path##*/}
      [ "$ifc" = lo ] && continue
      [ "$INTERFACE" = auto ] || [ "$INTERFACE" = "$ifc" ] || continue
      ip link set "$ifc" up
      # -b: go on in the background when no lease comes at once; renews the lease later.
      udhcpc -b -S -i "$ifc" -p "/run/udhcpc.$ifc.pid" -s /etc/strata/udhcpc.script >/dev/null 2>&1
    done
    ;;
  static)
    ip link set "$INTERFACE" up
    ip addr add "$ADDRESS" dev "$INTERFACE"
    [ -z "$GATEWAY" ] || ip route add default via "$GATEWAY"
    : >/etc/resolv.conf
    for ns in $(echo "$DNS" | tr ',' ' '); do echo "nameserver $ns" >>/etc/resolv.conf; done
    ;;
esac
addresses=$(ip -4 -o addr show scope global 2>/dev/null | awk '{print $4}' | tr '\n' ' ')
uptime=$(cut -d' ' -f1 /proc/uptime)
echo "strata: $HOSTNAME is up after ${uptime} s; the API listens on $LISTEN (addresses: ${addresses:-none yet})"

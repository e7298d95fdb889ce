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

# VM networks: taps (/dev/net/tun appears once tun is loaded) and bridges.
modprobe -q -a tun bridge

ip link set lo up
# The management bridge, as Proxmox VE's vmbr0: the management interface (with `auto`, the
# first Ethernet interface) becomes its port and its address goes on the bridge, so that VMs on
# the network "$BRIDGE" share the management LAN.
bridged=""
if [ -n "$BRIDGE" ] && [ "$NETWORK" != none ]; then
  port=$INTERFACE
  if [ "$port" = auto ]; then
    port=""
    for path in /sys/class/net/*; do
      [ -e "$path/device" ] && { port=${path##*/}; break; }
    done
  fi
  if [ -z "$port" ] || [ ! -e "/sys/class/net/$port" ]; then
    echo "strata: no interface ${port:-found} for the bridge $BRIDGE"
  elif ip link add "$BRIDGE" type bridge && ip link set "$port" master "$BRIDGE"; then
    # The bridge keeps the port's MAC address, so a DHCP server sees the same host.
    ip link set "$BRIDGE" address "$(cat "/sys/class/net/$port/address")"
    ip link set "$port" up
    ip link set "$BRIDGE" up
    bridged=$port
  else
    echo "strata: could not make the bridge $BRIDGE with $port; its address stays on $port"
  fi
fi
case "$NETWORK" in
  dhcp)
    for path in /sys/class/net/*; do
      ifc=${path##*/}
      [ "$ifc" = lo ] && continue
      if [ -n "$bridged" ]; then
        # The bridge carries the bridged interface's address; other interfaces as before.
        [ "$ifc" = "$bridged" ] && continue
        [ "$ifc" = "$BRIDGE" ] || [ "$INTERFACE" = auto ] || continue
        [ "$ifc" = "$BRIDGE" ] || [ -e "$path/device" ] || continue
      else
        [ "$INTERFACE" = auto ] || [ "$INTERFACE" = "$ifc" ] || continue
      fi
      ip link set "$ifc" up
      # -b: go on in the background when no lease comes at once; renews the lease later.
      udhcpc -b -S -i "$ifc" -p "/run/udhcpc.$ifc.pid" -s /etc/strata/udhcpc.script >/dev/null 2>&1
    done
    ;;
  static)
    dev=$INTERFACE
    [ -z "$bridged" ] || dev=$BRIDGE
    ip link set "$dev" up
    ip addr add "$ADDRESS" dev "$dev"
    [ -z "$GATEWAY" ] || ip route add default via "$GATEWAY"
    : >/etc/resolv.conf
    for ns in $(echo "$DNS" | tr ',' ' '); do echo "nameserver $ns" >>/etc/resolv.conf; done
    ;;
esac
if [ -n "$bridged" ]; then
  # Recorded once as a network (adopted: Strata did not make it and never deletes it).
  strata --data /var/lib/strata networks show "$BRIDGE" >/dev/null 2>&1 ||
    strata --data /var/lib/strata networks create "$BRIDGE" --bridge "$BRIDGE" >/dev/null ||
    echo "strata: could not record the network $BRIDGE"
fi
addresses=$(ip -4 -o addr show scope global 2>/dev/null | awk '{print $4}' | tr '\n' ' ')
uptime=$(cut -d' ' -f1 /proc/uptime)
echo "strata: $HOSTNAME is up after ${uptime} s; the API listens on $LISTEN (addresses: ${addresses:-none yet})"

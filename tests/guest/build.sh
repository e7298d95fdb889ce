#!/bin/bash
# Builds the Linux test guest for tiers 2 and 3 from Debian packages only:
#   - Debian's kernel (linux-image-6.1.0-*-amd64), fetched with `apt-get download` and unpacked
#     with `dpkg-deb -x` into the build folder (never installed on the host), with depmod run
#     there;
#   - a busybox-static initramfs whose /init loads the virtio modules in dependency order (as
#     `modprobe --show-depends` gives it), exercises the disks and reports on the serial console.
#   - optionally (STRATA_GUEST_FIO=1) fio and the libraries ldd lists, for in-guest benchmarks;
#   - optionally (STRATA_GUEST_NET=1) iperf3 and the libraries ldd lists, for network tests.
#
# Usage: tests/guest/build.sh [OUT_DIR]   (default: build/guest in the repository)
# Output: OUT_DIR/vmlinuz, OUT_DIR/initramfs.gz (OUT_DIR/initramfs-fio.gz with fio,
# OUT_DIR/initramfs-net.gz with iperf3).
# Needs: apt-get (with lists: run `apt-get update` once), dpkg-deb, kmod (depmod, modprobe),
# cpio, gzip. Re-running reuses downloaded packages.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
out="${1:-$repo/build/guest}"
mkdir -p "$out/debs"
out="$(cd "$out" && pwd)"

need() { command -v "$1" >/dev/null || { echo "build.sh: $1 is missing (apt-get install $2)" >&2; exit 1; }; }
need dpkg-deb dpkg
need depmod kmod
need modprobe kmod
need cpio cpio
need gzip gzip

kpkg="$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')"
if [ -z "$kpkg" ]; then
    echo "build.sh: cannot find Debian's kernel package (run apt-get update first)" >&2
    exit 1
fi
kver="${kpkg#linux-image-}"

fetch() { # package -> path of the .deb in $out/debs
    local deb
    deb="$(ls "$out/debs/$1"_*.deb 2>/dev/null | head -n1 || true)"
    if [ -z "$deb" ]; then
        (cd "$out/debs" && apt-get download "$1" 2>&1 >/dev/null | grep -v "unsandboxed" >&2 || true)
        deb="$(ls "$out/debs/$1"_*.deb | head -n1)"
    fi
    echo "$deb"
}

root="$out/kernel-root"
if [ ! -f "$root/boot/vmlinuz-$kver" ]; then
    rm -rf "$root"
    dpkg-deb -x "$(fetch "$kpkg")" "$root"
fi
depmod -b "$root" "$kver"
cp "$root/boot/vmlinuz-$kver" "$out/vmlinuz"

bb="$out/busybox-root"
if [ ! -x "$bb/bin/busybox" ]; then
    rm -rf "$bb"
    dpkg-deb -x "$(fetch busybox-static)" "$bb"
fi

make_initramfs() { # name, then the host tools to copy in with their libraries
    local stage="$out/stage-$1"
    rm -rf "$stage"
    mkdir -p "$stage"/{bin,sbin,dev,proc,sys,tmp,mnt,lib/modules}
    cp "$bb/bin/busybox" "$stage/bin/busybox"
    for applet in sh mount umount insmod dd sync poweroff reboot cat echo sha256sum md5sum \
        head tail yes blkdiscard sleep grep ls mkdir tr cut wc seq hexdump cmp awk sed uname \
        date true false test [ printf ip ping kill; do
        ln -sf busybox "$stage/bin/$applet"
    done
    # virtio-pci for QEMU (tier 2), virtio-mmio for Strata's VMM (tier 3), virtio-blk and
    # virtio-net for both; the ACPI button driver and evdev for the power-button test (built in
    # on some kernels, in which case modprobe lists nothing to load).
    : > "$stage/modules.order"
    # (one module per call: modprobe takes further words as module parameters)
    for m in virtio_pci virtio_mmio virtio_blk virtio_net button evdev; do
        modprobe -d "$root" -S "$kver" --show-depends "$m"
    done | awk '$1 == "insmod" {print $2}' | while read -r ko; do
            if ! grep -qxF "$(basename "$ko")" "$stage/modules.order"; then
                cp "$ko" "$stage/lib/modules/"
                basename "$ko" >> "$stage/modules.order"
            fi
        done
    cp "$here/init.sh" "$stage/init"
    chmod +x "$stage/init"
    local name="$1" tool
    shift
    for tool in "$@"; do
        need "$tool" "$tool"
        cp "$(command -v "$tool")" "$stage/bin/$tool"
        ldd "$(command -v "$tool")" | awk '/=> \// {print $3} /^\t\/lib/ {print $1}' | while read -r lib; do
            mkdir -p "$stage$(dirname "$lib")"
            cp -L "$lib" "$stage$lib"
        done
    done
    (cd "$stage" && find . | cpio -o -H newc --quiet | gzip -1) > "$out/$name.gz"
    rm -rf "$stage"
}

make_initramfs initramfs
if [ "${STRATA_GUEST_FIO:-0}" = 1 ]; then
    make_initramfs initramfs-fio fio
fi
if [ "${STRATA_GUEST_NET:-0}" = 1 ]; then
    make_initramfs initramfs-net iperf3
fi
echo "build.sh: kernel $kver, guest in $out"

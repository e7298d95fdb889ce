#!/usr/bin/env bash
# Builds strata-appliance.iso: a BIOS+UEFI bootable installer for the Strata appliance.
#
#   appliance-image/build.sh [--strata BIN] [--answers FILE] [--out ISO] [--work DIR]
#                            [--grub-timeout SECONDS]
#
# Everything in the image comes from Debian packages fetched with `apt-get download` and
# unpacked with `dpkg-deb -x` into a build folder (nothing is installed on the host), plus the
# `strata` binary of this workspace. See appliance-image/README.md for the layout and the
# answer-file format. Needs on the host: apt-get, dpkg-deb, depmod (kmod), cpio, gzip,
# readelf/strip (binutils), grub-mkrescue (grub-common, grub-pc-bin, grub-efi-amd64-bin),
# xorriso, mtools and xz-utils (grub-mkrescue --compress=xz runs xz).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
strata_bin=""
answers=""
out="$PWD/strata-appliance.iso"
work=""
grub_timeout=5

die() { echo "build.sh: $*" >&2; exit 1; }
step() { echo "== [$(( $(date +%s) - started )) s] $*" >&2; }

while [ $# -gt 0 ]; do
  case "$1" in
    --strata) strata_bin=$2; shift 2 ;;
    --answers) answers=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --work) work=$2; shift 2 ;;
    --grub-timeout) grub_timeout=$2; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done

for tool in apt-get apt-cache dpkg-deb depmod cpio gzip xz readelf strip grub-mkrescue xorriso mformat; do
  command -v "$tool" >/dev/null || die "$tool is missing; install the packages listed in appliance-image/README.md"
done
# grub-mkrescue quietly leaves out a platform whose modules are missing: require both.
[ -d /usr/lib/grub/i386-pc ] || die "GRUB's BIOS modules are missing (apt-get install grub-pc-bin)"
[ -d /usr/lib/grub/x86_64-efi ] ||
  die "GRUB's UEFI modules are missing (apt-get install grub-efi-amd64-bin)"
[ -z "$answers" ] || [ -f "$answers" ] || die "answer file $answers does not exist"
case "$grub_timeout" in ''|*[!0-9]*) die "--grub-timeout needs a number of seconds" ;; esac

started=$(date +%s)
target_dir=${CARGO_TARGET_DIR:-$repo/target}
if [ -z "$strata_bin" ]; then
  step "building strata (release)"
  (cd "$repo" && cargo build --release -j2 -p strata-cli --bin strata)
  strata_bin=$target_dir/release/strata
fi
[ -x "$strata_bin" ] || die "strata binary $strata_bin not found or not executable"
strata_bin=$(cd "$(dirname "$strata_bin")" && pwd)/$(basename "$strata_bin")
answers=${answers:+$(cd "$(dirname "$answers")" && pwd)/$(basename "$answers")}
mkdir -p "$(dirname "$out")"
out=$(cd "$(dirname "$out")" && pwd)/$(basename "$out")

# A fresh build folder every time: nothing is cached between builds.
work=${work:-$target_dir/appliance}
rm -rf "$work"
mkdir -p "$work"/{debs,pkgs,rootfs,bootfs,iso/boot/grub,iso/strata}
work=$(cd "$work" && pwd)
pkgs=$work/pkgs rootfs=$work/rootfs bootfs=$work/bootfs iso=$work/iso

# --- Debian packages ------------------------------------------------------------------------
# Tools the installer and the appliance run, besides busybox (the shell and core utilities):
#   gdisk (sgdisk) partitions, e2fsprogs and dosfstools make the file systems, grub2-common
#   (grub-install) with grub-pc-bin and grub-efi-amd64-bin installs the boot loader.
tools=(busybox-static gdisk e2fsprogs dosfstools grub2-common grub-common grub-pc-bin grub-efi-amd64-bin)
kernel_pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
[ -n "$kernel_pkg" ] || die "cannot resolve linux-image-amd64 to a kernel package (run apt-get update)"
# Shared libraries the tools need: every lib* package in their dependency closure (the ELF
# check below fails the build if one is still missing).
libs=$(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
         --no-replaces --no-enhances "${tools[@]}" libgcc-s1 libc6 |
       awk '/^lib/ {print}' | sort -u)
step "downloading $kernel_pkg, ${tools[*]} and $(echo "$libs" | wc -w) libraries"
# (apt warns that root downloads unsandboxed into a folder _apt cannot read: expected here.)
if ! (cd "$work/debs" && apt-get download -qq "$kernel_pkg" "${tools[@]}" $libs) 2>"$work/apt.log"; then
  grep -v 'unsandboxed as root' "$work/apt.log" >&2
  die "apt-get download failed (is the Debian mirror reachable, and apt-get update done?)"
fi
grep -v 'unsandboxed as root' "$work/apt.log" >&2 || true
step "unpacking $(ls "$work"/debs | wc -l) packages"
for deb in "$work"/debs/*.deb; do dpkg-deb -x "$deb" "$pkgs"; done
kver=${kernel_pkg#linux-image-}
[ -f "$pkgs/boot/vmlinuz-$kver" ] || die "kernel package $kernel_pkg has no vmlinuz-$kver"

# --- helpers ----------------------------------------------------------------------------------
# Resolves a path inside $pkgs, following symlinks (absolute ones relative to $pkgs).
resolve_in_pkgs() {
  local p=$1 n=0 t
  while [ -L "$pkgs$p" ]; do
    t=$(readlink "$pkgs$p")
    case "$t" in /*) p=$t ;; *) p=$(dirname "$p")/$t ;; esac
    n=$((n + 1)); [ $n -lt 20 ] || die "symlink loop at $1"
  done
  [ -e "$pkgs$p" ] || return 1
  echo "$p"
}

# find_lib SONAME: the library's path inside $pkgs.
find_lib() {
  local d
  for d in /lib/x86_64-linux-gnu /usr/lib/x86_64-linux-gnu /lib /usr/lib; do
    if resolve_in_pkgs "$d/$1" >/dev/null; then echo "$d/$1"; return 0; fi
  done
  return 1
}

# add_libs ROOT FILE...: copies the shared libraries (and the loader) the ELF files need into
# ROOT, recursively. Fails the build when one cannot be found in the packages.
add_libs() {
  local root=$1; shift
  local queue=("$@") f lib src interp
  while [ ${#queue[@]} -gt 0 ]; do
    f=${queue[0]}; queue=("${queue[@]:1}")
    [ ! -L "$f" ] && readelf -h "$f" >/dev/null 2>&1 || continue
    interp=$(readelf -l "$f" 2>/dev/null | sed -n 's/.*Requesting program interpreter: \(.*\)]/\1/p')
    if [ -n "$interp" ] && [ ! -e "$root$interp" ]; then
      src=$(resolve_in_pkgs "$interp") || die "loader $interp not in the packages"
      mkdir -p "$root$(dirname "$interp")"
      cp "$pkgs$src" "$root$interp"
    fi
    for lib in $(readelf -d "$f" 2>/dev/null | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'); do
      [ -e "$root/lib/x86_64-linux-gnu/$lib" ] && continue
      src=$(find_lib "$lib") || die "$(basename "$f") needs $lib, which no downloaded package has"
      mkdir -p "$root/lib/x86_64-linux-gnu"
      cp "$pkgs$(resolve_in_pkgs "$src")" "$root/lib/x86_64-linux-gnu/$lib"
      queue+=("$root/lib/x86_64-linux-gnu/$lib")
    done
  done
}

# add_busybox ROOT: busybox with a symlink for each applet.
add_busybox() {
  local root=$1 applet
  mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin}
  cp "$pkgs/bin/busybox" "$root/bin/busybox"
  for applet in $("$root/bin/busybox" --list-full); do
    [ -e "$root/$applet" ] || ln -s /bin/busybox "$root/$applet"
  done
}

# add_modules ROOT FILTER: the modules of modules.list (all, or those tagged "boot") and their
# dependencies, then depmod for the subset.
add_modules() {
  local root=$1 filter=$2 name file dep
  local moddir=lib/modules/$kver
  mkdir -p "$root/$moddir"
  while read -r name tag; do
    [ -n "$name" ] && [ "${name#\#}" = "$name" ] || continue
    [ "$filter" = all ] || [ "$tag" = boot ] || continue
    # Module files use - and _ interchangeably (nls_iso8859-1.ko); compare with _ only.
    file=$(awk -F: -v want="${name//-/_}" '{n=$1; sub(/.*\//, "", n); sub(/\.ko.*/, "", n)
           gsub(/-/, "_", n); if (n == want) {print $1; exit}}' "$pkgs/$moddir/modules.dep")
    [ -n "$file" ] || die "kernel module $name (modules.list) is not in $kernel_pkg"
    for dep in $file $(awk -F: -v f="$file" '$1 == f {print $2}' "$pkgs/$moddir/modules.dep"); do
      mkdir -p "$root/$moddir/$(dirname "$dep")"
      cp "$pkgs/$moddir/$dep" "$root/$moddir/$dep"
    done
  done <"$here/modules.list"
  cp "$pkgs/$moddir"/modules.{order,builtin,builtin.modinfo} "$root/$moddir/"
  depmod -b "$root" "$kver"
}

# make_cpio DIR OUT: a gzip-compressed newc initramfs of DIR, files owned by root.
make_cpio() {
  (cd "$1" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet | gzip -6) >"$2"
}

# --- the appliance's root file system (the live installer and the installed system) -------
step "assembling the root file system"
depmod -b "$pkgs" "$kver"
add_busybox "$rootfs"
# Real tools replace busybox's reduced applets of the same name.
for f in sbin/sgdisk sbin/mke2fs sbin/e2fsck sbin/tune2fs sbin/mkfs.fat sbin/fsck.fat \
         usr/sbin/grub-install usr/sbin/grub-probe usr/bin/grub-mkimage usr/bin/grub-editenv; do
  src=$(resolve_in_pkgs "/$f") || die "$f is not in the downloaded packages"
  rm -f "$rootfs/$f"; mkdir -p "$rootfs/$(dirname "$f")"
  cp "$pkgs$src" "$rootfs/$f"
done
for alias in mkfs.ext4:mke2fs fsck.ext4:e2fsck mkfs.vfat:mkfs.fat fsck.vfat:fsck.fat; do
  rm -f "$rootfs/sbin/${alias%%:*}"; ln -s "${alias#*:}" "$rootfs/sbin/${alias%%:*}"
done
# GRUB's modules for both platforms (grub-install builds the core images from them); the
# prebuilt monolithic EFI images are not used by grub-install.
mkdir -p "$rootfs/usr/lib/grub" "$rootfs/usr/share/grub"
cp -a "$pkgs/usr/lib/grub/i386-pc" "$rootfs/usr/lib/grub/"
cp -a "$pkgs/usr/lib/grub/x86_64-efi" "$rootfs/usr/lib/grub/"
rm -rf "$rootfs/usr/lib/grub/x86_64-efi/monolithic"
cp "$pkgs/usr/share/grub/unicode.pf2" "$rootfs/usr/share/grub/"
# Strata itself, without debug information.
mkdir -p "$rootfs/usr/bin"
strip --strip-debug -o "$rootfs/usr/bin/strata" "$strata_bin"
add_libs "$rootfs" "$rootfs"/sbin/* "$rootfs"/usr/sbin/* "$rootfs"/usr/bin/strata \
  "$rootfs"/usr/bin/grub-* "$rootfs"/usr/lib/grub/i386-pc/grub-*
add_modules "$rootfs" all
cp -a "$here/rootfs/." "$rootfs/"
mkdir -p "$rootfs"/{proc,sys,dev,run,tmp,mnt,root,boot,var/lib/strata,var/log}
chmod 1777 "$rootfs/tmp"; chmod 700 "$rootfs/root"
version=$("$rootfs/usr/bin/strata" --version | awk '{print $2}')
media_id="strata-$version-$(date -u +%Y%m%dT%H%M%SZ)-$(od -An -N4 -tx4 /dev/urandom | tr -d ' ')"
cat >"$rootfs/etc/os-release" <<EOF
NAME="Strata appliance"
ID=strata
VERSION_ID=$version
PRETTY_NAME="Strata appliance $version"
KERNEL_PACKAGE=$kernel_pkg
EOF
echo "$media_id" >"$rootfs/etc/strata/media-id"
echo "$kver" >"$rootfs/etc/strata/kernel-version"

# --- the installed system's boot initramfs: find and mount the root file system -----------
step "assembling the boot initramfs"
add_busybox "$bootfs"
add_modules "$bootfs" boot
cp "$here/bootfs/init" "$bootfs/init"
cp "$here/rootfs/usr/lib/strata/coldplug" "$bootfs/coldplug"
mkdir -p "$bootfs"/{proc,sys,dev,newroot}

# --- the ISO ---------------------------------------------------------------------------------
step "building the initramfs images and the ISO"
cp "$here/live/init" "$rootfs/init"
make_cpio "$rootfs" "$iso/boot/initrd.img"
rm "$rootfs/init"
make_cpio "$bootfs" "$iso/boot/initrd-disk.img"
cp "$pkgs/boot/vmlinuz-$kver" "$iso/boot/vmlinuz"
echo "$media_id" >"$iso/strata/media-id"
[ -z "$answers" ] || cp "$answers" "$iso/strata/answers.conf"
sed -e "s/@TIMEOUT@/$grub_timeout/" -e "s/@VERSION@/$version/" "$here/grub/grub.cfg" \
  >"$iso/boot/grub/grub.cfg"
rm -f "$out"
step "grub-mkrescue"
grub-mkrescue --compress=xz -o "$out" "$iso" -- -volid STRATA_INSTALL 2>"$work/grub-mkrescue.log" ||
  { cat "$work/grub-mkrescue.log" >&2; die "grub-mkrescue failed"; }
size=$(stat -c %s "$out")
root_kib=$(du -sk "$rootfs" | cut -f1)
echo "built $out: $((size / 1024 / 1024)) MiB ($size bytes), root file system $((root_kib / 1024)) MiB" \
  "unpacked, kernel $kver, strata $version, $(($(date +%s) - started)) s" >&2

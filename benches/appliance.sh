#!/usr/bin/env bash
# Appliance ISO figures: ISO size and build, install and boot-to-API times, taken
# from the end-to-end test (tests/tests/appliance_iso.rs, QEMU TCG). With --peer, also builds a
# debootstrap --variant=minbase root on this machine in the same run — the alternative to the
# busybox root the ISO uses — and prints both sizes and their ratio.
#
#   benches/appliance.sh [--peer]      (as root; --peer needs the debootstrap package)
set -euo pipefail
cd "$(dirname "$0")/.."
peer=0
[ "${1:-}" = --peer ] && peer=1
log=$(mktemp)
cargo build -j2 -p strata-cli --bin strata
cargo test -j2 -p strata-tests --test appliance_iso -- --nocapture >"$log" 2>&1 || true
grep -E '^(== |built |appliance-iso results)' "$log" || true
grep -q 'test result: ok' "$log" || { echo "appliance test failed; its output is in $log" >&2; exit 1; }
ours=$(sed -n 's/.*root file system \([0-9]*\) MiB unpacked.*/\1/p' "$log" | tail -n 1)
if [ "$peer" = 1 ]; then
  command -v debootstrap >/dev/null || { echo "--peer needs debootstrap (apt-get install debootstrap)" >&2; exit 1; }
  dir=$(mktemp -d)
  started=$(date +%s)
  debootstrap --variant=minbase bookworm "$dir/root" http://deb.debian.org/debian >"$dir/log" 2>&1 ||
    { cat "$dir/log" >&2; exit 1; }
  secs=$(( $(date +%s) - started ))
  theirs=$(du -sm "$dir/root" | cut -f1)
  rm -rf "$dir"
  echo "root file system: busybox root (ours, with kernel modules, GRUB, tools and strata) ${ours} MiB;" \
       "debootstrap minbase (no kernel modules, GRUB or strata) ${theirs} MiB, built in ${secs} s;" \
       "ratio $(awk -v a="$ours" -v b="$theirs" 'BEGIN {printf "%.2f", a / b}')x"
fi
rm -f "$log"

#!/usr/bin/env bash
# In-guest fio under QEMU: Strata's vhost-user-blk back-end (/dev/vda) against QEMU's own
# virtio-blk with aio=io_uring,cache=none (/dev/vdb) on the same file, in the same guest and the
# same run (fio runs on vda, then vdb, alternating over rounds). 4k random reads at the given
# depth. Under TCG (PVM hosts) the guest is CPU-bound at a few thousand IOPS: the figures check
# function and relative overhead, not the device's speed.
#
# Usage: benches/vmm_qemu_fio.sh [--rounds N] [--depth D] [--file PATH] [--strata BIN]
# Needs qemu-system-x86 and qemu-utils, fio, and what tests/guest/build.sh needs.
set -euo pipefail

rounds=2
depth=32
file=""
strata=""
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) rounds=$2; shift 2 ;;
    --depth) depth=$2; shift 2 ;;
    --file) file=$2; shift 2 ;;
    --strata) strata=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done

root=$(cd "$(dirname "$0")/.." && pwd)
need_strata=1
# shellcheck source=benches/vmm_guest_setup.sh
. "$root/benches/vmm_guest_setup.sh"
sock=$work/vu.sock
# Hardware KVM where it can run Linux; TCG on PVM hosts and where /dev/kvm is missing.
accel=tcg
if [ -w /dev/kvm ] && [ ! -d /sys/module/kvm_pvm ]; then accel=kvm; fi

ours=()
peer=()
for r in $(seq 1 "$rounds"); do
  rm -f "$sock"
  "$strata" vhost-user-blk --socket "$sock" --disk "$file,readonly=on,queues=1" &
  backend=$!
  for _ in $(seq 50); do [ -S "$sock" ] && break; sleep 0.1; done
  log=$work/qemu-fio-$r.log
  timeout 600 qemu-system-x86_64 -accel "$accel" -M q35,memory-backend=mem -m 1G \
    -object memory-backend-memfd,id=mem,size=1G,share=on \
    -nographic -no-reboot -nodefaults -serial stdio \
    -kernel "$guest/vmlinuz" -initrd "$guest/initramfs-fio.gz" \
    -append "console=ttyS0 panic=-1 quiet strata.test=fio strata.fio=--iodepth=$depth" \
    -chardev socket,id=vu0,path="$sock" -device vhost-user-blk-pci,chardev=vu0,num-queues=1 \
    -drive file="$file",if=none,id=peer,format=raw,aio=io_uring,cache.direct=on,readonly=on \
    -device virtio-blk-pci,drive=peer > "$log" 2>&1 || true
  wait "$backend" || true
  a=$(grep -a "STRATA fio vda" "$log" | awk '{print $4}' | tr -d '\r')
  b=$(grep -a "STRATA fio vdb" "$log" | awk '{print $4}' | tr -d '\r')
  if [ -z "$a" ] || [ -z "$b" ]; then
    echo "round $r: no fio result; see $log" >&2
    exit 1
  fi
  echo "round $r: strata vhost-user-blk $a IOPS, QEMU aio=io_uring $b IOPS" >&2
  ours+=("$a")
  peer+=("$b")
done
python3 - "$depth" "${ours[*]}" "${peer[*]}" <<'PY'
import statistics, sys
depth, ours, peer = sys.argv[1], [float(x) for x in sys.argv[2].split()], [float(x) for x in sys.argv[3].split()]
o, p = statistics.median(ours), statistics.median(peer)
print(f"| in-guest fio 4k randread QD{depth} | {o:.0f} | {p:.0f} | {o/p:.2f}x |")
PY

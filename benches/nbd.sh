#!/usr/bin/env bash
# NBD benchmark: `strata nbd serve` against `qemu-nbd --cache=none --aio=io_uring` serving the
# same 1 GiB raw file and the same 1 GiB qcow2 file, the two servers alternating round by round
# in the same run. Rows: fio's nbd engine (libnbd, one connection) 4k random read and write at
# QD1 and QD32, and nbdcopy of the whole 1 GiB out (export to null:) and in (a local file to
# the export, with a final flush). Prints every figure, the median per server and the ratio
# (strata / qemu-nbd; higher is better for both IOPS and MiB/s). Usage:
#   benches/nbd.sh [--rounds N] [--seconds S] [--strata BIN]
# Needs fio, qemu-utils (qemu-nbd, qemu-img), libnbd-bin (nbdcopy, nbdinfo) and python3.
set -euo pipefail

rounds=2
seconds=8
strata=""
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) rounds=$2; shift 2 ;;
    --seconds) seconds=$2; shift 2 ;;
    --strata) strata=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done

root=$(cd "$(dirname "$0")/.." && pwd)
if [ -z "$strata" ]; then
  (cd "$root" && cargo build -q -j2 --release -p strata-cli)
  strata=$root/target/release/strata
fi
for t in fio qemu-nbd qemu-img nbdcopy nbdinfo python3; do
  command -v $t >/dev/null || { echo "$t is required (scripts/install-deps.sh)" >&2; exit 1; }
done
work=$root/benches/work
mkdir -p "$work"
raw=$work/nbd-1g.raw
qcow=$work/nbd-1g.qcow2
src=$work/nbd-src-1g.raw
if [ ! -f "$src" ] || [ "$(stat -c %s "$src")" -ne $((1 << 30)) ]; then
  echo "Filling $src with 1 GiB of random data..." >&2
  rm -f "$src"
  fio --name=fill --filename="$src" --size=1G --rw=write --bs=1M --ioengine=io_uring \
      --direct=1 --iodepth=8 --refill_buffers --output=/dev/null
fi
cp --sparse=never "$src" "$raw"
rm -f "$qcow"
qemu-img convert -f raw -O qcow2 -o preallocation=metadata "$src" "$qcow"

port=$((20000 + RANDOM % 20000))
results=$(mktemp)
pid=""
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; wait 2>/dev/null; rm -f "$results"; }
trap cleanup EXIT

start_server() { # server format file
  case "$1" in
    strata) "$strata" nbd serve "$3" --format "$2" --listen "127.0.0.1:$port" --name disk \
              >/dev/null 2>&1 & ;;
    qemu-nbd) qemu-nbd --cache=none --aio=io_uring -f "$2" -x disk -b 127.0.0.1 -p "$port" \
                --persistent --shared=8 "$3" >/dev/null 2>&1 & ;;
  esac
  pid=$!
  for _ in $(seq 100); do
    nbdinfo --size "nbd://127.0.0.1:$port/disk" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "$1 did not start" >&2
  exit 1
}

stop_server() {
  kill "$pid"; wait "$pid" 2>/dev/null || true; pid=""
}

fio_iops() { # rw depth
  fio --name=b --ioengine=nbd --uri="nbd://127.0.0.1:$port/disk" --size=1G --rw="$1" \
      --bs=4k --iodepth="$2" --runtime="$seconds" --time_based --randrepeat=0 \
      --output-format=json 2>/dev/null |
    # fio's nbd engine prints a line before the JSON.
    python3 -c 'import json,sys; t=sys.stdin.read(); j=json.loads(t[t.index("{"):])["jobs"][0]; print(round(j["read"]["iops"]+j["write"]["iops"]))'
}

copy_mib_s() { # from to
  local t0 t1
  t0=$(date +%s.%N)
  nbdcopy --flush "$1" "$2"
  t1=$(date +%s.%N)
  python3 -c "print(round(1024/($t1-$t0), 1))"
}

for round in $(seq "$rounds"); do
  for format in raw qcow2; do
    file=$raw; [ "$format" = qcow2 ] && file=$qcow
    order="strata qemu-nbd"; [ $((round % 2)) -eq 0 ] && order="qemu-nbd strata"
    for server in $order; do
      start_server "$server" "$format" "$file"
      u="nbd://127.0.0.1:$port/disk"
      for row in "randread 1" "randread 32" "randwrite 1" "randwrite 32"; do
        set -- $row
        v=$(fio_iops "$1" "$2")
        echo "$format|4k $1 QD$2 (IOPS)|$server|$v" | tee -a "$results" >&2
      done
      v=$(copy_mib_s "$u" null:)
      echo "$format|nbdcopy 1 GiB out (MiB/s)|$server|$v" | tee -a "$results" >&2
      v=$(copy_mib_s "$src" "$u")
      echo "$format|nbdcopy 1 GiB in (MiB/s)|$server|$v" | tee -a "$results" >&2
      stop_server
    done
  done
done

python3 - "$results" <<'EOF'
import statistics, sys
rows = {}
order = []
for line in open(sys.argv[1]):
    fmt, row, server, v = line.strip().split("|")
    key = (fmt, row)
    if key not in rows:
        rows[key] = {"strata": [], "qemu-nbd": []}
        order.append(key)
    rows[key][server].append(float(v))
print("| file | row | strata | qemu-nbd | ratio |")
print("|---|---|---:|---:|---:|")
for key in order:
    s = statistics.median(rows[key]["strata"])
    q = statistics.median(rows[key]["qemu-nbd"])
    runs = lambda xs: "/".join(f"{x:g}" for x in xs)
    print(f"| {key[0]} | {key[1]} | {s:g} ({runs(rows[key]['strata'])}) | "
          f"{q:g} ({runs(rows[key]['qemu-nbd'])}) | {s / q:.2f}x |")
EOF

#!/usr/bin/env bash
# Engine benchmark: `strata image bench` vs `fio --ioengine=io_uring --direct=1` on the same
# 1 GiB file, alternating run by run, for the rows the engine targets name. Prints each figure, the
# median per tool and the ratio (strata / fio). Usage:
#   benches/engine.sh [--rounds N] [--seconds S] [--file PATH] [--strata BIN]
# Needs fio and python3. The file is filled with random data first so that reads hit real blocks.
set -euo pipefail

rounds=3
seconds=5
file=""
strata=""
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) rounds=$2; shift 2 ;;
    --seconds) seconds=$2; shift 2 ;;
    --file) file=$2; shift 2 ;;
    --strata) strata=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done

root=$(cd "$(dirname "$0")/.." && pwd)
if [ -z "$strata" ]; then
  (cd "$root" && cargo build -q -j2 --release -p strata-cli)
  strata=$root/target/release/strata
fi
command -v fio >/dev/null || { echo "fio is required (apt-get install fio)" >&2; exit 1; }
work=$root/benches/work
mkdir -p "$work"
[ -n "$file" ] || file=$work/engine-1g.img
if [ ! -f "$file" ] || [ "$(stat -c %s "$file")" -ne $((1 << 30)) ]; then
  rm -f "$file"
  echo "Filling $file with 1 GiB of random data..." >&2
  fio --name=fill --filename="$file" --size=1G --rw=write --bs=1M --ioengine=io_uring \
      --direct=1 --iodepth=8 --refill_buffers --output=/dev/null
fi

# name | fio rw | bs | depth | strata flags
rows=(
  "4k randread QD1|randread|4k|1|--pattern rand"
  "4k randread QD32|randread|4k|32|--pattern rand"
  "4k randread QD32 (threads engine)|randread|4k|32|--pattern rand --engine threads"
  "4k randwrite QD32|randwrite|4k|32|--pattern rand -w"
  "1M seqread QD8|read|1M|8|--pattern seq"
  "1M seqwrite QD8|write|1M|8|--pattern seq -w"
)

fio_value() { # rw bs depth -> IOPS
  fio --name=b --filename="$file" --size=1G --rw="$1" --bs="$2" --iodepth="$3" \
      --ioengine=io_uring --direct=1 --runtime="$seconds" --time_based --randrepeat=0 \
      --output-format=json 2>/dev/null |
    python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]; print(j["read"]["iops"]+j["write"]["iops"])'
}

strata_value() { # bs depth flags -> ops/s
  # shellcheck disable=SC2086
  "$strata" image bench -s "$1" -d "$2" $3 --engine "${4:-auto}" --time "$seconds" --output json "$file" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["ops_per_sec"])'
}

median() { python3 -c 'import sys,statistics; print(statistics.median(float(x) for x in sys.argv[1:]))' "$@"; }

host=$(uname -r)
cpus=$(nproc)
echo "# engine benchmark: $(date -u +%Y-%m-%dT%H:%M:%SZ), kernel $host, $cpus CPUs, $rounds rounds x ${seconds}s, file $file"
printf '| %-36s | %12s | %12s | %6s |\n' "row" "strata ops/s" "fio ops/s" "ratio"
printf '|%s|%s|%s|%s|\n' "--------------------------------------" "--------------" "--------------" "--------"
for row in "${rows[@]}"; do
  IFS='|' read -r name rw bs depth flags <<<"$row"
  engine=auto
  case "$flags" in *"--engine threads"*) engine=threads; flags=${flags/--engine threads/} ;; esac
  s=(); f=()
  for _ in $(seq "$rounds"); do
    f+=("$(fio_value "$rw" "$bs" "$depth")")
    s+=("$(strata_value "$bs" "$depth" "$flags" "$engine")")
  done
  ms=$(median "${s[@]}"); mf=$(median "${f[@]}")
  ratio=$(python3 -c "print(f'{$ms/$mf:.2f}')")
  printf '| %-36s | %12.0f | %12.0f | %6s |\n' "$name" "$ms" "$mf" "${ratio}x"
  echo "    runs: strata ${s[*]} / fio ${f[*]}" >&2
done

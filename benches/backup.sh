#!/usr/bin/env bash
# Backup benchmark: `strata backup` vs `restic` and `borg` on the same image, in the
# same run, with comparable settings (local repository, compression on). Rows:
#   full backup        a fresh repository each, page cache dropped before each tool
#   1% incremental     after rewriting 1% of the image (41 random 1 MiB extents per 4 GiB):
#                      strata with the dirty ranges (what a volume's dirty bitmap supplies),
#                      strata without them (full re-read, dedup), restic's and borg's second run
#   restore            the latest snapshot to a new file, cache dropped first
# Prints each figure, the peer's, and the ratio (peer time / strata time: > 1 means strata is
# faster). Every restore is compared with the source. Usage:
#   benches/backup.sh [--size 4G] [--dir DIR] [--strata BIN] [--rounds N]
# Needs restic, borgbackup, python3; root to drop the page cache (otherwise the rows run warm and
# say so). The image: a third random, a third zeros (written, not holes), a third repetitive text.
set -euo pipefail

size=4G
dir=""
strata=""
rounds=1
while [ $# -gt 0 ]; do
  case "$1" in
    --size) size=$2; shift 2 ;;
    --dir) dir=$2; shift 2 ;;
    --strata) strata=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done

root=$(cd "$(dirname "$0")/.." && pwd)
if [ -z "$strata" ]; then
  (cd "$root" && cargo build -q -j2 --release -p strata-cli)
  strata=${CARGO_TARGET_DIR:-$root/target}/release/strata
fi
for tool in restic borg python3; do
  command -v $tool >/dev/null || { echo "$tool is required (apt-get install restic borgbackup python3)" >&2; exit 1; }
done
[ -n "$dir" ] || dir=$root/benches/work/backup
mkdir -p "$dir"
img=$dir/mixed.img
bytes=$(python3 -c "import sys; s=sys.argv[1]; m={'K':1<<10,'M':1<<20,'G':1<<30}; print(int(s[:-1])*m[s[-1]] if s[-1] in m else int(s))" "$size")
mib=$((bytes >> 20))
third=$(( (mib / 3) ))

drop_caches() {
  sync
  if echo 3 > /proc/sys/vm/drop_caches 2>/dev/null; then cold=cold; else cold=warm; fi
}

now() { date +%s.%N; }
elapsed() { python3 -c "import sys; print(f'{float(sys.argv[2])-float(sys.argv[1]):.2f}')" "$1" "$2"; }

make_image() {
  echo "Writing $img: ${third} MiB random, ${third} MiB zeros, rest repetitive text ($mib MiB)" >&2
  rm -f "$img"
  head -c $((third << 20)) /dev/urandom > "$img"
  head -c $((third << 20)) /dev/zero >> "$img"
  { yes "Strata backup benchmark: the quick brown fox jumps over the lazy dog 0123456789" || true; } |
    head -c $(( (mib - 2 * third) << 20 )) >> "$img"
}

# Rewrites 1% of the image in 1 MiB extents at random MiB offsets; writes the dirty-ranges file.
change_one_percent() { # base-snapshot
  python3 - "$img" "$dir/dirty" "$1" "$mib" <<'PY'
import os, random, sys
img, out, base, mib = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
n = max(1, round(mib / 100))
rnd = random.Random(7)
offs = sorted(rnd.sample(range(mib), n))
with open(img, "r+b") as f, open(out, "w") as d:
    d.write(f"base {base}\n")
    for o in offs:
        f.seek(o << 20)
        f.write(os.urandom(1 << 20))
        d.write(f"{o << 20} {1 << 20}\n")
PY
}

export RESTIC_PASSWORD=bench
export BORG_PASSPHRASE="" BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes BORG_RELOCATED_REPO_ACCESS_IS_OK=yes

declare -A T
row() { printf '| %-38s | %9s s | %9s s | %9s s | %7s | %7s |\n' "$@"; }

for round in $(seq 1 "$rounds"); do
  make_image
  sum=$(sha256sum < "$img" | cut -d' ' -f1)
  rm -rf "$dir/strata" "$dir/restic" "$dir/borg" "$dir/out-"*
  restic init -q --repository-version 2 -r "$dir/restic" >/dev/null
  borg init -e none "$dir/borg"

  drop_caches; t0=$(now)
  "$strata" backup create "$img" --store "$dir/strata" --id image/mixed -q --output json > "$dir/s1.json"
  t1=$(now); T[full_s]=$(elapsed "$t0" "$t1")
  first=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["snapshot"])' "$dir/s1.json")
  drop_caches; t0=$(now)
  (cd "$dir" && restic -q -r "$dir/restic" backup --compression auto mixed.img >/dev/null)
  t1=$(now); T[full_r]=$(elapsed "$t0" "$t1")
  drop_caches; t0=$(now)
  (cd "$dir" && borg create --compression zstd,3 "$dir/borg::one" mixed.img)
  t1=$(now); T[full_b]=$(elapsed "$t0" "$t1")

  change_one_percent "$first"
  sum2=$(sha256sum < "$img" | cut -d' ' -f1)
  drop_caches; t0=$(now)
  "$strata" backup create "$img" --store "$dir/strata" --id image/mixed -q --output json --dirty-ranges "$dir/dirty" > "$dir/s2.json"
  t1=$(now); T[inc_s]=$(elapsed "$t0" "$t1")
  drop_caches; t0=$(now)
  (cd "$dir" && restic -q -r "$dir/restic" backup --compression auto mixed.img >/dev/null)
  t1=$(now); T[inc_r]=$(elapsed "$t0" "$t1")
  drop_caches; t0=$(now)
  (cd "$dir" && borg create --compression zstd,3 "$dir/borg::two" mixed.img)
  t1=$(now); T[inc_b]=$(elapsed "$t0" "$t1")
  drop_caches; t0=$(now)
  "$strata" backup create "$img" --store "$dir/strata" --id image/mixed-nobitmap -q --output json > "$dir/s3.json"
  t1=$(now); T[inc_s_full]=$(elapsed "$t0" "$t1")

  drop_caches; t0=$(now)
  "$strata" backup restore image/mixed --store "$dir/strata" "$dir/out-strata.img" -q >/dev/null
  t1=$(now); T[res_s]=$(elapsed "$t0" "$t1")
  drop_caches; t0=$(now)
  restic -q -r "$dir/restic" restore latest --target "$dir/out-restic" >/dev/null
  t1=$(now); T[res_r]=$(elapsed "$t0" "$t1")
  drop_caches; t0=$(now)
  mkdir -p "$dir/out-borg" && (cd "$dir/out-borg" && borg extract "$dir/borg::two")
  t1=$(now); T[res_b]=$(elapsed "$t0" "$t1")

  for out in "$dir/out-strata.img" "$dir/out-restic/mixed.img" "$dir/out-borg/mixed.img"; do
    got=$(sha256sum < "$out" | cut -d' ' -f1)
    [ "$got" = "$sum2" ] || { echo "RESTORE MISMATCH: $out" >&2; exit 1; }
  done
  inc_mode=$(python3 -c 'import json,sys; m=json.load(open(sys.argv[1])); print(m["change-tracking"]["mode"], m["stats"]["bytes-read"]>>20, "MiB read")' "$dir/s2.json")
  read -r sread < <(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["stats"]["bytes-stored"]>>20)' "$dir/s1.json")
  ratio() { python3 -c "import sys; print(f'{float(sys.argv[1])/max(float(sys.argv[2]),1e-3):.1f}x')" "$1" "$2"; }

  echo
  echo "Round $round: $size image, page cache $cold; strata incremental: $inc_mode; strata stored ${sread} MiB on the full run"
  echo "Repository sizes: strata $(du -sm "$dir/strata" | cut -f1) MiB, restic $(du -sm "$dir/restic" | cut -f1) MiB, borg $(du -sm "$dir/borg" | cut -f1) MiB (after both backups)"
  echo
  row "row" "strata" "restic" "borg" "vs restic" "vs borg"
  echo "|----------------------------------------|-------------|-------------|-------------|-----------|---------|"
  row "full backup" "${T[full_s]}" "${T[full_r]}" "${T[full_b]}" "$(ratio "${T[full_r]}" "${T[full_s]}")" "$(ratio "${T[full_b]}" "${T[full_s]}")"
  row "1% incremental (dirty ranges)" "${T[inc_s]}" "${T[inc_r]}" "${T[inc_b]}" "$(ratio "${T[inc_r]}" "${T[inc_s]}")" "$(ratio "${T[inc_b]}" "${T[inc_s]}")"
  row "1% changed, no bitmap (full re-read)" "${T[inc_s_full]}" "${T[inc_r]}" "${T[inc_b]}" "$(ratio "${T[inc_r]}" "${T[inc_s_full]}")" "$(ratio "${T[inc_b]}" "${T[inc_s_full]}")"
  row "restore" "${T[res_s]}" "${T[res_r]}" "${T[res_b]}" "$(ratio "${T[res_r]}" "${T[res_s]}")" "$(ratio "${T[res_b]}" "${T[res_s]}")"
  rm -rf "$dir/out-"*
done

#!/usr/bin/env bash
# Restore benchmark: `strata backup restore` vs `restic restore` and `borg extract` of the same
# image, in the same run, and Strata's live restore. Rows:
#   strata, 1 worker           the snapshot to a new raw file, one fetch/decode/write worker
#   strata, default pool       the same with the default pool (four workers per core)
#   strata, ... copied chunks  the same two through the old copying path (blob read into a
#                              vector, decoded into another, copied into the write buffer), for
#                              the CPU seconds per GiB before and after the copy removal
#   restic restore, borg extract   the same data from their own repositories
#   live restore               `strata backups restore --live --no-wait` onto a volume, then
#                              `strata nbd serve` of it and a 4 KiB read by qemu-io: the time
#                              from the command to the first read served, a read at 3/4 of the
#                              disk (ahead of the background copy), and the time until the copy
#                              has finished (the restore record is gone)
# Every restored file and the live-restored volume are compared with the image (sha256).
# Prints wall seconds, MiB/s, CPU seconds (user+sys) and CPU s/GiB, and the ratio of the peers'
# times to strata's (> 1: strata is faster). Page caches are dropped before each row (root).
# Usage: benches/restore.sh [--size 4G] [--dir DIR] [--strata BIN]
# Needs restic, borgbackup, qemu-utils (qemu-io), python3, GNU time.
# The image: a third random, a third zeros (written, not holes), a third repetitive text.
set -euo pipefail

size=4G
dir=""
strata=""
while [ $# -gt 0 ]; do
  case "$1" in
    --size) size=$2; shift 2 ;;
    --dir) dir=$2; shift 2 ;;
    --strata) strata=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done

root=$(cd "$(dirname "$0")/.." && pwd)
if [ -z "$strata" ]; then
  (cd "$root" && cargo build -q -j2 --release -p strata-cli)
  strata=${CARGO_TARGET_DIR:-$root/target}/release/strata
fi
for tool in restic borg python3 qemu-io /usr/bin/time; do
  command -v $tool >/dev/null || { echo "$tool is required (apt-get install restic borgbackup qemu-utils python3 time)" >&2; exit 1; }
done
[ -n "$dir" ] || dir=$root/benches/work/restore
rm -rf "$dir"
mkdir -p "$dir"
img=$dir/mixed.img
data=$dir/data
bytes=$(python3 -c "import sys; s=sys.argv[1]; m={'K':1<<10,'M':1<<20,'G':1<<30}; print(int(s[:-1])*m[s[-1]] if s[-1] in m else int(s))" "$size")
mib=$((bytes >> 20))
third=$((mib / 3))
st() { "$strata" --data "$data" "$@"; }

cold=warm
drop_caches() {
  sync
  if echo 3 > /proc/sys/vm/drop_caches 2>/dev/null; then cold=cold; else cold=warm; fi
}
now() { date +%s.%N; }
elapsed() { python3 -c "import sys; print(f'{float(sys.argv[2])-float(sys.argv[1]):.2f}')" "$1" "$2"; }

echo "Writing $img: ${third} MiB random, ${third} MiB zeros, rest repetitive text ($mib MiB)" >&2
head -c $((third << 20)) /dev/urandom > "$img"
head -c $((third << 20)) /dev/zero >> "$img"
{ yes "Strata backup benchmark: the quick brown fox jumps over the lazy dog 0123456789" || true; } |
  head -c $(( (mib - 2 * third) << 20 )) >> "$img"
sum=$(sha256sum < "$img" | cut -d' ' -f1)

# Strata: the image on a volume of the appliance's own group, backed up into its datastore.
st init --pv-size $((3 * mib + 1024))M >/dev/null
st volumes create --size "${mib}M" strata/src >/dev/null
st volumes create --size "${mib}M" strata/dst >/dev/null
st image convert -n -f raw -O raw "$img" lv:strata/src
st backups create lv:strata/src -q >/dev/null
snap=volume/strata/src
# The peers: the same image file.
export RESTIC_PASSWORD=bench
export BORG_PASSPHRASE="" BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes BORG_RELOCATED_REPO_ACCESS_IS_OK=yes
restic init -q --repository-version 2 -r "$dir/restic" >/dev/null
(cd "$dir" && restic -q -r "$dir/restic" backup --compression auto mixed.img >/dev/null)
borg init -e none "$dir/borg"
(cd "$dir" && borg create --compression zstd,3 "$dir/borg::one" mixed.img)
rm -f "$img"

declare -A WALL CPU
# run NAME OUTPUT-FILE COMMAND...: cold cache, timed (wall, user+sys), output checked, removed.
run() {
  local name=$1 out=$2; shift 2
  drop_caches
  /usr/bin/time -f "%e %U %S" -o "$dir/time" "$@" >/dev/null
  read -r w u s < "$dir/time"
  WALL[$name]=$w
  CPU[$name]=$(python3 -c "import sys; print(f'{float(sys.argv[1])+float(sys.argv[2]):.2f}')" "$u" "$s")
  local got
  got=$(sha256sum < "$out" | cut -d' ' -f1)
  [ "$got" = "$sum" ] || { echo "RESTORE MISMATCH: $name ($out)" >&2; exit 1; }
  rm -rf "$dir/out"*
}

run s1 "$dir/out.img" "$strata" backup restore "$snap" --store "$data/datastore" "$dir/out.img" -q --threads 1
run sN "$dir/out.img" "$strata" backup restore "$snap" --store "$data/datastore" "$dir/out.img" -q
run c1 "$dir/out.img" "$strata" backup restore "$snap" --store "$data/datastore" "$dir/out.img" -q --threads 1 --copied-chunks
run cN "$dir/out.img" "$strata" backup restore "$snap" --store "$data/datastore" "$dir/out.img" -q --copied-chunks
run restic "$dir/out-restic/mixed.img" restic -q -r "$dir/restic" restore latest --target "$dir/out-restic"
mkdir -p "$dir/out-borg"
run borg "$dir/out-borg/mixed.img" sh -c "cd '$dir/out-borg' && exec borg extract --sparse '$dir/borg::one'"

# Live restore: the command, an NBD export of the volume, a client's first read.
sock=$dir/nbd.sock
drop_caches
t0=$(now)
st backups restore --live --no-wait "$snap" lv:strata/dst -q >/dev/null
# Started directly (not through `st`): a background function is a subshell, and the SIGINT
# below must reach the server itself.
"$strata" --data "$data" nbd serve lv:strata/dst --unix "$sock" >/dev/null 2>"$dir/nbd.log" &
nbd=$!
while [ ! -S "$sock" ]; do sleep 0.005; done
qemu-io -r -f raw -c "read 0 4k" "nbd+unix:///?socket=$sock" >/dev/null
t1=$(now)
qemu-io -r -f raw -c "read $(( (bytes * 3 / 4) & ~4095 )) 4k" "nbd+unix:///?socket=$sock" >/dev/null
t2=$(now)
while [ -e "$data/restores/strata/dst.json" ]; do sleep 0.02; done
t3=$(now)
kill -INT $nbd; wait $nbd || true
live_first=$(elapsed "$t0" "$t1")
live_far=$(elapsed "$t1" "$t2")
live_done=$(elapsed "$t0" "$t3")
st image convert -O raw lv:strata/dst "$dir/out.img"
got=$(sha256sum < "$dir/out.img" | cut -d' ' -f1)
[ "$got" = "$sum" ] || { echo "LIVE RESTORE MISMATCH" >&2; exit 1; }
rm -f "$dir/out.img"

python3 - "$mib" "$cold" "$live_first" "$live_far" "$live_done" \
  "${WALL[s1]}" "${CPU[s1]}" "${WALL[sN]}" "${CPU[sN]}" "${WALL[c1]}" "${CPU[c1]}" \
  "${WALL[cN]}" "${CPU[cN]}" "${WALL[restic]}" "${CPU[restic]}" "${WALL[borg]}" "${CPU[borg]}" <<'PY'
import sys
a = sys.argv[1:]
mib, cold = int(a[0]), a[1]
first, far, done = (float(x) for x in a[2:5])
v = [float(x) for x in a[5:]]
rows = [("strata, 1 worker", v[0], v[1]), ("strata, default pool", v[2], v[3]),
        ("strata, 1 worker, copied chunks", v[4], v[5]), ("strata, default pool, copied chunks", v[6], v[7]),
        ("restic restore", v[8], v[9]), ("borg extract --sparse", v[10], v[11])]
restic, borg = v[8], v[10]
gib = mib / 1024
print(f"\nRestore of a {mib} MiB mixed image, page cache {cold} before each row\n")
print("| row | seconds | MiB/s | CPU s | CPU s/GiB | restic/strata | borg/strata |")
print("|---|---:|---:|---:|---:|---:|---:|")
for name, w, c in rows:
    peer = name.startswith(("restic", "borg"))
    rr = "" if peer else f"{restic / w:.2f}x"
    rb = "" if peer else f"{borg / w:.2f}x"
    print(f"| {name} | {w:.2f} | {mib / w:.0f} | {c:.2f} | {c / gib:.2f} | {rr} | {rb} |")
print(f"\nLive restore: first 4 KiB read served {first:.2f} s after the command "
      f"(restore set up, NBD export opened, qemu-io connected and read); a read at 3/4 of the "
      f"disk {far:.2f} s later; copy finished {done:.2f} s after the command "
      f"({mib / done:.0f} MiB/s with the export open)")
PY
rm -rf "$dir"

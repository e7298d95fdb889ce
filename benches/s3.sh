#!/usr/bin/env bash
# S3 benchmark: `strata backup` into an S3 datastore (1 MiB chunks in 16 MiB packs,
# AES-256-GCM, the defaults of `strata backup init --s3`) vs `restic` with its `s3:` backend
# (its defaults: content-defined chunks in packs, AES-256-CTR + Poly1305), both against the same
# radosgw of a throwaway single-node Ceph cluster (scripts/ceph-cluster.sh --rgw), in the same
# run, one after the other. Rows:
#   full backup        into an empty bucket each
#   1% incremental     after rewriting 1% of the image (1 MiB extents at random offsets):
#                      strata with the dirty ranges (what a volume's dirty bitmap supplies),
#                      restic's second run (it re-reads and re-chunks the changed file)
#   restore            the latest snapshot to a new file; strata through a new, empty local
#                      folder (every chunk comes from the bucket), restic with its metadata
#                      cache from the backups (it caches no file data)
#   PUT requests       radosgw's own usage log (`radosgw-admin usage show`, category put_obj,
#                      plus multipart init/complete), per bucket, for both backups together;
#                      restic also writes and deletes a lock object per command. Strata's
#                      figure is also compared with the chunks it stored: one object per chunk
#                      is what an S3 datastore without packs does (PBS 4).
# Prints each figure, the peer's and the ratio (peer time / strata time: > 1 means strata is
# faster; peer PUTs / strata PUTs). Every restore is compared with the source. Usage:
#   benches/s3.sh [--size 4G] [--dir DIR] [--strata BIN] [--keep]
# Needs restic, python3, curl, the Ceph packages with radosgw (scripts/install-deps.sh). The
# image: a third random, a third zeros, a third repetitive text. The work folder (default
# benches/work/s3) needs about 4x the image size; it is removed at the end unless --keep.
set -euo pipefail

size=4G
dir=""
strata=""
keep=0
while [ $# -gt 0 ]; do
  case "$1" in
    --size) size=$2; shift 2 ;;
    --dir) dir=$2; shift 2 ;;
    --strata) strata=$2; shift 2 ;;
    --keep) keep=1; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done

root=$(cd "$(dirname "$0")/.." && pwd)
if [ -z "$strata" ]; then
  (cd "$root" && cargo build -q -j2 --release -p strata-cli)
  strata=${CARGO_TARGET_DIR:-$root/target}/release/strata
fi
for tool in restic python3 curl radosgw radosgw-admin; do
  command -v $tool >/dev/null || { echo "$tool is required (scripts/install-deps.sh)" >&2; exit 1; }
done
[ -n "$dir" ] || dir=$root/benches/work/s3
rm -rf "$dir"
mkdir -p "$dir"
img=$dir/mixed.img
bytes=$(python3 -c "import sys; s=sys.argv[1]; m={'K':1<<10,'M':1<<20,'G':1<<30}; print(int(s[:-1])*m[s[-1]] if s[-1] in m else int(s))" "$size")
mib=$((bytes >> 20))
third=$(( mib / 3 ))

now() { date +%s.%N; }
elapsed() { python3 -c "import sys; print(f'{float(sys.argv[2])-float(sys.argv[1]):.2f}')" "$1" "$2"; }
ratio() { python3 -c "import sys; print(f'{float(sys.argv[1])/float(sys.argv[2]):.2f}')" "$1" "$2"; }

echo "Starting a Ceph cluster with radosgw in $dir/ceph" >&2
"$root/scripts/ceph-cluster.sh" start --dir "$dir/ceph" --rgw --osd-size 40G > "$dir/cluster.env"
cleanup() {
  "$root/scripts/ceph-cluster.sh" stop "$dir/ceph" >/dev/null 2>&1 || true
  if [ "$keep" = 0 ]; then rm -rf "$dir"; fi
}
trap cleanup EXIT
get() { sed -n "s/^$1=//p" "$dir/cluster.env"; }
endpoint=$(get rgw_endpoint)
access=$(get s3_access_key)
secret=$(get s3_secret_key)
conf=$(get conf)
echo "$secret" > "$dir/secret"
mkbucket() {
  curl -sf -X PUT --aws-sigv4 "aws:amz:us-east-1:s3" --user "$access:$secret" \
    -H 'x-amz-content-sha256: UNSIGNED-PAYLOAD' "$endpoint/$1" >/dev/null
}
# Write requests to bucket $1 so far, from radosgw's usage log (flushed every second): PUTs of
# objects and parts, plus multipart creates and completes.
puts() {
  sleep 3
  radosgw-admin -c "$conf" usage show --uid=strata 2>/dev/null | python3 -c '
import json, sys
bucket = sys.argv[1]
n = 0
for e in json.load(sys.stdin).get("entries", []):
    for b in e.get("buckets", []):
        if b.get("bucket") != bucket:
            continue
        for c in b.get("categories", []):
            if c["category"] in ("put_obj", "init_multipart", "complete_multipart", "copy_obj"):
                n += c["ops"]
print(n)' "$1"
}
mkbucket strata-bench
mkbucket restic-bench

echo "Writing $img: ${third} MiB random, ${third} MiB zeros, rest repetitive text ($mib MiB)" >&2
head -c $((third << 20)) /dev/urandom > "$img"
head -c $((third << 20)) /dev/zero >> "$img"
{ yes "Strata S3 benchmark: the quick brown fox jumps over the lazy dog 0123456789" || true; } |
  head -c $(( (mib - 2 * third) << 20 )) >> "$img"

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

"$strata" backup key create "$dir/key" >/dev/null
s3args=(--s3 "$endpoint" --bucket strata-bench --access-key "$access" --secret-file "$dir/secret"
        --path-style --key "$dir/key")
"$strata" backup init --store "$dir/cache" "${s3args[@]}" >/dev/null
export RESTIC_PASSWORD=bench AWS_ACCESS_KEY_ID=$access AWS_SECRET_ACCESS_KEY=$secret
export RESTIC_CACHE_DIR=$dir/restic-cache
repo="s3:$endpoint/restic-bench"
restic -r "$repo" init -q >/dev/null
s_puts0=$(puts strata-bench)
r_puts0=$(puts restic-bench)

sync
t0=$(now)
"$strata" backup create "$img" --store "$dir/cache" --key "$dir/key" --id image/bench -q \
  --output json > "$dir/full.json"
t1=$(now); s_full=$(elapsed "$t0" "$t1")
t0=$(now)
restic -r "$repo" backup -q "$img" >/dev/null
t1=$(now); r_full=$(elapsed "$t0" "$t1")
s_puts1=$(puts strata-bench)
r_puts1=$(puts restic-bench)

snap=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['snapshot'])" "$dir/full.json")
change_one_percent "$snap"
sync
t0=$(now)
"$strata" backup create "$img" --store "$dir/cache" --key "$dir/key" --id image/bench -q \
  --dirty-ranges "$dir/dirty" --output json > "$dir/inc.json"
t1=$(now); s_inc=$(elapsed "$t0" "$t1")
t0=$(now)
restic -r "$repo" backup -q "$img" >/dev/null
t1=$(now); r_inc=$(elapsed "$t0" "$t1")
s_puts2=$(puts strata-bench)
r_puts2=$(puts restic-bench)
chunks=$(python3 -c "import json,sys; print(sum(json.load(open(f))['stats']['chunks-new'] for f in sys.argv[1:]))" "$dir/full.json" "$dir/inc.json")

"$strata" backup init --store "$dir/cache-restore" "${s3args[@]}" >/dev/null
sync
t0=$(now)
"$strata" backup restore image/bench "$dir/strata.img" --store "$dir/cache-restore" \
  --key "$dir/key" -q >/dev/null
t1=$(now); s_restore=$(elapsed "$t0" "$t1")
mkdir -p "$dir/restic-restore"
t0=$(now)
restic -r "$repo" restore latest -q --target "$dir/restic-restore" >/dev/null
t1=$(now); r_restore=$(elapsed "$t0" "$t1")
cmp "$img" "$dir/strata.img" || { echo "strata's restore differs from the source" >&2; exit 1; }
cmp "$img" "$dir/restic-restore$img" || { echo "restic's restore differs from the source" >&2; exit 1; }

s_full_puts=$((s_puts1 - s_puts0)); r_full_puts=$((r_puts1 - r_puts0))
s_inc_puts=$((s_puts2 - s_puts1)); r_inc_puts=$((r_puts2 - r_puts1))
s_all=$((s_puts2 - s_puts0)); r_all=$((r_puts2 - r_puts0))
echo
echo "S3 backup benchmark: $mib MiB mixed image, radosgw on 127.0.0.1, $(nproc) cores, $(date -u +%F)"
echo "(the machine is shared with other builds and tests: load average $(cut -d' ' -f1-3 /proc/loadavg) at the end)"
echo "$("$strata" --version 2>/dev/null | head -n 1), $(restic version | head -n 1)"
printf '%-28s %12s %12s %8s\n' "" "strata" "restic" "ratio"
printf '%-28s %11ss %11ss %8s\n' "full backup" "$s_full" "$r_full" "$(ratio "$r_full" "$s_full")"
printf '%-28s %11ss %11ss %8s\n' "1% incremental" "$s_inc" "$r_inc" "$(ratio "$r_inc" "$s_inc")"
printf '%-28s %11ss %11ss %8s\n' "restore (cold cache)" "$s_restore" "$r_restore" "$(ratio "$r_restore" "$s_restore")"
printf '%-28s %12s %12s %8s\n' "PUT requests, full" "$s_full_puts" "$r_full_puts" "$(ratio "$r_full_puts" "$s_full_puts")"
printf '%-28s %12s %12s %8s\n' "PUT requests, incremental" "$s_inc_puts" "$r_inc_puts" "$(ratio "$r_inc_puts" "$s_inc_puts")"
echo "strata stored $chunks chunks with $s_all PUTs: $(ratio "$chunks" "$s_all")x fewer than one object per chunk"

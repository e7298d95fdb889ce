#!/usr/bin/env bash
# API load benchmark: `wrk` against a read endpoint of `strata serve` (release build,
# embedded default, 20 volumes), 64 connections for 10 s, and in the same run against nginx
# (2 workers, as many as the host has cores) serving the same JSON bytes as a static file — the
# peer: an HTTP server that does no work per request but send a file, the ceiling for this
# machine. Without nginx, busybox httpd (one process per request) stands in.
# Prints requests/s, latency percentiles and errors of each, and the ratio. Usage:
#   benches/api.sh [--endpoint /api/volumes] [--connections 64] [--duration 10s] [--strata BIN]
# Needs wrk, curl and nginx or busybox (apt-get install wrk curl nginx-light). Client and servers
# share the host's cores, so the figures are lower bounds of what a dedicated server does.
set -euo pipefail

endpoint=/api/volumes
connections=64
duration=10s
strata=""
while [ $# -gt 0 ]; do
  case "$1" in
    --endpoint) endpoint=$2; shift 2 ;;
    --connections) connections=$2; shift 2 ;;
    --duration) duration=$2; shift 2 ;;
    --strata) strata=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
root=$(cd "$(dirname "$0")/.." && pwd)
if [ -z "$strata" ]; then
  (cd "$root" && cargo build -q -j2 --release -p strata-cli)
  strata=${CARGO_TARGET_DIR:-$root/target}/release/strata
fi
for tool in wrk curl; do
  command -v $tool >/dev/null || { echo "$tool is required (apt-get install wrk curl)" >&2; exit 1; }
done
nginx=$(command -v nginx || true)
[ -x "$nginx" ] || [ -x /usr/sbin/nginx ] && nginx=${nginx:-/usr/sbin/nginx}
if [ -z "$nginx" ] && ! command -v busybox >/dev/null; then
  echo "nginx or busybox is required (apt-get install nginx-light)" >&2; exit 1
fi
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

port=$((20000 + RANDOM % 20000))
"$strata" --data "$work/data" serve --listen 127.0.0.1:$port --http --pv-size 8G >"$work/serve.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do
  grep -q "listening" "$work/serve.log" && break
  sleep 0.1
done
token=$(awk '/^  [^ ]+\.[^ ]+$/ {print $1; exit}' "$work/serve.log")
[ -n "$token" ] || { echo "no token in the server's output" >&2; cat "$work/serve.log" >&2; exit 1; }
auth="Authorization: Bearer $token"
for i in $(seq -w 1 20); do
  curl -fsS -o /dev/null -H "$auth" -H 'content-type: application/json' \
    -d "{\"vg\":\"strata\",\"name\":\"vm-1$i-disk-0\",\"size\":\"32G\",\"pool\":\"data\"}" \
    "http://127.0.0.1:$port/api/volumes"
done
mkdir -p "$work/www/api"
chmod a+rx "$work" "$work/www" "$work/www/api"
curl -fsS -H "$auth" "http://127.0.0.1:$port$endpoint" >"$work/www${endpoint}"
chmod a+r "$work/www${endpoint}"
bytes=$(stat -c %s "$work/www${endpoint}")

peer_port=$((port + 1))
if [ -n "$nginx" ]; then
  peer_name="nginx $("$nginx" -v 2>&1 | sed 's/.*nginx\///')"
  cat >"$work/nginx.conf" <<CONF
worker_processes 2;
pid $work/nginx.pid;
error_log $work/nginx-error.log;
daemon off;
events { worker_connections 1024; }
http {
  access_log off;
  default_type application/json;
  client_body_temp_path $work/nginx-tmp;
  server { listen 127.0.0.1:$peer_port; root $work/www; }
}
CONF
  "$nginx" -c "$work/nginx.conf" &
else
  peer_name="busybox httpd"
  busybox httpd -f -p 127.0.0.1:$peer_port -h "$work/www" &
fi
pids+=($!)
sleep 0.5

# wrk prints "Non-2xx or 3xx responses" and "Socket errors" lines when there are any.
run() { wrk -t2 -c"$connections" -d"$duration" --latency "$@"; }
echo "== strata serve: GET $endpoint ($bytes bytes, token checked on each request)"
ours=$(run -H "$auth" "http://127.0.0.1:$port$endpoint")
echo "$ours"
echo "== $peer_name: the same $bytes bytes as a static file"
peer=$(run "http://127.0.0.1:$peer_port$endpoint")
echo "$peer"

rps() { awk '/^Requests\/sec/ {print $2}' <<<"$1"; }
errors() {
  local non2xx sock
  non2xx=$(awk '/Non-2xx/ {print $NF}' <<<"$1")
  sock=$(awk -F'[ ,]+' '/Socket errors/ {print $5+$7+$9+$11}' <<<"$1")
  echo $(( ${non2xx:-0} + ${sock:-0} ))
}
pct() { awk -v p="$2" '$1 == p {print $2}' <<<"$1"; }
echo
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "peer: $peer_name"
printf '%-16s %12s %9s %9s %9s %9s %7s\n' server req/s p50 p90 p99 max errors
for name in strata peer; do
  out=$([ $name = strata ] && echo "$ours" || echo "$peer")
  max=$(awk '/Latency/ && !/Distribution/ {print $4; exit}' <<<"$out")
  printf '%-16s %12s %9s %9s %9s %9s %7s\n' "$name" "$(rps "$out")" "$(pct "$out" 50%)" \
    "$(pct "$out" 90%)" "$(pct "$out" 99%)" "$max" "$(errors "$out")"
done
python3 -c "import sys; print(f'ratio strata/peer req/s: {float(sys.argv[1])/float(sys.argv[2]):.2f}')" "$(rps "$ours")" "$(rps "$peer")"
[ "$(errors "$ours")" -eq 0 ] || { echo "strata had errors" >&2; exit 1; }

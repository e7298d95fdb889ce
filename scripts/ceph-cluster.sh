#!/usr/bin/env bash
# A throwaway single-node Ceph cluster for tests and benchmarks: one mon, one mgr, one OSD
# (bluestore on a sparse file), optionally radosgw, all bound to 127.0.0.1 with every file
# (configuration, keyrings, daemon data, logs, sockets, pid files) under one directory. It never
# reads or writes /etc/ceph or /var/lib/ceph, and it stops exactly the daemons it started, by
# their pid files, never by name.
#
#   scripts/ceph-cluster.sh start [--dir DIR] [--rgw] [--osd-size SIZE] [--pool NAME]
#                                 [--stop-on-eof]
#       Creates DIR (default: a new temporary directory), starts the cluster, waits until it is
#       healthy, creates the RBD pool (default "rbd"), and prints `key=value` lines: dir, conf,
#       keyring, pool, and with --rgw rgw_endpoint, s3_access_key, s3_secret_key.
#       --stop-on-eof leaves a watcher that stops the cluster and removes DIR when this
#       script's standard input reaches end of file (a test process holding the other end of
#       a pipe dies or exits): clusters of killed tests do not outlive them.
#   scripts/ceph-cluster.sh env DIR      prints the same lines for a running cluster
#   scripts/ceph-cluster.sh stop DIR [--keep]
#       Stops radosgw, then the OSD and mgr, then the mon (radosgw hangs if the OSD goes first),
#       each by its pid file; removes DIR unless --keep.
#
# Needs ceph-mon ceph-osd ceph-mgr ceph-common (and radosgw for --rgw): scripts/install-deps.sh.
set -euo pipefail

MARKER=.strata-ceph-cluster

die() { echo "ceph-cluster: $*" >&2; exit 1; }

# A TCP port on 127.0.0.1 nothing listens on (the daemons bind it soon after; a race with
# another program taking it in between shows up as a mon that does not start).
free_port() {
  local p i
  for i in $(seq 1 200); do
    p=$(( 20000 + RANDOM % 30000 ))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
      echo "$p"; return 0
    fi
  done
  die "no free TCP port found"
}

# The pid in a daemon's pid file, if that process is still one of ours: its command line
# names our configuration file (guards against a recycled pid).
daemon_pid() {
  local dir=$1 name=$2 pid
  [ -f "$dir/run/$name.pid" ] || return 1
  pid=$(tr -dc 0-9 < "$dir/run/$name.pid")
  [ -n "$pid" ] || return 1
  [ -r "/proc/$pid/cmdline" ] || return 1
  tr '\0' ' ' < "/proc/$pid/cmdline" | grep -qF -- "$dir/ceph.conf" || return 1
  echo "$pid"
}

# Whether a process has exited (a zombie nobody reaped counts as exited).
gone() {
  local pid=$1 state
  [ -r "/proc/$pid/stat" ] || return 0
  state=$(sed -e 's/^.*) //' "/proc/$pid/stat" | cut -d' ' -f1)
  [ "$state" = Z ]
}

stop_daemon() {
  local dir=$1 name=$2 pid i
  pid=$(daemon_pid "$dir" "$name") || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 1 100); do
    gone "$pid" && return 0
    sleep 0.1
  done
  echo "ceph-cluster: $name (pid $pid) did not stop in 10 s; killing it" >&2
  kill -KILL "$pid" 2>/dev/null || true
  for i in $(seq 1 50); do
    gone "$pid" && return 0
    sleep 0.1
  done
  die "$name (pid $pid) does not exit"
}

cmd_stop() {
  local dir="" keep=0
  while [ $# -gt 0 ]; do
    case $1 in
      --keep) keep=1 ;;
      -*) die "unknown option $1" ;;
      *) dir=$1 ;;
    esac
    shift
  done
  [ -n "$dir" ] || die "stop needs the cluster directory"
  [ -f "$dir/$MARKER" ] || die "$dir is not a cluster directory made by this script"
  stop_daemon "$dir" client.rgw.strata
  stop_daemon "$dir" osd.0
  stop_daemon "$dir" mgr.x
  stop_daemon "$dir" mon.a
  if [ "$keep" = 0 ]; then
    rm -rf -- "$dir"
  fi
}

cmd_env() {
  local dir=$1
  [ -f "$dir/$MARKER" ] || die "$dir is not a cluster directory made by this script"
  cat "$dir/cluster.env"
}

ceph_() { ceph -c "$DIR/ceph.conf" --connect-timeout 20 "$@"; }

wait_healthy() {
  local status deadline=$((SECONDS + 60))
  while [ "$SECONDS" -lt "$deadline" ]; do
    # Healthy, and every placement group active+clean ("9 pgs: 9 active+clean; ...").
    status=$(ceph_ health 2>/dev/null || true)
    if [[ $status == HEALTH_OK* ]] &&
       [[ $(ceph_ pg stat 2>/dev/null || true) =~ ^([0-9]+)\ pgs:\ ([0-9]+)\ active\+clean\; ]] &&
       [ "${BASH_REMATCH[1]}" = "${BASH_REMATCH[2]}" ]; then
      return 0
    fi
    sleep 0.2
  done
  ceph_ -s >&2 || true
  die "the cluster did not become healthy in 60 s (logs in $DIR/log)"
}

cmd_start() {
  local rgw=0 osd_size=10G pool=rbd stop_on_eof=0
  started=0
  DIR=""
  while [ $# -gt 0 ]; do
    case $1 in
      --dir) DIR=$2; shift ;;
      --rgw) rgw=1 ;;
      --osd-size) osd_size=$2; shift ;;
      --pool) pool=$2; shift ;;
      --stop-on-eof) stop_on_eof=1 ;;
      *) die "unknown option $1" ;;
    esac
    shift
  done
  for tool in ceph-mon ceph-osd ceph-mgr ceph ceph-authtool monmaptool; do
    command -v "$tool" >/dev/null || die "$tool is missing (scripts/install-deps.sh installs Ceph)"
  done
  if [ "$rgw" = 1 ]; then
    command -v radosgw >/dev/null || die "radosgw is missing (scripts/install-deps.sh)"
  fi
  if [ -z "$DIR" ]; then
    DIR=$(mktemp -d /tmp/strata-ceph.XXXXXX)
  else
    mkdir -p "$DIR"
    [ -z "$(ls -A "$DIR")" ] || die "$DIR is not empty"
  fi
  DIR=$(cd "$DIR" && pwd)
  touch "$DIR/$MARKER"
  mkdir -p "$DIR"/{run,log,crash,mon/ceph-a,mgr/ceph-x,osd/ceph-0,rgw}
  # A failed start stops whatever it started and keeps the directory for its logs.
  trap 'if [ "$started" != 1 ]; then cmd_stop "$DIR" --keep || true; echo "ceph-cluster: logs kept in $DIR/log" >&2; fi' EXIT
  local fsid v2 v1 conf=$DIR/ceph.conf
  fsid=$(cat /proc/sys/kernel/random/uuid)
  v2=$(free_port)
  v1=$(free_port)
  cat > "$conf" <<EOF
[global]
fsid = $fsid
mon host = [v2:127.0.0.1:$v2,v1:127.0.0.1:$v1]
public addr = 127.0.0.1
cluster addr = 127.0.0.1
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
keyring = $DIR/keyring
run dir = $DIR/run
pid file = $DIR/run/\$name.pid
log file = $DIR/log/\$name.log
mon cluster log file = $DIR/log/cluster.log
crash dir = $DIR/crash
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon warn on insecure global id reclaim allowed = false
paxos propose interval = 0.1
# The host's disk is shared with other work: only warn when it is nearly full (2% left).
mon data avail warn = 2
mon data avail crit = 1
[mon]
mon data = $DIR/mon/ceph-\$id
keyring = $DIR/mon/ceph-\$id/keyring
admin socket = $DIR/run/\$name.asok
[mgr]
# The manager loads every Python module it finds; it needs only those always on.
mgr disabled modules = alerts,diskprediction_local,influx,insights,iostat,localpool,mirroring,nfs,osd_perf_query,osd_support,prometheus,restful,selftest,snap_schedule,stats,telegraf,test_orchestrator,zabbix,cephadm,dashboard,k8sevents,rook
mgr data = $DIR/mgr/ceph-\$id
keyring = $DIR/mgr/ceph-\$id/keyring
admin socket = $DIR/run/\$name.asok
[osd]
osd data = $DIR/osd/ceph-\$id
keyring = $DIR/osd/ceph-\$id/keyring
admin socket = $DIR/run/\$name.asok
osd objectstore = bluestore
bluestore block path = $DIR/osd/ceph-\$id.block
bluestore block size = $osd_size
bluestore block create = true
bluestore cache autotune = false
bluestore cache size = 64M
osd memory target = 939524096
bluestore fsck on mount = false
osd crush update on start = true
[client.rgw.strata]
admin socket = $DIR/run/\$name.asok
rgw data = $DIR/rgw
keyring = $DIR/rgw/keyring
EOF
  # Keys: the mon's, the admin's (this cluster's clients), then the mon data and monmap.
  ceph-authtool --create-keyring "$DIR/mon.keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
  ceph-authtool --create-keyring "$DIR/keyring" --gen-key -n client.admin \
    --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' --cap mds 'allow *' >/dev/null
  ceph-authtool "$DIR/mon.keyring" --import-keyring "$DIR/keyring" >/dev/null
  monmaptool --create --fsid "$fsid" --addv a "[v2:127.0.0.1:$v2,v1:127.0.0.1:$v1]" \
    "$DIR/monmap" >/dev/null
  ceph-mon -c "$conf" --mkfs -i a --monmap "$DIR/monmap" --keyring "$DIR/mon.keyring" \
    >>"$DIR/log/setup.log" 2>&1 || die "ceph-mon --mkfs failed (see $DIR/log)"
  ceph-mon -c "$conf" -i a </dev/null >>"$DIR/log/setup.log" 2>&1 \
    || die "ceph-mon did not start (see $DIR/log)"
  # The mgr.
  ceph_ auth get-or-create mgr.x mon 'allow profile mgr' osd 'allow *' mds 'allow *' \
    -o "$DIR/mgr/ceph-x/keyring" >/dev/null 2>>"$DIR/log/setup.log" \
    || die "the mon does not answer (see $DIR/log)"
  ceph-mgr -c "$conf" -i x </dev/null >>"$DIR/log/setup.log" 2>&1 \
    || die "ceph-mgr did not start (see $DIR/log)"
  # The OSD, on a sparse file bluestore creates.
  local osd_uuid
  osd_uuid=$(cat /proc/sys/kernel/random/uuid)
  ceph-authtool --create-keyring "$DIR/osd/ceph-0/keyring" --gen-key -n osd.0 >/dev/null
  ceph_ auth add osd.0 osd 'allow *' mon 'allow profile osd' mgr 'allow profile osd' \
    -i "$DIR/osd/ceph-0/keyring" >/dev/null 2>>"$DIR/log/setup.log"
  [ "$(ceph_ osd new "$osd_uuid" 0 2>>"$DIR/log/setup.log")" = 0 ] \
    || die "ceph osd new did not give osd.0"
  ceph-osd -c "$conf" -i 0 --mkfs --osd-uuid "$osd_uuid" >>"$DIR/log/setup.log" 2>&1 \
    || die "ceph-osd --mkfs failed (see $DIR/log)"
  ceph-osd -c "$conf" -i 0 </dev/null >>"$DIR/log/setup.log" 2>&1 \
    || die "ceph-osd did not start (see $DIR/log)"
  # RBD v2 clones need clients of mimic or newer.
  ceph_ osd set-require-min-compat-client mimic --yes-i-really-mean-it >/dev/null 2>&1
  ceph_ osd pool create "$pool" 8 8 >/dev/null 2>&1
  ceph_ osd pool application enable "$pool" rbd >/dev/null 2>&1
  if [ "$rgw" = 1 ]; then
    # radosgw's pools in one ceph session: one by one, it makes each in turn and stalls.
    local p cmds=""
    for p in .rgw.root default.rgw.control default.rgw.meta default.rgw.log \
             default.rgw.buckets.index default.rgw.buckets.data default.rgw.buckets.non-ec; do
      cmds+="osd pool create $p 8 8"$'\n'"osd pool application enable $p rgw"$'\n'
    done
    printf '%s' "$cmds" | ceph_ >/dev/null 2>>"$DIR/log/setup.log"
  fi
  wait_healthy
  {
    echo "dir=$DIR"
    echo "conf=$conf"
    echo "keyring=$DIR/keyring"
    echo "pool=$pool"
  } > "$DIR/cluster.env"
  if [ "$rgw" = 1 ]; then
    local port
    port=$(free_port)
    cat >> "$conf" <<EOF
rgw frontends = beast endpoint=127.0.0.1:$port
rgw enable lc threads = false
# Per-bucket request counts (radosgw-admin usage show; benches/s3.sh counts PUTs), flushed
# every second.
rgw enable usage log = true
rgw usage log tick interval = 1
rgw usage log flush threshold = 1
EOF
    ceph_ auth get-or-create client.rgw.strata mon 'allow rw' osd 'allow rwx' mgr 'allow rw' \
      -o "$DIR/rgw/keyring" >/dev/null 2>>"$DIR/log/setup.log"
    radosgw -c "$conf" -n client.rgw.strata </dev/null \
      >>"$DIR/log/setup.log" 2>&1 || die "radosgw did not start (see $DIR/log)"
    local i up=0
    for i in $(seq 1 120); do
      if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then up=1; break; fi
      sleep 0.25
    done
    [ "$up" = 1 ] || die "radosgw does not answer on port $port (see $DIR/log)"
    local user
    user=$(radosgw-admin -c "$conf" user create --uid=strata --display-name=Strata 2>>"$DIR/log/setup.log") \
      || die "radosgw-admin user create failed"
    {
      echo "rgw_endpoint=http://127.0.0.1:$port"
      echo "s3_access_key=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["keys"][0]["access_key"])' <<<"$user")"
      echo "s3_secret_key=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["keys"][0]["secret_key"])' <<<"$user")"
    } >> "$DIR/cluster.env"
  fi
  if [ "$stop_on_eof" = 1 ]; then
    # The watcher reads this script's standard input until end of file; its output goes to a
    # log so that whoever reads our standard output sees it end when we exit.
    # (A background job's standard input is /dev/null unless redirected explicitly.)
    exec 3<&0
    (
      trap '' INT
      cat <&3 >/dev/null || true
      "$0" stop "$DIR"
    ) >>"$DIR/log/watcher.log" 2>&1 &
    exec 3<&-
  fi
  started=1
  cat "$DIR/cluster.env"
}

case ${1:-} in
  start) shift; cmd_start "$@" ;;
  stop) shift; cmd_stop "$@" ;;
  env) shift; [ $# -eq 1 ] || die "env needs the cluster directory"; cmd_env "$1" ;;
  *) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac

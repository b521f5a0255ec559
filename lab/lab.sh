#!/usr/bin/env bash
# The kumazone multi-zone lab in network namespaces (root needed).
#
#   lab/lab.sh up                      namespaces, certificates, global + two zones, the
#                                      cluster DNS, a dataplane and transparent proxy per client
#   lab/lab.sh down                    stop everything, remove the namespaces (idempotent)
#   lab/lab.sh status                  each control plane and dataplane side by side (lab/labctl.py)
#   lab/lab.sh stop  global|global-2|zone-1|zone-2|client-1|client-2
#   lab/lab.sh start global|global-2|zone-1|zone-2|client-1|client-2
#                                      (a client: its dataplane; global-2: with replicas)
#   lab/lab.sh wait-synced [SECONDS]   until both zones hold the (leading) global's table
#                                      and each dataplane its zone's
#
# Environment: BIN (the virtualenv's bin, default .venv/bin), LAB_STATE (default
# lab/state), LAB_PREFIX (namespace names, default kzlab-), LAB_DP_USER (the user the
# dataplanes run as, default <prefix>dp: made when missing, removed by `down` only when
# `up` made it), LAB_GLOBAL_REPLICAS (1, the default: one global on SQLite; 2: the
# global as two replicas, global and global-2, on one PostgreSQL server in a db host,
# the zones given both; `up` remembers it for the other commands).  Relative paths are
# taken from the directory lab.sh is called from.
#
# Topology: one namespace per host, each with an eth0 plugged into a bridge that lives
# in its own namespace (<prefix>net).  Nothing is added to the root namespace except
# /etc/netns/<prefix>client{1,2}/resolv.conf, which `ip netns exec` shows the clients
# as their /etc/resolv.conf, and the dataplanes' system user.  Addresses are
# documentation addresses only.
set -Eeuo pipefail

PREFIX=${LAB_PREFIX:-kzlab-}
STATE=$(realpath -m -- "${LAB_STATE:-lab/state}")
BIN=$(realpath -m -- "${BIN:-.venv/bin}")
HERE=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname -- "$HERE")

NET_NS="${PREFIX}net"
BRIDGE=lab0
CLIENTS=(client-1 client-2)
# Every host any lab has (`down` looks for each): with replicas of the global also
# global-2 and the PostgreSQL server's db.
ALL_HOSTS=(global global-2 db zone-1 zone-2 cluster-dns "${CLIENTS[@]}")
declare -A IPV4=(
  [global]=198.51.100.201 [global-2]=198.51.100.202 [db]=198.51.100.230
  [zone-1]=198.51.100.211 [zone-2]=198.51.100.212
  [cluster-dns]=198.51.100.250 [client-1]=198.51.100.221 [client-2]=198.51.100.222
)
declare -A IPV6=(
  [global]=2001:db8:100::201 [global-2]=2001:db8:100::202 [db]=2001:db8:100::230
  [zone-1]=2001:db8:100::211 [zone-2]=2001:db8:100::212
  [cluster-dns]=2001:db8:100::250 [client-1]=2001:db8:100::221 [client-2]=2001:db8:100::222
)
# How many replicas the global runs as: LAB_GLOBAL_REPLICAS for `up`; the other
# commands take what `up` wrote to the state unless it is given.
REPLICAS_FILE="$STATE/global-replicas"
if [[ -n ${LAB_GLOBAL_REPLICAS:-} ]]; then
  GLOBAL_REPLICAS=$LAB_GLOBAL_REPLICAS
elif [[ ${1:-} != up && -f "$REPLICAS_FILE" ]]; then
  GLOBAL_REPLICAS=$(tr -dc '0-9' <"$REPLICAS_FILE")
else
  GLOBAL_REPLICAS=1
fi
# The hosts of this lab: set_hosts fills these from GLOBAL_REPLICAS.
GLOBALS=() CONTROL_PLANES=() HOSTS=()
set_hosts() {
  case $GLOBAL_REPLICAS in
    1) GLOBALS=(global) HOSTS=() ;;
    2) GLOBALS=(global global-2) HOSTS=(db) ;;
    *) die "LAB_GLOBAL_REPLICAS must be 1 or 2, not '$GLOBAL_REPLICAS'" ;;
  esac
  CONTROL_PLANES=("${GLOBALS[@]}" zone-1 zone-2)
  HOSTS=("${HOSTS[@]}" "${CONTROL_PLANES[@]}" cluster-dns "${CLIENTS[@]}")
}
# The replicas' PostgreSQL server (in the db host, its files under $STATE/db, run as
# nobody: PostgreSQL refuses root), trusting the lab's network (no password).
PG_PORT=5432
PG_USER=kumazone
PG_DATABASE=kumazone
PG_DIR="$STATE/db"
STORE_URL="postgresql://$PG_USER@${IPV4[db]}:$PG_PORT/$PG_DATABASE"
# Which zone a client host lives in.
declare -A ZONE_OF=([client-1]=zone-1 [client-2]=zone-2)
# Without IPv6 in the kernel the lab is IPv4 only.
HAVE_IPV6=0
[[ -d /proc/sys/net/ipv6 ]] && HAVE_IPV6=1
DNS_PORT=5653
API_PORT=5681
DIAGNOSTICS_PORT=5680
KDS_PORT=5685
# The zones' dataplane port; each client's dataplane (mesh default, named after its
# host) answers on 127.0.0.1 and ::1 port 15053, its /ready and /metrics on 9902.
DP_PORT=5678
DP_MESH=default
DP_DNS_PORT=15053
DP_DIAGNOSTICS_PORT=9902
DP_USER=${LAB_DP_USER:-${PREFIX}dp}
# The one name outside the mesh that the cluster DNS serves (all of lab.test is its).
OUTSIDE_NAME=outside.lab.test
OUTSIDE_IPV4=198.51.100.80
OUTSIDE_IPV6=2001:db8:100::80

say() { printf 'lab: %s\n' "$*"; }
die() {
  printf 'lab: error: %s\n' "$*" >&2
  exit 1
}

# client-1 -> <prefix>client1
ns_of() { printf '%s%s' "$PREFIX" "${1//-/}"; }
all_namespaces() {
  local host
  for host in "${ALL_HOSTS[@]}"; do ns_of "$host"; echo; done
  echo "$NET_NS"
}
ns_exists() { [[ -e "/run/netns/$1" || -e "/var/run/netns/$1" ]]; }
pidfile_of() { printf '%s/run/%s.pid' "$STATE" "$1"; }
logfile_of() { printf '%s/logs/%s.log' "$STATE" "$1"; }
# A dataplane's pid file is in a directory its user owns: twistd removes it as that user.
dp_pidfile_of() { printf '%s/run/dataplanes/%s.pid' "$STATE" "$1"; }
# Who made the dataplanes' user (so that `down` removes it only if `up` made it).
dp_user_marker() { printf '%s/dp-user-made' "$STATE"; }

check_paths() {
  case $STATE in
    / | "$REPO" | "$REPO/lab" | "$HOME") die "LAB_STATE '$STATE' would wipe more than the lab's state" ;;
  esac
}

check_prefix() {
  [[ "$PREFIX" =~ ^[a-z0-9][a-z0-9-]{0,15}$ ]] ||
    die "LAB_PREFIX '$PREFIX' must be 1-16 of a-z, 0-9 and '-', starting with a letter or digit"
  [[ "$DP_USER" =~ ^[a-z_][a-z0-9_-]{0,31}$ ]] ||
    die "the dataplanes' user '$DP_USER' is not a valid user name: set LAB_DP_USER"
}

find_dnsmasq() {
  command -v dnsmasq 2>/dev/null || { [[ -x /usr/sbin/dnsmasq ]] && echo /usr/sbin/dnsmasq; } || true
}

preflight() {
  [[ $(id -u) -eq 0 ]] || die "the lab needs root (network namespaces, /etc/netns); run it as root"
  command -v ip >/dev/null || die "'ip' not found: apt-get install iproute2 (make lab does it)"
  [[ -x "$BIN/twistd" && -x "$BIN/kumazone" && -x "$BIN/python" ]] ||
    die "no kumazone in $BIN: run 'make' first, or set BIN to a virtualenv's bin with kumazone installed"
  [[ -n "$(find_dnsmasq)" ]] || die "dnsmasq not found: apt-get install dnsmasq-base (make lab does it)"
  command -v iptables-restore >/dev/null || [[ -x /usr/sbin/iptables-restore ]] ||
    die "iptables-restore not found: apt-get install iptables (make lab does it)"
  local tool
  for tool in setpriv useradd userdel; do
    command -v "$tool" >/dev/null || die "'$tool' not found: apt-get install util-linux passwd"
  done
  "$BIN/twistd" kumazone --help >/dev/null 2>&1 ||
    die "'$BIN/twistd kumazone --help' fails: the kumazone twistd plugin is not installed in $BIN"
  # The probe namespace tells "cannot create namespaces here" apart from later errors.
  local probe="${PREFIX}probe"
  ip netns del "$probe" 2>/dev/null || true
  local why
  if ! why=$(ip netns add "$probe" 2>&1); then
    die "cannot create a network namespace ($why): the lab needs root with CAP_SYS_ADMIN and a kernel with network namespaces"
  fi
  ip netns del "$probe"
}

# -- processes -----------------------------------------------------------------------

# The pid in PIDFILE, if that process is alive and its command line names PIDFILE
# (so a stale pid file never makes us signal some other process).
live_pid() {
  local pidfile=$1 pid
  [[ -f "$pidfile" ]] || return 1
  pid=$(tr -dc '0-9' <"$pidfile")
  [[ -n "$pid" ]] || return 1
  alive "$pid" || return 1
  tr '\0' '\n' <"/proc/$pid/cmdline" | grep -qF -- "$pidfile" || return 1
  echo "$pid"
}

# Running, and not a zombie waiting for init to reap it (daemons are init's children).
alive() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  [[ ${stat:0:1} != Z ]]
}

# Stop PID: TERM, then KILL after TIMEOUT seconds.
stop_pid() {
  local pid=$1 timeout=${2:-10} i
  kill -TERM "$pid" 2>/dev/null || return 0
  for ((i = 0; i < timeout * 20; i++)); do
    alive "$pid" || return 0
    sleep 0.05
  done
  say "pid $pid did not stop after ${timeout}s: killing it"
  kill -KILL "$pid" 2>/dev/null || true
  for ((i = 0; i < 40; i++)); do
    alive "$pid" || return 0
    sleep 0.05
  done
}

# stop_named NAME PIDFILE [NAME PIDFILE ...]: stop the process of each pid file that
# runs, all at once (TERM, then KILL for those still running after 10 seconds).
stop_named() {
  local names=() pids=() pidfiles=() name pidfile pid i running
  while (($# >= 2)); do
    name=$1 pidfile=$2
    shift 2
    pidfiles+=("$pidfile")
    if pid=$(live_pid "$pidfile"); then
      kill -TERM "$pid" 2>/dev/null || true
      names+=("$name") pids+=("$pid")
    fi
  done
  for ((i = 0; i < 200; i++)); do
    running=0
    for pid in "${pids[@]}"; do alive "$pid" && running=1; done
    ((running)) || break
    sleep 0.05
  done
  for i in "${!pids[@]}"; do
    if alive "${pids[$i]}"; then
      say "${names[$i]} (pid ${pids[$i]}) did not stop 10s after SIGTERM: killing it"
      kill -KILL "${pids[$i]}" 2>/dev/null || true
    fi
  done
  for i in "${!pids[@]}"; do
    for ((running = 0; running < 40; running++)); do
      alive "${pids[$i]}" || break
      sleep 0.05
    done
    say "stopped ${names[$i]} (pid ${pids[$i]})"
  done
  ((${#pidfiles[@]} == 0)) || rm -f -- "${pidfiles[@]}"
}

tail_log() {
  local log
  log=$(logfile_of "$1")
  if [[ -s "$log" ]]; then
    printf -- '--- last lines of %s ---\n' "$log" >&2
    tail -n 15 -- "$log" >&2
  fi
}

# -- network -------------------------------------------------------------------------

make_network() {
  ip netns add "$NET_NS"
  ip -n "$NET_NS" link set lo up
  ip -n "$NET_NS" link add "$BRIDGE" type bridge
  ip -n "$NET_NS" link set "$BRIDGE" up
  local host ns
  for host in "${HOSTS[@]}"; do
    ns=$(ns_of "$host")
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    # Both ends are created inside the lab's namespaces, never in the root one.
    ip -n "$NET_NS" link add "v-$host" type veth peer name eth0 netns "$ns"
    ip -n "$NET_NS" link set "v-$host" master "$BRIDGE" up
    ip -n "$ns" addr add "${IPV4[$host]}/24" dev eth0
    if ((HAVE_IPV6)); then ip -n "$ns" addr add "${IPV6[$host]}/64" dev eth0 nodad; fi
    ip -n "$ns" link set eth0 up
  done
}

# -- daemons ---------------------------------------------------------------------------

# launch_twistd NAME NAMESPACE PIDFILE TWISTD-ARGUMENTS...: a twistd daemon in NAMESPACE,
# logging to logs/NAME.log; dies (with the log's end) unless it started.
launch_twistd() {
  local name=$1 ns=$2 pidfile=$3 log
  shift 3
  log=$(logfile_of "$name")
  # twistd daemonizes and returns once the service has started (ports bound).  When
  # the daemon dies at start-up with SystemExit (kumazone's "cannot start: ..."), the
  # launching twistd waits for it forever: so watch the daemon too.
  rm -f -- "$pidfile"
  ip netns exec "$ns" "$BIN/twistd" --pidfile="$pidfile" --logfile="$log" "$@" &
  local launcher=$! status=0 i
  for ((i = 0; ; i++)); do
    alive "$launcher" || break
    if [[ -s "$pidfile" ]] && ! live_pid "$pidfile" >/dev/null; then
      sleep 0.2
      if alive "$launcher"; then
        say "$name's daemon died while starting: stopping its launcher (pid $launcher)"
        kill -TERM "$launcher" 2>/dev/null || true
      fi
      break
    fi
    if ((i == 600)); then
      say "$name did not report start-up within 30s: stopping its launcher (pid $launcher)"
      kill -TERM "$launcher" 2>/dev/null || true
      break
    fi
    sleep 0.05
  done
  wait "$launcher" || status=$?
  if ((status != 0)) || ! live_pid "$pidfile" >/dev/null; then
    tail_log "$name"
    die "$name did not start (log: $log)"
  fi
}

# wait_ready NAME NAMESPACE URL: until URL (a /ready) answers 200 inside NAMESPACE.
wait_ready() {
  if ! ip netns exec "$2" "$BIN/python" "$HERE/labctl.py" wait "$3" --timeout 20; then
    tail_log "$1"
    die "$1 is not ready after 20s (log: $(logfile_of "$1"))"
  fi
}

# -- control planes ------------------------------------------------------------------

start_control_plane() {
  local name=$1 ns address args
  ns=$(ns_of "$name")
  address=${IPV4[$name]}
  ns_exists "$ns" || die "namespace $ns does not exist: is the lab up? (make lab)"
  if live_pid "$(pidfile_of "$name")" >/dev/null; then
    say "$name is already running"
    return 0
  fi
  args=(
    --data-dir="$STATE/data/$name"
    --api-interface="$address" --api-port="$API_PORT" --diagnostics-port="$DIAGNOSTICS_PORT"
    --tls-ca="$STATE/certs/ca.pem"
  )
  local globals="" replica
  for replica in "${GLOBALS[@]}"; do globals+="${globals:+,}${IPV4[$replica]}:$KDS_PORT"; done
  if [[ $name == global* ]]; then
    # The replicas share global.pem (which names each one's addresses) and the store.
    args+=(
      --role=global --kds-interface="$address" --kds-port="$KDS_PORT"
      --tls-cert="$STATE/certs/global.pem" --tls-key="$STATE/certs/global-key.pem"
    )
    if ((GLOBAL_REPLICAS > 1)); then args+=(--store="$STORE_URL"); fi
  else
    # The zone's certificate (which names both zones' addresses) serves zone sync and
    # the dataplane port alike.  With replicas of the global, the zone is given each
    # one's address and connects to whichever leads.
    args+=(
      --role=zone --zone="$name" --global="$globals"
      --resources="$STATE/zones/$name"
      --dns-interface="$address" --dns-port="$DNS_PORT"
      --dp-interface="$address" --dp-port="$DP_PORT"
      --tls-cert="$STATE/certs/$name.pem" --tls-key="$STATE/certs/$name-key.pem"
    )
  fi
  launch_twistd "$name" "$ns" "$(pidfile_of "$name")" kumazone "${args[@]}"
  wait_ready "$name" "$ns" "http://127.0.0.1:$DIAGNOSTICS_PORT/ready"
  if ((GLOBAL_REPLICAS > 1)) && [[ $name == global* ]]; then
    local role
    role=$(ip netns exec "$ns" "$BIN/python" "$HERE/labctl.py" get "http://127.0.0.1:$DIAGNOSTICS_PORT/ready" 2>/dev/null) || true
    say "$name up in $ns (${role:-ok}): API http://$address:$API_PORT, zone sync $address:$KDS_PORT, store $STORE_URL, log $(logfile_of "$name")"
  elif [[ $name == global ]]; then
    say "global up in $ns: API http://$address:$API_PORT, zone sync $address:$KDS_PORT, log $(logfile_of "$name")"
  else
    say "$name up in $ns: API http://$address:$API_PORT, DNS $address:$DNS_PORT, dataplanes $address:$DP_PORT, log $(logfile_of "$name")"
  fi
}

# -- the replicas' PostgreSQL server --------------------------------------------------------

# The directory of initdb, pg_ctl and postgres: Debian's newest, else initdb's on PATH.
find_pg_bin() {
  local found
  found=$(for dir in /usr/lib/postgresql/*/bin; do [[ -x "$dir/initdb" ]] && echo "$dir"; done |
    sort -V | tail -n 1)
  if [[ -z $found ]] && command -v initdb >/dev/null; then
    found=$(dirname -- "$(realpath -- "$(command -v initdb)")")
  fi
  [[ -n $found && -x "$found/pg_ctl" ]] || return 1
  echo "$found"
}

# as_nobody COMMAND...: as the user nobody (PostgreSQL refuses root), from /.
as_nobody() {
  (cd / && setpriv --reuid="$(id -u nobody)" --regid="$(id -g nobody)" --clear-groups -- "$@")
}

# The postmaster's pid, if it runs.
db_pid() {
  local pid
  [[ -f "$PG_DIR/data/postmaster.pid" ]] || return 1
  pid=$(head -n 1 -- "$PG_DIR/data/postmaster.pid" | tr -dc '0-9')
  [[ -n $pid ]] && alive "$pid" || return 1
  echo "$pid"
}

# PostgreSQL in the db host: initdb under $STATE/db (owned by nobody) the first time,
# trust for the lab's network, listening on the db host's addresses; the database
# the replicas share made once.
start_db() {
  local ns pg log address listen fresh=0 uid gid i
  ns=$(ns_of db)
  address=${IPV4[db]}
  log=$(logfile_of db)
  ns_exists "$ns" || die "namespace $ns does not exist: is the lab up? (make lab)"
  if db_pid >/dev/null; then
    say "PostgreSQL is already running"
    return 0
  fi
  pg=$(find_pg_bin) || die "PostgreSQL's initdb not found: apt-get install postgresql (make lab-tools does it)"
  uid=$(id -u nobody) && gid=$(id -g nobody) || die "no user nobody for PostgreSQL"
  if [[ ! -d "$PG_DIR/data" ]]; then
    install -d -o "$uid" -g "$gid" -m 0700 -- "$PG_DIR" "$PG_DIR/run"
    as_nobody test -w "$PG_DIR" ||
      die "user nobody cannot write $PG_DIR: the directories above LAB_STATE must be searchable by others (chmod o+x), or set LAB_STATE elsewhere"
    as_nobody "$pg/initdb" -D "$PG_DIR/data" -U "$PG_USER" -A trust -E UTF8 --no-sync \
      >"$STATE/logs/db-initdb.log" 2>&1 || die "initdb failed (log: $STATE/logs/db-initdb.log)"
    listen=$address
    if ((HAVE_IPV6)); then listen+=",${IPV6[db]}"; fi
    cat >>"$PG_DIR/data/postgresql.conf" <<CONF

# kumazone lab: the db host's addresses only, a socket in its own directory.
port = $PG_PORT
listen_addresses = '$listen'
unix_socket_directories = '$PG_DIR/run'
fsync = off
synchronous_commit = off
full_page_writes = off
CONF
    cat >>"$PG_DIR/data/pg_hba.conf" <<CONF
# kumazone lab: the lab's network, without a password.
host all all 198.51.100.0/24 trust
host all all 2001:db8:100::/64 trust
CONF
    fresh=1
  fi
  touch -- "$log"
  chown -- "$uid:$gid" "$log"
  if ! ip netns exec "$ns" setpriv --reuid="$uid" --regid="$gid" --clear-groups -- \
    "$pg/pg_ctl" -D "$PG_DIR/data" -l "$log" -w -t 30 start >/dev/null 2>&1; then
    tail_log db
    die "PostgreSQL did not start (log: $log)"
  fi
  for ((i = 0; i < 100; i++)); do
    ip netns exec "$ns" "$pg/pg_isready" -q -h "$address" -p "$PG_PORT" -U "$PG_USER" && break
    sleep 0.1
  done
  if ((fresh)); then
    ip netns exec "$ns" "$pg/createdb" -h "$address" -p "$PG_PORT" -U "$PG_USER" "$PG_DATABASE" ||
      die "cannot create database $PG_DATABASE (log: $log)"
  fi
  say "db up in $ns: PostgreSQL (pid $(db_pid || echo '?'), as nobody) on $address:$PG_PORT, database $PG_DATABASE, log $log"
}

stop_db() {
  local pid pg
  pid=$(db_pid) || return 0
  pg=$(find_pg_bin) || pg=""
  if [[ -z $pg ]] || ! as_nobody "$pg/pg_ctl" -D "$PG_DIR/data" -m fast -w -t 10 stop >/dev/null 2>&1; then
    stop_pid "$pid" 10
  fi
  say "stopped PostgreSQL (pid $pid)"
}

# -- the cluster DNS ---------------------------------------------------------------------

# What the clients' resolv.conf names, as a cluster's DNS service would be: dnsmasq
# serving lab.test (one name in it) and nothing else, logging every query it gets.
start_cluster_dns() {
  local ns pidfile log dnsmasq listen
  ns=$(ns_of cluster-dns)
  pidfile=$(pidfile_of cluster-dns)
  log=$(logfile_of cluster-dns)
  dnsmasq=$(find_dnsmasq)
  if live_pid "$pidfile" >/dev/null; then
    say "the cluster DNS is already running"
    return 0
  fi
  # --no-resolv and no server: names outside lab.test are refused, nothing leaves the
  # lab.  --cache-size=0: the log shows every query that reached it.  Runs as root so
  # that it can write its log wherever the state is.
  listen=(--listen-address="${IPV4[cluster-dns]}")
  if ((HAVE_IPV6)); then listen+=(--listen-address="${IPV6[cluster-dns]}"); fi
  local records=(--address="/$OUTSIDE_NAME/$OUTSIDE_IPV4" --address="/$OUTSIDE_NAME/$OUTSIDE_IPV6")
  if ! ip netns exec "$ns" "$dnsmasq" --user=root --group=root \
    --pid-file="$pidfile" --log-facility="$log" --log-queries "${listen[@]}" --bind-interfaces \
    --port=53 --no-resolv --no-hosts --no-poll --cache-size=0 --local=/lab.test/ "${records[@]}"; then
    tail_log cluster-dns
    die "the cluster DNS (dnsmasq) did not start (log: $log)"
  fi
  say "cluster-dns up in $ns: dnsmasq on ${IPV4[cluster-dns]}:53 serving $OUTSIDE_NAME ($OUTSIDE_IPV4), log $log"
}

# -- client hosts: a dataplane and the transparent proxy -----------------------------

# The dataplanes' system user: made when missing (and remembered, so that `down`
# removes only what `up` made).
ensure_dp_user() {
  if id -u "$DP_USER" >/dev/null 2>&1; then
    return 0
  fi
  useradd --system --user-group --no-create-home --home-dir /nonexistent \
    --shell /usr/sbin/nologin --comment "kumazone lab dataplanes" "$DP_USER" ||
    die "cannot make the dataplanes' user $DP_USER (useradd failed)"
  echo "$DP_USER" >"$(dp_user_marker)"
  say "made system user $DP_USER for the dataplanes (removed again by make lab-down)"
}

remove_dp_user() {
  local marker
  marker=$(dp_user_marker)
  [[ -f "$marker" ]] || return 0
  if [[ "$(cat "$marker")" == "$DP_USER" ]] && id -u "$DP_USER" >/dev/null 2>&1; then
    if userdel "$DP_USER"; then
      say "removed system user $DP_USER"
    else
      say "could not remove system user $DP_USER (userdel failed): remove it by hand"
      return 0
    fi
  fi
  rm -f -- "$marker"
}

# The client host's resolver, as a pod's: /etc/resolv.conf names the cluster DNS, the
# transparent proxy takes every query on port 53 to the dataplane on this host (all
# users but the dataplane's), and the dataplane answers mesh. and the VIPs' reverse
# zones from its table and forwards the rest to resolv.conf's nameserver.
write_resolv_conf() {
  local client=$1 ns
  ns=$(ns_of "$client")
  mkdir -p "/etc/netns/$ns"
  cat >"/etc/netns/$ns/resolv.conf" <<EOF
# kumazone lab ($client, in ${ZONE_OF[$client]}): the cluster DNS.  The transparent proxy
# takes port 53 to this host's dataplane (127.0.0.1:$DP_DNS_PORT), which forwards here what is not its.
nameserver ${IPV4[cluster-dns]}
options timeout:1 attempts:2
EOF
}

start_dataplane() {
  local client=$1 ns zone cp data pidfile log key uid gid
  ns=$(ns_of "$client")
  zone=${ZONE_OF[$client]}
  cp="${IPV4[$zone]}:$DP_PORT"
  data="$STATE/data/$client"
  pidfile=$(dp_pidfile_of "$client")
  log=$(logfile_of "$client-dataplane")
  key="$STATE/certs/dp-$DP_MESH-$client-key.pem"
  ns_exists "$ns" || die "namespace $ns does not exist: is the lab up? (make lab)"
  if live_pid "$pidfile" >/dev/null; then
    say "$client's dataplane is already running"
    return 0
  fi
  uid=$(id -u "$DP_USER") && gid=$(id -g "$DP_USER") ||
    die "no user $DP_USER for the dataplanes: make lab-down, then make lab"
  # twistd -u/-g: started as root (so the interpreter and the virtualenv need not be
  # readable by the dataplane's user), it runs as that user from before its ports are
  # opened: the transparent proxy tells the dataplane's DNS answers apart by the owner
  # of the socket they leave from.  So the user needs its own data dir, key and log.
  install -d -o "$uid" -g "$gid" -m 0755 -- "$data" "$STATE/run/dataplanes"
  touch -- "$log"
  chown -- "$uid:$gid" "$log" "$key"
  if ! setpriv --reuid="$uid" --regid="$gid" --clear-groups test -w "$data"; then
    die "user $DP_USER cannot write $data: the directories above LAB_STATE must be searchable by others (chmod o+x), or set LAB_STATE elsewhere"
  fi
  launch_twistd "$client-dataplane" "$ns" "$pidfile" --uid="$uid" --gid="$gid" \
    kumazone --role=dataplane --cp-address="$cp" \
    --tls-cert="$STATE/certs/dp-$DP_MESH-$client.pem" --tls-key="$key" \
    --tls-ca="$STATE/certs/ca.pem" \
    --data-dir="$data" --dns-port="$DP_DNS_PORT" --diagnostics-port="$DP_DIAGNOSTICS_PORT"
  wait_ready "$client-dataplane" "$ns" "http://127.0.0.1:$DP_DIAGNOSTICS_PORT/ready"
  say "$client's dataplane up in $ns: $DP_MESH/$client as $DP_USER, DNS 127.0.0.1:$DP_DNS_PORT, table from $zone ($cp), log $log"
}

install_transparent_proxy() {
  local client=$1 ns family=dualstack log
  ns=$(ns_of "$client")
  log=$(logfile_of "$client-transparent-proxy")
  ((HAVE_IPV6)) || family=ipv4
  if ! ip netns exec "$ns" "$BIN/kumazone" install transparent-proxy \
    --kuma-dp-user "$DP_USER" --redirect-all-dns-traffic --ip-family-mode "$family" >"$log" 2>&1; then
    cat -- "$log" >&2
    die "kumazone install transparent-proxy failed in $ns (log: $log)"
  fi
  say "$client: transparent proxy installed in $ns (DNS on port 53 from all but $DP_USER -> 127.0.0.1:$DP_DNS_PORT)"
}

uninstall_transparent_proxy() {
  local client=$1 ns
  ns=$(ns_of "$client")
  ns_exists "$ns" || return 0
  if ip netns exec "$ns" "$BIN/kumazone" uninstall transparent-proxy >/dev/null 2>&1; then
    say "$client: transparent proxy uninstalled"
  else
    say "$client: kumazone uninstall transparent-proxy failed (the namespace goes anyway)"
  fi
}

# -- commands ------------------------------------------------------------------------

write_topology() {
  local host first=1
  {
    printf '{\n  "prefix": "%s",\n  "state": "%s",\n  "bin": "%s",\n  "dataplaneUser": "%s",\n  "hosts": {\n' \
      "$PREFIX" "$STATE" "$BIN" "$DP_USER"
    for host in "${HOSTS[@]}"; do
      ((first)) || printf ',\n'
      first=0
      printf '    "%s": {"namespace": "%s", "ipv4": "%s", "ipv6": "%s"' \
        "$host" "$(ns_of "$host")" "${IPV4[$host]}" "${IPV6[$host]}"
      case $host in
        global | global-*)
          printf ', "role": "global", "api": "http://%s:%s"' "${IPV4[$host]}" "$API_PORT"
          ((GLOBAL_REPLICAS == 1)) ||
            printf ', "diagnostics": "http://127.0.0.1:%s", "store": "%s"' "$DIAGNOSTICS_PORT" "$STORE_URL"
          ;;
        db) printf ', "role": "db", "postgresql": "%s:%s"' "${IPV4[$host]}" "$PG_PORT" ;;
        zone-*) printf ', "role": "zone", "api": "http://%s:%s", "dns": "%s:%s", "dp": "%s:%s"' \
          "${IPV4[$host]}" "$API_PORT" "${IPV4[$host]}" "$DNS_PORT" "${IPV4[$host]}" "$DP_PORT" ;;
        cluster-dns) printf ', "role": "cluster-dns", "dns": "%s:53", "outside": {"name": "%s", "ipv4": "%s", "ipv6": "%s"}' \
          "${IPV4[$host]}" "$OUTSIDE_NAME" "$OUTSIDE_IPV4" "$OUTSIDE_IPV6" ;;
        *) printf ', "role": "client", "zone": "%s", "dataplane": {"mesh": "%s", "name": "%s", "dns": "127.0.0.1:%s", "diagnostics": "http://127.0.0.1:%s", "cp": "%s:%s"}' \
          "${ZONE_OF[$host]}" "$DP_MESH" "$host" "$DP_DNS_PORT" "$DP_DIAGNOSTICS_PORT" "${IPV4[${ZONE_OF[$host]}]}" "$DP_PORT" ;;
      esac
      printf '}'
    done
    printf '\n  }\n}\n'
  } >"$STATE/lab.json"
}

make_certs() {
  local args=(--out "$STATE/certs" --global-host "${IPV4[global]}" --global-host "${IPV6[global]}"
    --global-host global --zone zone-1 --zone zone-2) zone client
  # The replicas share one certificate, which names each one's addresses.
  if ((GLOBAL_REPLICAS > 1)); then
    args+=(--global-host "${IPV4[global-2]}" --global-host "${IPV6[global-2]}" --global-host global-2)
  fi
  # Each zone's certificate names the zones' addresses, so that a dataplane can check
  # the zone it connects to; each client's dataplane gets a client certificate.
  for zone in zone-1 zone-2; do
    args+=(--zone-host "${IPV4[$zone]}" --zone-host "${IPV6[$zone]}")
  done
  for client in "${CLIENTS[@]}"; do args+=(--dataplane "$DP_MESH/$client"); done
  "$BIN/kumazone" certs "${args[@]}" >"$STATE/logs/certs.log" ||
    die "kumazone certs failed (log: $STATE/logs/certs.log)"
}

cmd_up() {
  check_prefix
  check_paths
  preflight
  local ns
  for ns in $(all_namespaces); do
    if ns_exists "$ns"; then
      die "namespace $ns exists: the lab is up or half up; run 'make lab-down' (lab/lab.sh down) first"
    fi
  done
  UP_DONE=0
  trap 'on_up_exit' EXIT
  trap 'exit 130' INT TERM HUP PIPE
  # A fresh lab every time: state from an earlier run goes, the CA is kept.
  mkdir -p "$STATE"
  rm -rf -- "$STATE/data" "$STATE/zones" "$STATE/logs" "$STATE/run" "$STATE/dns" "$STATE/lab.json" \
    "$PG_DIR" "$REPLICAS_FILE"
  mkdir -p "$STATE/data" "$STATE/zones" "$STATE/logs" "$STATE/run"
  if ((GLOBAL_REPLICAS > 1)); then echo "$GLOBAL_REPLICAS" >"$REPLICAS_FILE"; fi
  cp -r -- "$REPO/zones/zone-1" "$REPO/zones/zone-2" "$STATE/zones/"

  local names=() host
  for host in "${HOSTS[@]}"; do names+=("$(ns_of "$host")"); done
  say "network: $NET_NS (bridge $BRIDGE) and ${names[*]}"
  make_network
  write_topology
  make_certs
  say "certificates in $STATE/certs (kumazone certs, with dataplane certificates for ${CLIENTS[*]})"
  local name
  if ((GLOBAL_REPLICAS > 1)); then start_db; fi
  for name in "${CONTROL_PLANES[@]}"; do start_control_plane "$name"; done
  start_cluster_dns
  ensure_dp_user
  for name in "${CLIENTS[@]}"; do
    write_resolv_conf "$name"
    start_dataplane "$name"
    install_transparent_proxy "$name"
  done
  "$BIN/python" "$HERE/labctl.py" --state "$STATE" wait-synced --timeout 30
  UP_DONE=1
  say "up. Try: ip netns exec $(ns_of client-1) dig web.mesh; make lab-status; make lab-down"
}

# A failed `up` leaves nothing running: it tears down what it started.
on_up_exit() {
  local status=$?
  trap - EXIT
  if ((status != 0 && !UP_DONE)); then
    printf 'lab: up failed; tearing down what was started (logs stay in %s/logs)\n' "$STATE" >&2
    (cmd_down) >&2 || true
  fi
  exit "$status"
}

cmd_down() {
  check_prefix
  local name ns pid
  local stopping=()
  for name in "${CLIENTS[@]}"; do
    uninstall_transparent_proxy "$name"
    stopping+=("$name-dataplane" "$(dp_pidfile_of "$name")")
  done
  for name in cluster-dns zone-2 zone-1 global-2 global; do
    stopping+=("$name" "$(pidfile_of "$name")")
  done
  stop_named "${stopping[@]}"
  stop_db
  for ns in $(all_namespaces); do
    if ns_exists "$ns"; then
      # Anything still inside a lab namespace was started there by the lab.
      for pid in $(ip netns pids "$ns" 2>/dev/null); do
        say "stopping leftover pid $pid in $ns"
        stop_pid "$pid" 5
      done
      ip netns del "$ns"
      say "removed namespace $ns"
    fi
    rm -rf -- "/etc/netns/$ns"
  done
  rmdir /etc/netns 2>/dev/null || true
  remove_dp_user
  rm -rf -- "$STATE/lab.json" "$PG_DIR" "$REPLICAS_FILE"
  say "down"
}

need_up() {
  [[ -f "$STATE/lab.json" ]] || die "the lab is not up (no $STATE/lab.json): make lab"
}

cmd_status() {
  need_up
  exec "$BIN/python" "$HERE/labctl.py" --state "$STATE" status "$@"
}

host_arg() {
  case ${1:-} in
    global | zone-1 | zone-2 | client-1 | client-2) ;;
    global-2)
      ((GLOBAL_REPLICAS > 1)) ||
        die "there is no global-2: this lab runs one global (make lab LAB_GLOBAL_REPLICAS=2)"
      ;;
    *) die "expected global,${GLOBALS[1]:+ ${GLOBALS[1]},} zone-1, zone-2, client-1 or client-2 (its dataplane), got '${1:-}'" ;;
  esac
}

cmd_stop() {
  host_arg "${1:-}"
  need_up
  local name=$1 pidfile=""
  if [[ $name == client-* ]]; then
    pidfile=$(dp_pidfile_of "$name")
    name="$name-dataplane"
  else
    pidfile=$(pidfile_of "$name")
  fi
  if live_pid "$pidfile" >/dev/null; then
    stop_named "$name" "$pidfile"
  else
    say "$name is not running"
  fi
}

cmd_start() {
  host_arg "${1:-}"
  need_up
  if [[ $1 == client-* ]]; then
    start_dataplane "$1"
  else
    start_control_plane "$1"
  fi
}

main() {
  local command=${1:-}
  shift || true
  case $command in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status "$@" ;;
    stop) cmd_stop "$@" ;;
    start) cmd_start "$@" ;;
    wait-synced)
      need_up
      exec "$BIN/python" "$HERE/labctl.py" --state "$STATE" wait-synced --timeout "${1:-30}"
      ;;
    *)
      awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}" >&2
      exit 2
      ;;
  esac
}

set_hosts
main "$@"

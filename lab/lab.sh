#!/usr/bin/env bash
# The kumazone multi-zone lab in network namespaces (root needed).
#
#   lab/lab.sh up                      namespaces, certificates, global + two zones, resolvers
#   lab/lab.sh down                    stop everything, remove the namespaces (idempotent)
#   lab/lab.sh status                  each control plane side by side (lab/labctl.py)
#   lab/lab.sh stop  global|zone-1|zone-2
#   lab/lab.sh start global|zone-1|zone-2
#   lab/lab.sh wait-synced [SECONDS]   until both zones hold the global's table
#
# Environment: BIN (the virtualenv's bin, default .venv/bin), LAB_STATE (default
# lab/state), LAB_PREFIX (namespace names, default kzlab-).  Relative paths are taken
# from the directory lab.sh is called from.
#
# Topology: one namespace per host, each with an eth0 plugged into a bridge that lives
# in its own namespace (<prefix>net).  Nothing is added to the root namespace except
# /etc/netns/<prefix>client{1,2}/resolv.conf, which `ip netns exec` shows the clients
# as their /etc/resolv.conf.  Addresses are documentation addresses only.
set -Eeuo pipefail

PREFIX=${LAB_PREFIX:-kzlab-}
STATE=$(realpath -m -- "${LAB_STATE:-lab/state}")
BIN=$(realpath -m -- "${BIN:-.venv/bin}")
HERE=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname -- "$HERE")

NET_NS="${PREFIX}net"
BRIDGE=lab0
CONTROL_PLANES=(global zone-1 zone-2)
CLIENTS=(client-1 client-2)
HOSTS=("${CONTROL_PLANES[@]}" "${CLIENTS[@]}")
declare -A IPV4=(
  [global]=198.51.100.201 [zone-1]=198.51.100.211 [zone-2]=198.51.100.212
  [client-1]=198.51.100.221 [client-2]=198.51.100.222
)
declare -A IPV6=(
  [global]=2001:db8:100::201 [zone-1]=2001:db8:100::211 [zone-2]=2001:db8:100::212
  [client-1]=2001:db8:100::221 [client-2]=2001:db8:100::222
)
# Which zone a client host lives in.
declare -A ZONE_OF=([client-1]=zone-1 [client-2]=zone-2)
# Without IPv6 in the kernel the lab is IPv4 only.
HAVE_IPV6=0
[[ -d /proc/sys/net/ipv6 ]] && HAVE_IPV6=1
DNS_PORT=5653
API_PORT=5681
DIAGNOSTICS_PORT=5680
KDS_PORT=5685

say() { printf 'lab: %s\n' "$*"; }
die() {
  printf 'lab: error: %s\n' "$*" >&2
  exit 1
}

# client-1 -> <prefix>client1
ns_of() { printf '%s%s' "$PREFIX" "${1//-/}"; }
all_namespaces() {
  local host
  for host in "${HOSTS[@]}"; do ns_of "$host"; echo; done
  echo "$NET_NS"
}
ns_exists() { [[ -e "/run/netns/$1" || -e "/var/run/netns/$1" ]]; }
pidfile_of() { printf '%s/run/%s.pid' "$STATE" "$1"; }
logfile_of() { printf '%s/logs/%s.log' "$STATE" "$1"; }

check_paths() {
  case $STATE in
    / | "$REPO" | "$REPO/lab" | "$HOME") die "LAB_STATE '$STATE' would wipe more than the lab's state" ;;
  esac
}

check_prefix() {
  [[ "$PREFIX" =~ ^[a-z0-9][a-z0-9-]{0,15}$ ]] ||
    die "LAB_PREFIX '$PREFIX' must be 1-16 of a-z, 0-9 and '-', starting with a letter or digit"
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

stop_named() {
  local name=$1 pidfile pid
  pidfile=$(pidfile_of "$name")
  if pid=$(live_pid "$pidfile"); then
    stop_pid "$pid"
    say "stopped $name (pid $pid)"
  fi
  rm -f -- "$pidfile"
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

# -- control planes ------------------------------------------------------------------

start_control_plane() {
  local name=$1 ns address pidfile log args
  ns=$(ns_of "$name")
  address=${IPV4[$name]}
  pidfile=$(pidfile_of "$name")
  log=$(logfile_of "$name")
  ns_exists "$ns" || die "namespace $ns does not exist: is the lab up? (make lab)"
  if live_pid "$pidfile" >/dev/null; then
    say "$name is already running"
    return 0
  fi
  args=(
    --data-dir="$STATE/data/$name"
    --api-interface="$address" --api-port="$API_PORT" --diagnostics-port="$DIAGNOSTICS_PORT"
    --tls-ca="$STATE/certs/ca.pem"
  )
  if [[ $name == global ]]; then
    args+=(
      --role=global --kds-interface="$address" --kds-port="$KDS_PORT"
      --tls-cert="$STATE/certs/global.pem" --tls-key="$STATE/certs/global-key.pem"
    )
  else
    args+=(
      --role=zone --zone="$name" --global="${IPV4[global]}:$KDS_PORT"
      --resources="$STATE/zones/$name"
      --dns-interface="$address" --dns-port="$DNS_PORT"
      --tls-cert="$STATE/certs/$name.pem" --tls-key="$STATE/certs/$name-key.pem"
    )
  fi
  # twistd daemonizes and returns once the service has started (ports bound).  When
  # the daemon dies at start-up with SystemExit (kumazone's "cannot start: ..."), the
  # launching twistd waits for it forever: so watch the daemon too.
  rm -f -- "$pidfile"
  ip netns exec "$ns" "$BIN/twistd" --pidfile="$pidfile" --logfile="$log" \
    kumazone "${args[@]}" &
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
  if ! ip netns exec "$ns" "$BIN/python" "$HERE/labctl.py" wait \
    "http://127.0.0.1:$DIAGNOSTICS_PORT/ready" --timeout 20; then
    tail_log "$name"
    die "$name is not ready after 20s (log: $log)"
  fi
  say "$name up in $ns: API http://$address:$API_PORT$([[ $name == global ]] && echo ", zone sync $address:$KDS_PORT" || echo ", DNS $address:$DNS_PORT"), log $log"
}

# -- client resolvers ----------------------------------------------------------------

start_resolver() {
  local client=$1 ns zone server pidfile log dnsmasq dropin
  ns=$(ns_of "$client")
  zone=${ZONE_OF[$client]}
  server="${IPV4[$zone]}:$DNS_PORT"
  pidfile=$(pidfile_of "$client-dnsmasq")
  log=$(logfile_of "$client-dnsmasq")
  dnsmasq=$(find_dnsmasq)
  if live_pid "$pidfile" >/dev/null; then
    say "$client's resolver is already running"
    return 0
  fi
  # The client host's system resolver, as a pod has: /etc/resolv.conf -> a local
  # forwarder that sends mesh. (and the VIPs' reverse zones) to its zone's control plane.
  mkdir -p "/etc/netns/$ns"
  cat >"/etc/netns/$ns/resolv.conf" <<EOF
# kumazone lab ($client, in $zone): dnsmasq on this host forwards mesh. to ${zone}'s control plane
nameserver ${IPV4[$client]}
options timeout:1 attempts:2
EOF
  # What to forward (the domain and the VIP reverse zones, as the zones are configured:
  # same environment) is kumazone's own drop-in, loaded as dnsmasq's one config file.
  dropin="$STATE/dns/$client-dnsmasq.conf"
  mkdir -p "$STATE/dns"
  "$BIN/kumazone" install dns --flavor dnsmasq --cp-address "$server" >"$dropin" ||
    die "kumazone install dns --flavor dnsmasq --cp-address $server failed"
  # The rest are this host's settings.  --no-resolv and no server but the drop-in's:
  # any other name is refused, nothing leaves the lab.  --cache-size=0: every answer
  # is the control plane's of the moment (a real host resolver would cache for the
  # TTL, 60 s).  Runs as root so that it can write its log wherever the state is.
  local listen=(--listen-address="${IPV4[$client]}")
  if ((HAVE_IPV6)); then listen+=(--listen-address="${IPV6[$client]}"); fi
  if ! ip netns exec "$ns" "$dnsmasq" --conf-file="$dropin" --user=root --group=root \
    --pid-file="$pidfile" --log-facility="$log" --log-queries "${listen[@]}" --bind-interfaces \
    --port=53 --no-resolv --no-hosts --no-poll --domain-needed --cache-size=0; then
    tail_log "$client-dnsmasq"
    die "$client's resolver (dnsmasq) did not start (log: $log)"
  fi
  say "$client up in $ns: resolver dnsmasq on ${IPV4[$client]}:53 -> mesh. at $zone ($server), config $dropin"
}

# -- commands ------------------------------------------------------------------------

write_topology() {
  local host first=1
  {
    printf '{\n  "prefix": "%s",\n  "state": "%s",\n  "bin": "%s",\n  "hosts": {\n' \
      "$PREFIX" "$STATE" "$BIN"
    for host in "${HOSTS[@]}"; do
      ((first)) || printf ',\n'
      first=0
      printf '    "%s": {"namespace": "%s", "ipv4": "%s", "ipv6": "%s"' \
        "$host" "$(ns_of "$host")" "${IPV4[$host]}" "${IPV6[$host]}"
      case $host in
        global) printf ', "role": "global", "api": "http://%s:%s"' "${IPV4[$host]}" "$API_PORT" ;;
        zone-*) printf ', "role": "zone", "api": "http://%s:%s", "dns": "%s:%s"' \
          "${IPV4[$host]}" "$API_PORT" "${IPV4[$host]}" "$DNS_PORT" ;;
        *) printf ', "role": "client", "zone": "%s"' "${ZONE_OF[$host]}" ;;
      esac
      printf '}'
    done
    printf '\n  }\n}\n'
  } >"$STATE/lab.json"
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
  rm -rf -- "$STATE/data" "$STATE/zones" "$STATE/logs" "$STATE/run" "$STATE/dns" "$STATE/lab.json"
  mkdir -p "$STATE/data" "$STATE/zones" "$STATE/logs" "$STATE/run"
  cp -r -- "$REPO/zones/zone-1" "$REPO/zones/zone-2" "$STATE/zones/"

  say "network: $NET_NS (bridge $BRIDGE) and $(ns_of global), $(ns_of zone-1), $(ns_of zone-2), $(ns_of client-1), $(ns_of client-2)"
  make_network
  write_topology
  "$BIN/kumazone" certs --out "$STATE/certs" --global-host "${IPV4[global]}" \
    --global-host "${IPV6[global]}" --global-host global --zone zone-1 --zone zone-2 \
    >"$STATE/logs/certs.log"
  say "certificates in $STATE/certs (kumazone certs)"
  local name
  for name in "${CONTROL_PLANES[@]}"; do start_control_plane "$name"; done
  for name in "${CLIENTS[@]}"; do start_resolver "$name"; done
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
  for name in "${CLIENTS[@]}"; do stop_named "$name-dnsmasq"; done
  for name in zone-2 zone-1 global; do stop_named "$name"; done
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
  rm -f -- "$STATE/lab.json"
  say "down"
}

need_up() {
  [[ -f "$STATE/lab.json" ]] || die "the lab is not up (no $STATE/lab.json): make lab"
}

cmd_status() {
  need_up
  exec "$BIN/python" "$HERE/labctl.py" --state "$STATE" status "$@"
}

control_plane_arg() {
  case ${1:-} in
    global | zone-1 | zone-2) ;;
    *) die "expected global, zone-1 or zone-2, got '${1:-}'" ;;
  esac
}

cmd_stop() {
  control_plane_arg "${1:-}"
  need_up
  local pidfile
  pidfile=$(pidfile_of "$1")
  if live_pid "$pidfile" >/dev/null; then
    stop_named "$1"
  else
    say "$1 is not running"
  fi
}

cmd_start() {
  control_plane_arg "${1:-}"
  need_up
  start_control_plane "$1"
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

main "$@"

#!/usr/bin/env bash
# local-cluster.sh start [--nodes 1|2] | stop | status — a real SLURM on one Debian/Ubuntu
# machine, for trying the kit without a cluster and for the tests. Runs as root, no systemd.
#
#   sudo slurm/local-cluster.sh start             # install (first time), configure, start, wait
#   sudo slurm/local-cluster.sh start --nodes 2   # a second node in its own network namespace
#   slurm/local-cluster.sh status                 # daemons and sinfo
#   sudo slurm/local-cluster.sh stop              # cancel jobs, stop daemons
#
# What it stands up: munged; MariaDB (unix socket only) + slurmdbd, because submitit reads job
# states with sacct (without accounting a killed job reads UNKNOWN and result() hangs);
# slurmctld + slurmd, partitions `debug` (default) and `a100`, fake GPUs (gres on /dev/null
# aliases, no hardware) so --gpus-per-node is accepted, more CPUs than cores so several small
# jobs run at once. Nothing is enforced (no cgroups): requests are bookkeeping only.
#
# Two nodes on one machine: the second slurmd runs in network namespace nanochat-n2, joined by
# a veth pair named sl0 on both sides (host 10.200.0.1, node2 10.200.0.2), with its own host
# name, so a 2-node job really talks across two addresses. Jobs resolve the first node's
# address with `scontrol show node`; gloo needs GLOO_SOCKET_IFNAME=sl0.
#
# Profiles: `start --profile harsh` stands up a SECOND, separate one-node cluster beside the default
# one (its own ClusterName nanochat-harsh, ports 6917/6918, configuration in
# $LOCAL_SLURM_ROOT-harsh/etc, state, spool and logs there too) as harsh as real sites: no
# accounting (sacct fails), job records purged after 5 s (MinJobAge), and preemption — partition
# `low` (default) is preempted by partition `high` with PreemptMode=REQUEUE and GraceTime=30, so
# a job there gets SIGTERM, then SIGKILL 30 s later, and is requeued — and CPU binding
# (TaskPlugin=task/affinity: each task pinned to the CPUs SLURM gave it) where the container lets
# a process set its affinity, else task/none with a message (LOCAL_SLURM_AFFINITY=0 turns it off;
# bound, a step cannot ask for more CPUs than the machine really has). Clients choose it with
# SLURM_CONF=$LOCAL_SLURM_ROOT-harsh/etc/slurm.conf; `stop --profile harsh` stops it alone. The
# tests start it (tests/conftest.py `harsh_slurm`) and stop it at the end.
#
# Settings (environment): LOCAL_SLURM_ROOT state/log dir [/var/tmp/nanochat-slurm],
# LOCAL_SLURM_CPUS advertised CPUs per node [16], LOCAL_SLURM_GPUS fake GPUs per node [8],
# LOCAL_SLURM_MEM_MB advertised memory [65536], LOCAL_SLURM_WAIT_S start timeout [120].
#
# It only ever touches a SLURM it set up itself: when /etc/slurm/slurm.conf exists without the
# marker file it writes next to it (/etc/slurm/.nanochat-local-cluster), or a SLURM daemon runs
# that it did not start, start and stop refuse and change nothing — on a real cluster's login
# node this script must never rewrite the site's configuration or stop its daemons.
set -euo pipefail

BASE_ROOT="${LOCAL_SLURM_ROOT:-/var/tmp/nanochat-slurm}"
ROOT="$BASE_ROOT"
HOST="$(hostname -s)"
CPUS="${LOCAL_SLURM_CPUS:-16}"
GPUS="${LOCAL_SLURM_GPUS:-8}"
MEM_MB="${LOCAL_SLURM_MEM_MB:-65536}"
WAIT_S="${LOCAL_SLURM_WAIT_S:-120}"
CLUSTER=nanochat-local
NS=nanochat-n2
PKGS=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server iproute2)
MARKER=/etc/slurm/.nanochat-local-cluster   # "this host's SLURM configuration is ours"
HEADER="# written by nanochat-slurm's slurm/local-cluster.sh"

say() { echo "[local-cluster] $*"; }
die() { echo "[local-cluster] error: $*" >&2; exit 1; }
# pid in FILE if that process is alive and named COMM (pid files may outlive their process)
pid_of() { local p; p=$(cat "$1" 2>/dev/null || true); [ -n "$p" ] && [ "$(cat "/proc/$p/comm" 2>/dev/null)" = "$2" ] && echo "$p" || true; }
need_root() { [ "$(id -u)" = 0 ] || die "run as root (sudo $0 $1)"; }

# Refuse (change nothing) unless every SLURM configuration and daemon on this host is ours.
refuse_foreign() {
  local conf=/etc/slurm/slurm.conf comm pid f ours=""
  if [ -n "${SLURM_CONF:-}" ] && [ "$SLURM_CONF" != "$conf" ] && \
     ! head -1 "$SLURM_CONF" 2>/dev/null | grep -F "$HEADER" >/dev/null; then
    die "SLURM_CONF points at $SLURM_CONF: this host uses a SLURM configuration this script did not write; it leaves it alone (unset SLURM_CONF only if that cluster is yours to replace)"
  fi
  # ours: no configuration yet, or the one this script wrote (its header line; the marker says
  # the same to the test suite, tests/conftest.py)
  if [ -e "$conf" ] && ! head -1 "$conf" | grep -F "$HEADER" >/dev/null; then
    die "$conf was not written by this script: this host has its own SLURM, which this script leaves alone; use that cluster (python jobs/launch.py ... --executor slurm), or run the local cluster on a machine without one"
  fi
  for f in "$BASE_ROOT/run/slurmctld.pid" "$BASE_ROOT"/run/slurmd-*.pid "$BASE_ROOT/run/slurmdbd.pid" \
           "$BASE_ROOT"-*/run/slurmctld.pid "$BASE_ROOT"-*/run/slurmd-*.pid; do
    if [ -e "$f" ]; then ours="$ours $(cat "$f" 2>/dev/null || true)"; fi
  done
  for pid in $(ls /proc | grep -E '^[0-9]+$'); do
    comm=$(cat "/proc/$pid/comm" 2>/dev/null || true)
    case "$comm" in
      slurmctld|slurmd|slurmdbd)
        case " $ours " in *" $pid "*) ;; *)
          die "a $comm (pid $pid) runs that this script did not start: this host has its own SLURM, which this script leaves alone" ;;
        esac ;;
    esac
  done
  return 0
}

install_packages() {
  local missing=() p
  for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep 'install ok installed' >/dev/null || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  command -v apt-get >/dev/null || die "apt-get not found: this script supports Debian/Ubuntu"
  say "installing ${missing[*]}"
  # Package scripts must not start daemons before our configuration exists.
  local policy=0 ok=0 i
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && policy=1
  fi
  for i in 1 2 3 4 5; do  # another apt user may hold the lock; mirrors hiccup
    if DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 -qq update >"$ROOT/log/apt.log" 2>&1 &&
       DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 -qq install -y \
         --no-install-recommends "${missing[@]}" >>"$ROOT/log/apt.log" 2>&1; then ok=1; break; fi
    say "apt-get failed (attempt $i), retrying"; sleep 3
  done
  [ $policy = 1 ] && rm -f /usr/sbin/policy-rc.d
  [ $ok = 1 ] || { tail -5 "$ROOT/log/apt.log" >&2; die "could not install ${missing[*]} (log: $ROOT/log/apt.log)"; }
}

start_munge() {
  [ -s /etc/munge/munge.key ] || mungekey --create --keyfile=/etc/munge/munge.key --force
  chown munge:munge /etc/munge/munge.key && chmod 0600 /etc/munge/munge.key
  install -d -o munge -g munge -m 0755 /run/munge
  install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge
  munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
  runuser -u munge -- /usr/sbin/munged --force
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0; sleep 0.1; done
  die "munged did not start (see /var/log/munge/munged.log)"
}

setup_netns() {  # the second "host": a network namespace joined to this one by a veth pair
  # grep reads its whole input, never -q: under pipefail a writer killed by SIGPIPE when grep -q
  # quits early fails the test, and the "missing" thing would be added a second time
  ip netns list | grep -w "$NS" >/dev/null || ip netns add "$NS"
  if ! ip link show sl0 >/dev/null 2>&1; then
    ip link add sl0 type veth peer name sl0p
    ip link set sl0p netns "$NS"
    ip netns exec "$NS" ip link set sl0p name sl0
  fi
  ip addr show sl0 | grep 10.200.0.1/24 >/dev/null || ip addr add 10.200.0.1/24 dev sl0
  ip link set sl0 up
  ip netns exec "$NS" sh -c 'ip addr show sl0 | grep -q 10.200.0.2/24 || ip addr add 10.200.0.2/24 dev sl0
                             ip link set sl0 up; ip link set lo up'
  # Real clusters resolve their node names (torchrun looks its own host name up): so must we.
  grep -qE '^10\.200\.0\.2[[:space:]]+node2' /etc/hosts || echo "10.200.0.2 node2  # nanochat local-cluster" >> /etc/hosts
}

node_line() {  # node_line NAME ADDR
  echo "NodeName=$1 NodeAddr=$2 NodeHostname=$1 CPUs=$CPUS Boards=1 SocketsPerBoard=1" \
       "CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=$MEM_MB Gres=gpu:$GPUS State=UNKNOWN"
}

conf_common() {  # conf_common TASKPLUGIN MINJOBAGE LINE...: the slurm.conf lines every cluster here
  # shares; LINE... (accounting, preemption) are the profile's own, after the scheduler's
  local task=$1 min_age=$2
  shift 2
  cat <<CONF
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=$task
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
CONF
  printf '%s\n' "$@"
  cat <<CONF
JobAcctGatherType=jobacct_gather/none
GresTypes=gpu
SlurmdParameters=config_overrides
StateSaveLocation=$ROOT/state
SlurmdSpoolDir=$ROOT/spool/%n
SlurmctldPidFile=$ROOT/run/slurmctld.pid
SlurmdPidFile=$ROOT/run/slurmd-%n.pid
SlurmctldLogFile=$ROOT/log/slurmctld.log
SlurmdLogFile=$ROOT/log/slurmd-%n.log
ReturnToService=2
MinJobAge=$min_age
KillWait=10
InactiveLimit=0
EnforcePartLimits=ALL
MailProg=/bin/true
FirstJobId=$(cat "$ROOT/first_job_id")
CONF
}

# Writes the configuration; returns 0 when it differs from what the daemons run with.
write_config() {
  local addr=127.0.0.1 nodes="$HOST" f changed=1 i
  [ "$NODES" = 2 ] && addr=10.200.0.1 && nodes="$HOST,node2"
  # Job ids from the clock: a fresh state dir would restart at 1, and a reused submitit folder
  # would then return an earlier cluster's result for the same id.
  [ -s "$ROOT/first_job_id" ] || echo $(( ($(date +%s) * 10) % 60000000 + 1000 )) > "$ROOT/first_job_id"
  mkdir -p "$ROOT/fakegpu" "$ROOT/spool/$HOST" "$ROOT/spool/node2" /etc/slurm
  for i in $(seq 0 $((GPUS - 1))); do  # gres needs a device file per GPU
    [ -e "$ROOT/fakegpu/nvidia$i" ] || mknod "$ROOT/fakegpu/nvidia$i" c 1 3
  done
  {
    echo "$HEADER ($NODES node(s))"
    echo "ClusterName=$CLUSTER"
    echo "SlurmctldHost=$HOST($addr)"
    conf_common task/none 3600 AccountingStorageType=accounting_storage/slurmdbd \
      "AccountingStorageHost=$addr" AccountingStorageTRES=gres/gpu
    node_line "$HOST" "$addr"
    [ "$NODES" = 2 ] && node_line node2 10.200.0.2
    echo "PartitionName=debug Nodes=$nodes Default=YES MaxTime=INFINITE State=UP"
    echo "PartitionName=a100 Nodes=$nodes Default=NO MaxTime=INFINITE State=UP"
  } > "$ROOT/slurm.conf.new"
  {
    echo "AutoDetect=off"
    echo "NodeName=$HOST Name=gpu File=$ROOT/fakegpu/nvidia[0-$((GPUS - 1))]"
    [ "$NODES" = 2 ] && echo "NodeName=node2 Name=gpu File=$ROOT/fakegpu/nvidia[0-$((GPUS - 1))]"
  } > "$ROOT/gres.conf.new"
  cat > "$ROOT/slurmdbd.conf.new" <<CONF
AuthType=auth/munge
DbdHost=localhost
DbdAddr=$addr
SlurmUser=root
LogFile=$ROOT/log/slurmdbd.log
PidFile=$ROOT/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageLoc=slurm_acct_db
StorageUser=root
CONF
  changed=1
  echo "slurm/local-cluster.sh of nanochat-slurm wrote slurm.conf, gres.conf and slurmdbd.conf here; it may rewrite them" > "$MARKER"
  for f in slurm.conf gres.conf slurmdbd.conf; do
    cmp -s "$ROOT/$f.new" "/etc/slurm/$f" || changed=0
    mv -f "$ROOT/$f.new" "/etc/slurm/$f"
  done
  chmod 0600 /etc/slurm/slurmdbd.conf
  return $changed
}

start_db() {
  install -d -o mysql -g mysql -m 0755 /run/mysqld
  mysqladmin --protocol=socket ping >/dev/null 2>&1 && return 0
  [ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=mysql --datadir=/var/lib/mysql >"$ROOT/log/mariadb-install.log" 2>&1
  touch "$ROOT/log/mariadb.log" && chown mysql:mysql "$ROOT/log/mariadb.log"
  # Unix socket only; root@localhost authenticates by socket, so slurmdbd needs no password.
  setsid /usr/sbin/mariadbd --user=mysql --datadir=/var/lib/mysql --socket=/run/mysqld/mysqld.sock \
    --pid-file=/run/mysqld/mysqld.pid --skip-networking --innodb-buffer-pool-size=64M \
    --log-error="$ROOT/log/mariadb.log" </dev/null >/dev/null 2>&1 &
  for _ in $(seq 300); do mysqladmin --protocol=socket ping >/dev/null 2>&1 && return 0; sleep 0.1; done
  tail -5 "$ROOT/log/mariadb.log" >&2; die "MariaDB did not start (log: $ROOT/log/mariadb.log)"
}

wait_idle() {  # wait_idle NODE DEADLINE
  local state resumed=0
  while :; do
    state=$(sinfo -h -n "$1" -o %T 2>/dev/null | head -1 || true)
    case "$state" in
      idle|mixed|allocated|completing) return 0 ;;
      down*|drain*|fail*) [ $resumed = 1 ] || scontrol update nodename="$1" state=resume >/dev/null 2>&1 || true; resumed=1 ;;
    esac
    if [ "$(date +%s)" -ge "$2" ]; then
      tail -5 "$ROOT/log/slurmctld.log" "$ROOT/log/slurmd-$1.log" >&2 || true
      die "node $1 is '$state' after ${WAIT_S}s (logs in $ROOT/log)"
    fi
    sleep 0.2
  done
}

start_slurm() {
  if [ -z "$(pid_of "$ROOT/run/slurmdbd.pid" slurmdbd)" ]; then
    /usr/sbin/slurmdbd
    for _ in $(seq 300); do sacctmgr -n -P show cluster >/dev/null 2>&1 && break; sleep 0.1; done
  fi
  sacctmgr -n -P show cluster format=cluster 2>/dev/null | grep -x "$CLUSTER" >/dev/null || sacctmgr -i add cluster "$CLUSTER" >/dev/null
  [ -n "$(pid_of "$ROOT/run/slurmctld.pid" slurmctld)" ] || /usr/sbin/slurmctld -c -i
  [ -n "$(pid_of "$ROOT/run/slurmd-$HOST.pid" slurmd)" ] || /usr/sbin/slurmd -N "$HOST"
  if [ "$NODES" = 2 ] && [ -z "$(pid_of "$ROOT/run/slurmd-node2.pid" slurmd)" ]; then
    # `ip netns exec` hides /sys/fs/cgroup and slurmd exits: enter the namespace with nsenter
    nsenter --net="/run/netns/$NS" unshare --uts sh -c 'hostname node2 && exec /usr/sbin/slurmd -N node2'
  fi
  local deadline=$(( $(date +%s) + WAIT_S ))
  wait_idle "$HOST" "$deadline"
  [ "$NODES" = 2 ] && wait_idle node2 "$deadline"
  return 0
}

stop_pid() {  # stop_pid FILE COMM: TERM, wait up to 20 s, then KILL
  local pid; pid=$(pid_of "$1" "$2"); [ -n "$pid" ] || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 200); do kill -0 "$pid" 2>/dev/null || { say "stopped $2"; return 0; }; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true; say "killed $2"
}

stop_slurm() {
  local f
  for f in "$ROOT"/run/slurmd-*.pid; do [ -e "$f" ] && stop_pid "$f" slurmd; done
  stop_pid "$ROOT/run/slurmctld.pid" slurmctld
  stop_pid "$ROOT/run/slurmdbd.pid" slurmdbd
}

# ---- profiles: a separate cluster instance beside the default one (see the header) ----------
task_plugin() {  # the profile's TaskPlugin: CPU binding where this container lets a process bind
  # task/affinity pins each task to the CPUs SLURM gave it (sched_setaffinity), as real sites do;
  # a container whose seccomp or cpuset forbids that would fail every step: task/none there.
  if [ "${LOCAL_SLURM_AFFINITY:-1}" = 1 ] && command -v taskset >/dev/null && taskset -c 0 true 2>/dev/null; then
    echo task/affinity
  else
    say "profile $PROFILE: no CPU binding (TaskPlugin=task/none): this container does not let a process set its CPU affinity (taskset -c 0 failed), or LOCAL_SLURM_AFFINITY=0" >&2
    echo task/none
  fi
}

profile_config() {  # writes $ROOT/etc/{slurm,gres}.conf of profile $PROFILE
  local i task
  task=$(task_plugin)
  mkdir -p "$ROOT"/{etc,log,run,state,spool/"$HOST",fakegpu}
  for i in $(seq 0 $((GPUS - 1))); do
    [ -e "$ROOT/fakegpu/nvidia$i" ] || mknod "$ROOT/fakegpu/nvidia$i" c 1 3
  done
  [ -s "$ROOT/first_job_id" ] || echo $(( ($(date +%s) * 10) % 20000000 + 45000000 )) > "$ROOT/first_job_id"
  {
    echo "$HEADER (profile $PROFILE: no accounting, MinJobAge=5, preemption low<high REQUEUE GraceTime=30, $task)"
    cat <<CONF
ClusterName=nanochat-$PROFILE
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=6917
SlurmdPort=6918
CONF
    conf_common "$task" 5 PreemptType=preempt/partition_prio PreemptMode=REQUEUE \
      AccountingStorageType=accounting_storage/none
    node_line "$HOST" 127.0.0.1
    echo "PartitionName=low Nodes=$HOST Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=30"
    echo "PartitionName=high Nodes=$HOST Default=NO MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF"
  } > "$ROOT/etc/slurm.conf"
  {
    echo "AutoDetect=off"
    echo "NodeName=$HOST Name=gpu File=$ROOT/fakegpu/nvidia[0-$((GPUS - 1))]"
  } > "$ROOT/etc/gres.conf"
}

profile_start() {
  need_root start
  refuse_foreign
  mkdir -p "$ROOT/log"
  install_packages
  start_munge
  profile_config
  export SLURM_CONF="$ROOT/etc/slurm.conf"
  [ -n "$(pid_of "$ROOT/run/slurmctld.pid" slurmctld)" ] || /usr/sbin/slurmctld -c -i -f "$SLURM_CONF"
  [ -n "$(pid_of "$ROOT/run/slurmd-$HOST.pid" slurmd)" ] || /usr/sbin/slurmd -N "$HOST" -f "$SLURM_CONF"
  wait_idle "$HOST" $(( $(date +%s) + WAIT_S ))
  say "profile $PROFILE ready: SLURM_CONF=$SLURM_CONF (cluster nanochat-$PROFILE; partitions low (default, preemptible) and high)"
}

profile_stop() {
  need_root stop
  export SLURM_CONF="$ROOT/etc/slurm.conf"
  [ -e "$SLURM_CONF" ] || { say "profile $PROFILE: nothing to stop"; return 0; }
  head -1 "$SLURM_CONF" | grep -F "$HEADER" >/dev/null || die "$SLURM_CONF was not written by this script"
  if [ -n "$(pid_of "$ROOT/run/slurmctld.pid" slurmctld)" ]; then
    scancel --full --quiet "--user=$(id -un)" 2>/dev/null || true
  fi
  stop_pid "$ROOT/run/slurmd-$HOST.pid" slurmd
  stop_pid "$ROOT/run/slurmctld.pid" slurmctld
}

NODES=1
PROFILE=""
if [ "${2:-}" = "--nodes" ]; then NODES="${3:-}"; fi
if [ "${2:-}" = "--profile" ]; then PROFILE="${3:-}"; fi
case "$NODES" in 1|2) ;; *) die "--nodes must be 1 or 2" ;; esac
if [ -n "$PROFILE" ]; then
  [ "$PROFILE" = harsh ] || die "--profile: the one profile is 'harsh'"
  ROOT="$BASE_ROOT-$PROFILE"
  case "${1:-}" in
    start) profile_start ;;
    stop) profile_stop ;;
    status) SLURM_CONF="$ROOT/etc/slurm.conf" sinfo || exit 1 ;;
    *) echo "usage: $0 start|stop|status --profile harsh" >&2; exit 2 ;;
  esac
  exit 0
fi

case "${1:-}" in
  start)
    need_root start
    refuse_foreign
    t0=$(date +%s)
    mkdir -p "$ROOT"/{log,run,state,spool}
    install_packages
    start_munge
    [ "$NODES" = 2 ] && setup_netns
    if write_config; then
      say "configuration changed: restarting the slurm daemons"
      stop_slurm
    fi
    start_db
    start_slurm
    say "ready in $(( $(date +%s) - t0 )) s: $NODES node(s), partitions debug (default) and a100, $GPUS fake GPUs per node"
    sinfo
    ;;
  stop)
    need_root stop
    refuse_foreign
    if [ -n "$(pid_of "$ROOT/run/slurmctld.pid" slurmctld)" ]; then
      scancel --full --quiet "--user=$(id -un)" 2>/dev/null || true
    fi
    stop_slurm
    stop_pid /run/mysqld/mysqld.pid mariadbd
    ;;
  status)
    for d in "slurmctld:$ROOT/run/slurmctld.pid" "slurmd:$ROOT/run/slurmd-$HOST.pid" \
             "slurmd:$ROOT/run/slurmd-node2.pid" "slurmdbd:$ROOT/run/slurmdbd.pid" \
             "mariadbd:/run/mysqld/mysqld.pid"; do
      name=${d%%:*}; pid=$(pid_of "${d#*:}" "$name")
      if [ -n "$pid" ]; then echo "$name: running (pid $pid)"; else echo "$name: stopped"; fi
    done
    sinfo 2>/dev/null || { echo "sinfo: no controller answers"; exit 1; }
    ;;
  *)
    echo "usage: $0 start [--nodes 1|2] | stop | status" >&2; exit 2 ;;
esac

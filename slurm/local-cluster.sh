#!/usr/bin/env bash
# A real two-node SLURM cluster on this one machine, to try the sbatch templates and `genbench submit`
# on a laptop and to test them in CI. Debian/Ubuntu, as root (or with sudo).
#
#   slurm/local-cluster.sh          install slurmctld/slurmd/munge if missing, configure, start, wait until idle
#   slurm/local-cluster.sh status   sinfo of the cluster
#   slurm/local-cluster.sh stop     stop the daemons (the configuration and state stay)
#
# Two SLURM nodes, gb1 and gb2, are two slurmd daemons on localhost (`slurmd -N NAME`, each with its own
# port), so multi-node jobs (srun over 2 nodes, Lightning DDP across them) run for real. Processes are
# tracked with proctrack/linuxproc and not bound (task/none): no cgroups or systemd needed, which also
# makes it work in containers. The configuration is /etc/slurm/slurm.conf; one that genbench did not
# write is never replaced.
set -euo pipefail

NODES=(gb1 gb2)
PORTS=(17001 17002)
STATE=${GENBENCH_SLURM_STATE:-/var/lib/genbench-slurm}
CONF=/etc/slurm/slurm.conf
MARK="# written by genbench slurm/local-cluster.sh"

SUDO=""
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null || { echo "local-cluster.sh: run as root (or install sudo)" >&2; exit 1; }
  SUDO=sudo
fi

install_packages() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
    && command -v munged >/dev/null && return
  command -v apt-get >/dev/null || { echo "local-cluster.sh: needs apt-get (Debian/Ubuntu) to install SLURM" >&2; exit 1; }
  echo "installing slurmctld slurmd slurm-client munge (Debian packages)"
  local pkgs=(slurmctld slurmd slurm-client munge)
  # A fresh machine may have no package lists yet: update only when the install cannot find the packages.
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${pkgs[@]}" >/dev/null \
    || { $SUDO apt-get update -q >/dev/null \
         && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${pkgs[@]}" >/dev/null; }
}

write_config() {
  if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
    echo "local-cluster.sh: $CONF exists and was not written by genbench; not replacing it" >&2
    exit 1
  fi
  local cpus
  cpus=$(nproc)
  $SUDO mkdir -p /etc/slurm "$STATE/ctld"
  {
    echo "$MARK"
    cat <<EOF
ClusterName=genbench
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# Scheduling passes every second, so a dependent job starts as soon as its parent ends.
SchedulerParameters=sched_interval=1,bf_interval=1
JobRequeue=1
# A requeued job may start again after the credential lifetime (default 120 s); 10 s keeps resume tests short.
AuthInfo=cred_expire=10
ReturnToService=2
# The nodes' CPUs are taken from this file, not probed: both nodes share this machine's cores.
SlurmdParameters=config_overrides
MinJobAge=3600
KillWait=10
InactiveLimit=0
SlurmdTimeout=300
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MailProg=/bin/true
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/%n
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd-%n.log
EOF
    for i in "${!NODES[@]}"; do
      echo "NodeName=${NODES[$i]} NodeHostname=localhost NodeAddr=127.0.0.1 Port=${PORTS[$i]} CPUs=$cpus State=UNKNOWN"
    done
    echo "PartitionName=debug Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE State=UP"
  } | $SUDO tee "$CONF.tmp" >/dev/null
  $SUDO mv "$CONF.tmp" "$CONF"
  # The node names must resolve: Lightning's SLURM environment uses the first node as the DDP master.
  if ! grep -qE "^127\.0\.0\.1.*\b${NODES[0]}\b" /etc/hosts; then
    echo "127.0.0.1 ${NODES[*]}" | $SUDO tee -a /etc/hosts >/dev/null
  fi
}

start_munge() {
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return; fi
  [ -s /etc/munge/munge.key ] || $SUDO mungekey --create --keyfile=/etc/munge/munge.key
  $SUDO chown munge:munge /etc/munge/munge.key && $SUDO chmod 400 /etc/munge/munge.key
  $SUDO mkdir -p /run/munge /var/log/munge /var/lib/munge
  $SUDO chown munge:munge /run/munge /var/log/munge /var/lib/munge
  $SUDO runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return; sleep 0.2; done
  echo "local-cluster.sh: munged did not start (see /var/log/munge/munged.log)" >&2
  exit 1
}

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start_daemons() {
  running "$STATE/slurmctld.pid" || $SUDO /usr/sbin/slurmctld
  for n in "${NODES[@]}"; do
    $SUDO mkdir -p "$STATE/$n"
    running "$STATE/slurmd-$n.pid" || $SUDO /usr/sbin/slurmd -N "$n"
  done
}

wait_idle() {
  for _ in $(seq 120); do
    local states
    states=$(sinfo -h -N -o "%N %T" 2>/dev/null || true)
    if [ "$(grep -cE ' (idle|mixed|allocated)' <<<"$states")" = "${#NODES[@]}" ]; then
      sinfo -N -l
      return
    fi
    # A node left down or drained by an earlier run (e.g. its slurmd was killed) is brought back.
    if grep -qE ' (down|drain)' <<<"$states"; then
      $SUDO scontrol update nodename="$(IFS=,; echo "${NODES[*]}")" state=resume 2>/dev/null || true
    fi
    sleep 1
  done
  echo "local-cluster.sh: the nodes did not become idle; logs in $STATE:" >&2
  sinfo -N -l >&2 || true
  tail -n 20 "$STATE"/*.log >&2 || true
  exit 1
}

stop_daemons() {
  for pidfile in "$STATE"/slurmd-*.pid "$STATE/slurmctld.pid"; do
    running "$pidfile" && $SUDO kill "$(cat "$pidfile")"
  done
  return 0
}

case "${1:-start}" in
  start) install_packages; write_config; start_munge; start_daemons; wait_idle ;;
  status) sinfo -N -l ;;
  stop) stop_daemons ;;
  *) echo "usage: $0 [start|status|stop]" >&2; exit 2 ;;
esac

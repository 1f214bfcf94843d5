#!/usr/bin/env bash
# A one-node SLURM cluster on this machine (Debian 12: SLURM 22.05 + munge), for the cluster test
# (tests/test_slurm.py) and for trying profiles/slurm by hand. Run as root; idempotent.
#
#   bash .ci/start-slurm.sh           # install if needed, configure, start; prints `sinfo`
#   bash .ci/start-slurm.sh stop      # stop the daemons (by PID file)
#
# What it sets up, and why:
# - slurmctld + slurmd on this host, one partition `debug` (the default), no cgroups
#   (proctrack/linuxproc, task/none): containers here have no cgroup delegation.
# - FAKE_GPUS (default 2) gpu GRES backed by character devices, so `--gpus=1` schedules and SLURM sets
#   CUDA_VISIBLE_DEVICES in the job (plain files would give an empty CUDA_VISIBLE_DEVICES).
# - No accounting database: `sacct` does not work. The executor plugin then needs
#   `--slurm-status-command squeue`, which is reliable only when SLURM keeps finished jobs in squeue's
#   view for a while: MinJobAge=300 (the plugin wants >= 120 s).
# - jobcomp/filetxt: every finished job gets a line in /var/log/slurm/jobcomp.log (JobId, Name, JobState,
#   ...): the record the test checks to see that each job went through sbatch.
set -euo pipefail
FAKE_GPUS="${FAKE_GPUS:-2}"
CONF=/etc/slurm
LOGDIR=/var/log/slurm

# alive PIDFILE: the daemon named by the PID file runs (not a zombie, not another program on a reused PID)
alive() {
  local pid name; [ -f "$1" ] || return 1; pid=$(cat "$1"); name=$(basename "$1" .pid)
  [ -r "/proc/$pid/status" ] || return 1
  grep -q '^State:[[:space:]]*Z' "/proc/$pid/status" && return 1
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ]
}
stop_pidfile() {
  alive "$1" || return 0
  local pid; pid=$(cat "$1"); kill "$pid"
  for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.25; done
  kill -9 "$pid" 2>/dev/null || true
}

if [ "${1:-}" = stop ]; then
  for f in /run/slurm/slurmd.pid /run/slurm/slurmctld.pid /run/munge/munged.pid; do
    alive "$f" && { stop_pidfile "$f"; echo "stopped $f"; }
  done
  exit 0
fi

[ "$(id -u)" = 0 ] || { echo "start-slurm.sh: run as root" >&2; exit 1; }

missing=""
for p in slurmctld slurmd slurm-client munge; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  echo "installing$missing"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

HOST=$(hostname -s)
CPUS=$(nproc)
MEM_MB=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))

# munge: the key is made by the package's postinst; make one if it is missing.
install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
install -d -o munge -g munge -m 0755 /run/munge
[ -s /etc/munge/munge.key ] || dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
alive /run/munge/munged.pid || runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
for _ in $(seq 40); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.25; done
munge -n | unmunge >/dev/null  # fails loudly if munge still does not answer

install -d -o slurm -g slurm -m 0755 /run/slurm "$LOGDIR" /var/lib/slurm/slurmctld /var/lib/slurm/slurmd

# Fake GPUs: character devices (the major/minor of /dev/null) listed as gpu GRES.
GRES_LINES=""
for i in $(seq 0 $((FAKE_GPUS - 1))); do
  dev=/var/lib/slurm/fakegpu$i
  [ -c "$dev" ] || { rm -f "$dev"; mknod "$dev" c 1 3; }
  GRES_LINES+="NodeName=$HOST Name=gpu File=$dev"$'\n'
done
NODE_GRES=""; GRES_TYPES=""
if [ "$FAKE_GPUS" -gt 0 ]; then NODE_GRES="Gres=gpu:$FAKE_GPUS"; GRES_TYPES="GresTypes=gpu"; fi

cat > "$CONF/slurm.conf.new" <<EOF
# Written by patchmap's .ci/start-slurm.sh: a one-node test cluster.
ClusterName=patchmap-ci
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=slurm
AuthType=auth/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$LOGDIR/jobcomp.log
ReturnToService=2
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmdSpoolDir=/var/lib/slurm/slurmd
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmctldLogFile=$LOGDIR/slurmctld.log
SlurmdLogFile=$LOGDIR/slurmd.log
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
MinJobAge=300
DefMemPerCPU=1000
MailProg=/bin/true
$GRES_TYPES
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB $NODE_GRES State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
printf '%s' "$GRES_LINES" > "$CONF/gres.conf.new"

changed=0
for f in slurm.conf gres.conf; do
  cmp -s "$CONF/$f.new" "$CONF/$f" || changed=1
  mv "$CONF/$f.new" "$CONF/$f"
done
if [ "$changed" = 1 ]; then stop_pidfile /run/slurm/slurmd.pid; stop_pidfile /run/slurm/slurmctld.pid; fi
alive /run/slurm/slurmctld.pid || /usr/sbin/slurmctld
alive /run/slurm/slurmd.pid || /usr/sbin/slurmd

# Wait for the node to come up; resume it if an earlier configuration left it drained or down.
for _ in $(seq 120); do
  case "$(sinfo -h -N -o %t 2>/dev/null || true)" in
    idle*|mix*|alloc*) break ;;
    drain*|down*|inval*) scontrol update NodeName="$HOST" State=RESUME 2>/dev/null || true ;;
  esac
  sleep 0.5
done
sinfo -o "%P %a %D %t %N %G"
case "$(sinfo -h -N -o %t)" in
  idle*|mix*|alloc*) ;;
  *) echo "start-slurm.sh: the node did not come up; see $LOGDIR/slurmctld.log and slurmd.log" >&2; exit 1 ;;
esac

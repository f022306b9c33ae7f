#!/usr/bin/env bash
# Multi-node GPU cluster under SLURM: one process per node, all of the node's GPUs its local
# devices (JAX_LOCAL_DEVICE_IDS; jax's own default under SLURM is one process per GPU), so each
# node runs one input pipeline. `jax.distributed.initialize()` (main.py --multihost) reads the
# job from SLURM's variables (SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_NTASKS, SLURM_PROCID,
# SLURM_LOCALID): the coordinator is the first node of the step, its port derived from the job id.
#
#   NODES=4 GPUS_PER_NODE=8 PARTITION=gpu TIME=24:00:00 \
#     launch/slurm.sh CONFIG WORKDIR [--config.key=value ...]
#
# Environment:
#   NODES (2), GPUS_PER_NODE (8), CPUS_PER_NODE (32), TIME (24:00:00), JOB_NAME (contrastive_jax)
#   SIGNAL_S (300)                SIGTERM this many seconds before the time limit (--signal)
#   PARTITION, ACCOUNT, QOS       passed to sbatch when set
#   PYTHON                        the venv's python on the nodes (default: this checkout's .venv)
#   LOG_DIR                       where SLURM writes one log per node (default: ./slurm_logs)
#   DRY_RUN=1                     print the batch script instead of submitting it
#
# Stops and requeues (docs/launching.md has the timings):
# * Time limit: `--signal=TERM@SIGNAL_S` sends SIGTERM to the job's steps SIGNAL_S (+ up to 60)
#   seconds before the limit. It is not sent on preemption.
# * Preemption (and scancel): SLURM sends SIGTERM to every process of the job, the batch shell
#   included, and SIGKILL after the partition's GraceTime (`scontrol show partition`).
# In both, the trainer saves a checkpoint, commits it, shuts down jax.distributed and exits 0;
# the batch shell ignores its own SIGTERM (a trap) until srun has returned, then requeues the
# job (`scontrol requeue`) unless WORKDIR/summary.json says the run is complete. A save that does
# not fit in the time left is lost when SIGKILL comes; the last periodic checkpoint
# (config.checkpoint.every_steps) is the fallback and the resume from it is still exact. The
# workdir must be visible from every node (a shared filesystem or a gs:// bucket).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
[[ $# -ge 2 ]] || { sed -n '2,29p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
CONFIG=$1; WORKDIR=$2; shift 2
NODES=${NODES:-2}; GPUS_PER_NODE=${GPUS_PER_NODE:-8}; CPUS_PER_NODE=${CPUS_PER_NODE:-32}
SIGNAL_S=${SIGNAL_S:-300}
[[ $SIGNAL_S =~ ^[0-9]+$ && $SIGNAL_S -le 65535 ]] || {
  echo "slurm.sh: SIGNAL_S=$SIGNAL_S must be whole seconds, at most 65535 (sbatch --signal)" >&2
  exit 2; }
PY=${PYTHON:-$REPO/.venv/bin/python}
LOG_DIR=${LOG_DIR:-$REPO/slurm_logs}

directives=(
  "--job-name=${JOB_NAME:-contrastive_jax}" "--nodes=$NODES" "--ntasks-per-node=1"
  "--gpus-per-node=$GPUS_PER_NODE" "--cpus-per-task=$CPUS_PER_NODE" "--time=${TIME:-24:00:00}"
  "--requeue" "--signal=TERM@$SIGNAL_S" "--open-mode=append" "--output=$LOG_DIR/%x-%j.out"
)
for var in PARTITION ACCOUNT QOS; do
  [[ -n ${!var:-} ]] && directives+=("--${var,,}=${!var}")
done
q() { local out='' a; for a in "$@"; do out+=" $(printf '%q' "$a")"; done; printf '%s' "${out# }"; }
job=$(q "$PY" -m contrastive_jax.main --multihost "--config=$CONFIG" "--workdir=$WORKDIR" "$@")
finished=$(q "$PY" -c "import sys; from etils import epath; \
sys.exit(0 if epath.Path(sys.argv[1], 'summary.json').exists() else 1)" "$WORKDIR")

script=$(
  echo '#!/usr/bin/env bash'
  for d in "${directives[@]}"; do echo "#SBATCH $d"; done
  cat <<EOF
set -uo pipefail
cd $(q "$REPO")
export TF_CPP_MIN_LOG_LEVEL=2 XLA_PYTHON_CLIENT_MEM_FRACTION=\${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
# One task per node, owning all of the node's GPUs: jax would otherwise assume one process per
# GPU under SLURM and give each process only GPU \$SLURM_LOCALID.
export JAX_LOCAL_DEVICE_IDS=$(seq -s, 0 $((GPUS_PER_NODE - 1)))
# On preemption SLURM sends SIGTERM to this shell as well as to the trainer: without the trap
# the shell would die at once and never requeue. The trainer gets its own SIGTERM (from SLURM
# and from srun, which forwards it) and saves; here we only note it and keep waiting.
signals=0
trap 'signals=\$((signals + 1)); echo "\$(date -u +%FT%TZ) SIGTERM (preemption or scancel): waiting for the trainer to save and exit"' TERM
# srun no longer inherits --cpus-per-task from sbatch (SLURM 22.05+): without it the task that
# feeds all the node's GPUs would get one CPU. Each node's task writes its own log (%n).
srun --kill-on-bad-exit=1 --cpus-per-task="\${SLURM_CPUS_PER_TASK:-$CPUS_PER_NODE}" --output=$(q "$LOG_DIR")/%x-%j-node%n.log $job &
srun_pid=\$!
# A trapped signal interrupts \`wait\` (status > 128): wait again until srun itself has ended.
while :; do
  seen=\$signals; wait \$srun_pid; status=\$?
  [ \$signals -ne \$seen ] || break
done
if { [ \$status -eq 0 ] || [ \$signals -gt 0 ]; } && ! $finished; then
  echo "\$(date -u +%FT%TZ) stopped before the end (exit \$status; time limit or preemption): requeueing job \$SLURM_JOB_ID"
  scontrol requeue "\$SLURM_JOB_ID" || echo "scontrol requeue failed (a preempted job that SLURM requeues itself refuses it)"
fi
exit \$status
EOF
)

if [[ ${DRY_RUN:-0} == 1 ]]; then
  printf '%s\n' "$script"
else
  mkdir -p "$LOG_DIR"
  printf '%s\n' "$script" | sbatch
fi

#!/usr/bin/env bash
# Cloud TPU pod: create the slice, install this code on every worker, start the job detached on
# all of them, read their logs, stop it (a checkpoint is saved on SIGTERM), delete the slice.
#
#   PROJECT=my-project ZONE=us-central2-b TPU_NAME=my-pod ACCELERATOR=v4-64 \
#     launch/tpu_pod.sh create
#     launch/tpu_pod.sh setup                      # code + Python 3.11 venv on every worker
#     launch/tpu_pod.sh run CONFIG gs://bucket/runs/name [--config.key=value ...]
#     launch/tpu_pod.sh logs [LINES]               # the tail of every worker's log
#     launch/tpu_pod.sh status | stop | delete
#
# Environment:
#   PROJECT, ZONE, TPU_NAME   required; passed to every gcloud call
#   ACCELERATOR               slice type for `create` (default v4-32)
#   TPU_SOFTWARE_VERSION      VM image for `create` (default tpu-ubuntu2204-base)
#   SPOT=1                    create a spot slice (see launch/README.md for the restart loop)
#   REPO_URL [REF]            `setup` clones REPO_URL at REF on the workers; without it, `setup`
#                             ships this checkout's committed HEAD (git archive), so the pod runs
#                             exactly the code you have
#   WORKER                    which workers to address (default all)
#   DRY_RUN=1                 print every command instead of running it
#
# The VM images ship Python 3.10; this project needs 3.11, so `setup` installs uv and lets it
# provide a managed CPython 3.11 for the venv (~/contrastive_jax_venv, kept across re-setups).
# `run` starts the trainer with nohup + setsid on every worker, so closing your laptop does not
# stop a multi-day run; each worker writes ~/contrastive_jax_logs/run.log and run.pid.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
ACTION=${1:-}; [[ -n $ACTION ]] || usage; shift
for var in PROJECT ZONE TPU_NAME; do
  [[ -n ${!var:-} ]] || { echo "tpu_pod.sh: set $var (e.g. $var=... launch/tpu_pod.sh $ACTION)" >&2; exit 2; }
done
ACCELERATOR=${ACCELERATOR:-v4-32}
VERSION=${TPU_SOFTWARE_VERSION:-tpu-ubuntu2204-base}
WORKER=${WORKER:-all}
PYVER=3.11
CODE='~/contrastive_jax'
VENV='~/contrastive_jax_venv'
LOGS='~/contrastive_jax_logs'
GCLOUD=(gcloud compute tpus tpu-vm)
WHERE=(--zone="$ZONE" --project="$PROJECT")
# On a worker: is the job of run.pid alive (a zombie left unreaped counts as finished)?
ALIVE="[ -f $LOGS/run.pid ] && ps -o stat= -p \$(cat $LOGS/run.pid) 2>/dev/null | grep -qv Z"

# Every side effect goes through `run_cmd`: printed (shell-quoted) under DRY_RUN=1, run otherwise.
run_cmd() {
  if [[ ${DRY_RUN:-0} == 1 ]]; then printf '+'; printf ' %q' "$@"; printf '\n'; else "$@"; fi
}
ssh_workers() { run_cmd "${GCLOUD[@]}" ssh "$TPU_NAME" "${WHERE[@]}" --worker="$WORKER" --command="$1"; }
quote() { local out='' a; for a in "$@"; do out+=" $(printf '%q' "$a")"; done; printf '%s' "${out# }"; }

case "$ACTION" in
  create)
    spot=(); [[ -n ${SPOT:-} ]] && spot=(--spot)
    run_cmd "${GCLOUD[@]}" create "$TPU_NAME" "${WHERE[@]}" --accelerator-type="$ACCELERATOR" \
      --version="$VERSION" "${spot[@]}" ;;
  setup)
    if [[ -n ${REPO_URL:-} ]]; then
      fetch="rm -rf $CODE && git clone --quiet $(quote "$REPO_URL") $CODE && cd $CODE && git checkout --quiet $(quote "${REF:-HEAD}")"
    else
      tarball=$(mktemp -t contrastive_jax.XXXXXX.tar.gz); trap 'rm -f "$tarball"' EXIT
      run_cmd git archive --format=tar.gz -o "$tarball" HEAD
      run_cmd "${GCLOUD[@]}" scp "$tarball" "$TPU_NAME:contrastive_jax.tar.gz" "${WHERE[@]}" --worker="$WORKER"
      fetch="rm -rf $CODE && mkdir -p $CODE && tar -xzf ~/contrastive_jax.tar.gz -C $CODE && cd $CODE"
    fi
    ssh_workers "set -e; $fetch && { [ -x ~/.local/bin/uv ] || curl -LsSf https://astral.sh/uv/install.sh | sh; } && \
~/.local/bin/uv venv --quiet --allow-existing --python $PYVER $VENV && \
~/.local/bin/uv pip install --quiet --python $VENV/bin/python -r requirements.txt 'jax[tpu]==0.10.2' && \
$VENV/bin/python -c 'import sys, jax; assert sys.version_info[:2] == (3, 11); print(jax.__version__)'" ;;
  run)
    [[ $# -ge 2 ]] || { echo "tpu_pod.sh run CONFIG WORKDIR [flags]" >&2; exit 2; }
    CONFIG=$1; WORKDIR=$2; shift 2
    [[ $WORKDIR == gs://* || -n ${ALLOW_LOCAL_WORKDIR:-} ]] || {
      echo "tpu_pod.sh: WORKDIR=$WORKDIR must be a gs:// bucket that every worker can write" \
           "(ALLOW_LOCAL_WORKDIR=1 to override)" >&2; exit 2; }
    job="$VENV/bin/python $(quote -m contrastive_jax.main --multihost "--config=$CONFIG" \
          "--workdir=$WORKDIR" "$@")"
    ssh_workers "set -e; mkdir -p $LOGS; cd $CODE; \
if $ALIVE; then \
echo \"already running (pid \$(cat $LOGS/run.pid)); stop it first\" >&2; exit 3; fi; \
nohup setsid $job > $LOGS/run.log 2>&1 < /dev/null & echo \$! > $LOGS/run.pid; \
echo \"\$(hostname): started pid \$(cat $LOGS/run.pid), log $LOGS/run.log\"" ;;
  logs)
    ssh_workers "echo \"== \$(hostname)\"; tail -n $(quote "${1:-20}") $LOGS/run.log" ;;
  status)
    ssh_workers "if $ALIVE; then \
echo \"\$(hostname): running (pid \$(cat $LOGS/run.pid))\"; else echo \"\$(hostname): not running\"; fi" ;;
  stop)
    # SIGTERM: the trainer saves a checkpoint at the current step and exits 0 on every host.
    ssh_workers "if $ALIVE; then \
kill -TERM \$(cat $LOGS/run.pid) && echo \"\$(hostname): sent SIGTERM\"; else echo \"\$(hostname): not running\"; fi" ;;
  delete)
    run_cmd "${GCLOUD[@]}" delete "$TPU_NAME" "${WHERE[@]}" --quiet ;;
  *) echo "tpu_pod.sh: unknown action '$ACTION'" >&2; usage ;;
esac

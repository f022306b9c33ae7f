#!/usr/bin/env bash
# Runs the pod code path on one CPU machine: N processes joined by jax.distributed over loopback,
# gloo collectives, each with D simulated CPU devices and its own shard of the data.
#
#   launch/local_multiprocess.sh NUM_PROCESSES DEVICES_PER_PROCESS WORKDIR CONFIG [extra flags]
#   e.g. launch/local_multiprocess.sh 2 2 /tmp/mp configs/simclr_mnist.py:quick
#
# Returns as soon as any process fails, with that process's exit code, after stopping the others
# (SIGTERM, then SIGKILL after GRACE_S, default 10: a process blocked in a collective with a
# dead peer never reaches its SIGTERM check). TIMEOUT_S (default 900) bounds each process.
# Needs bash >= 5.1 (`wait -n -p`).
set -euo pipefail
cd "$(dirname "$0")/.."
NP=${1:?number of processes}; ND=${2:?devices per process}; WORKDIR=${3:?workdir}; CONFIG=${4:?config}
shift 4
if ((BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] < 501)); then
  echo "local_multiprocess.sh: needs bash >= 5.1 (wait -n -p), this is $BASH_VERSION" >&2; exit 2
fi
PY=${PYTHON:-.venv/bin/python}; [[ -x $PY ]] || PY=python3
PORT=${PORT:-$($PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
mkdir -p "$WORKDIR"
declare -A index_of=()
pids=()
for ((i = 0; i < NP; i++)); do
  # timeout forwards a SIGTERM it receives to the trainer and SIGKILLs it GRACE_S later.
  XLA_FLAGS="--xla_force_host_platform_device_count=$ND" JAX_PLATFORMS=cpu \
    timeout --kill-after="${GRACE_S:-10}" "${TIMEOUT_S:-900}" \
      "$PY" -m contrastive_jax.main --config="$CONFIG" --workdir="$WORKDIR" \
      --coordinator_address="127.0.0.1:$PORT" --num_processes="$NP" --process_id="$i" \
      --cpu_collectives=gloo "$@" > "$WORKDIR/process_$i.log" 2>&1 &
  pids+=($!); index_of[$!]=$i
done
# Reap the processes in the order they end (not in launch order): the first failure stops all.
status=0
for ((left = NP; left > 0; left--)); do
  code=0; wait -n -p ended "${pids[@]}" || code=$?
  if ((code != 0)); then
    status=$code
    echo "local_multiprocess.sh: process ${index_of[$ended]} exited with code $code;" \
         "stopping the others" >&2
    kill -TERM "${pids[@]}" 2>/dev/null || true
    wait || true
    break
  fi
done
for ((i = 0; i < NP; i++)); do echo "--- process $i (tail) ---"; tail -n 5 "$WORKDIR/process_$i.log"; done
exit $status

#!/usr/bin/env bash
# Runs the pod code path on one CPU machine: N processes joined by jax.distributed over loopback,
# gloo collectives, each with D simulated CPU devices and its own shard of the data.
#
#   launch/local_multiprocess.sh NUM_PROCESSES DEVICES_PER_PROCESS WORKDIR CONFIG [extra flags]
#   e.g. launch/local_multiprocess.sh 2 2 /tmp/mp configs/simclr_mnist.py:quick
#
# Exits non-zero if any process fails; kills the others then. TIMEOUT_S (default 900) bounds it.
set -euo pipefail
cd "$(dirname "$0")/.."
NP=${1:?number of processes}; ND=${2:?devices per process}; WORKDIR=${3:?workdir}; CONFIG=${4:?config}
shift 4
PY=${PYTHON:-.venv/bin/python}; [[ -x $PY ]] || PY=python3
PORT=${PORT:-$($PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
mkdir -p "$WORKDIR"
pids=()
for ((i = 0; i < NP; i++)); do
  XLA_FLAGS="--xla_force_host_platform_device_count=$ND" JAX_PLATFORMS=cpu \
    timeout "${TIMEOUT_S:-900}" "$PY" -m contrastive_jax.main --config="$CONFIG" --workdir="$WORKDIR" \
      --coordinator_address="127.0.0.1:$PORT" --num_processes="$NP" --process_id="$i" \
      --cpu_collectives=gloo "$@" > "$WORKDIR/process_$i.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  if ! wait "$pid"; then status=1; kill "${pids[@]}" 2>/dev/null || true; fi
done
for ((i = 0; i < NP; i++)); do echo "--- process $i (tail) ---"; tail -n 5 "$WORKDIR/process_$i.log"; done
exit $status

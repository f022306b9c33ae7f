#!/usr/bin/env bash
# Runs the pod code path on one CPU machine: N processes joined by jax.distributed over loopback,
# gloo collectives, each with D simulated CPU devices and its own shard of the data.
#
#   launch/local_multiprocess.sh NUM_PROCESSES DEVICES_PER_PROCESS WORKDIR CONFIG [extra flags]
#   e.g. launch/local_multiprocess.sh 2 2 /tmp/mp configs/simclr_mnist.py:quick
#
# A thin wrapper of `python -m contrastive_jax.tools.local_pod` (its docstring has the details).
# Returns as soon as any process fails, with that process's exit code, after stopping the others
# (SIGTERM, then SIGKILL after GRACE_S, default 10: a process blocked in a collective with a
# dead peer never reaches its SIGTERM check). TIMEOUT_S (default 900) bounds the pod (then exit
# 124). PYTHON is the processes' interpreter (default .venv/bin/python); PORT the coordinator's
# (default a free one). Logs: WORKDIR/process_I.log.
set -euo pipefail
cd "$(dirname "$0")/.."
NP=${1:?number of processes}; ND=${2:?devices per process}; WORKDIR=${3:?workdir}; CONFIG=${4:?config}
shift 4
PY=${PYTHON:-.venv/bin/python}; [[ -x $PY ]] || PY=python3
# The launcher itself needs only the standard library (PYTHON may be a stand-in in tests).
LAUNCHER=.venv/bin/python; [[ -x $LAUNCHER ]] || LAUNCHER=python3
exec "$LAUNCHER" -m contrastive_jax.tools.local_pod --python="$PY" ${PORT:+--port="$PORT"} \
  --timeout_s="${TIMEOUT_S:-900}" --grace_s="${GRACE_S:-10}" "$NP" "$ND" "$WORKDIR" "$CONFIG" "$@"

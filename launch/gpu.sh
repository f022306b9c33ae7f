#!/usr/bin/env bash
# One host, all its GPUs: jax sees every local GPU as a device of the ("data",) mesh.
# Needs a CUDA build of jax:  pip install "jax[cuda12]==0.10.2"  (tensorflow-cpu stays: TF only
# feeds data and is kept off the GPUs by main.py).
#
#   launch/gpu.sh CONFIG WORKDIR [extra flags]
#   e.g. launch/gpu.sh configs/simclr_resnet18_cifar10.py /data/runs/simclr_c10 --config.dtype=bfloat16
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:?config}; WORKDIR=${2:?workdir}; shift 2
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
exec "${PYTHON:-python3}" -m contrastive_jax.main --config="$CONFIG" --workdir="$WORKDIR" "$@"

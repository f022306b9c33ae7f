#!/usr/bin/env bash
# Sets up .venv, pretrains SimCLR on the embedded MNIST digits and prints the evaluation:
#   bash scripts/pretrain_default.sh [WORKDIR] [extra flags, e.g. --config.total_steps=200]
# Re-running with the same WORKDIR resumes from its latest checkpoint (a finished run only
# re-evaluates); use a fresh WORKDIR for a fresh run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
WORKDIR=${1:-workdirs/simclr_mnist_$(date +%Y%m%d_%H%M%S)}
shift || true
exec .venv/bin/python -m contrastive_jax.main --config=configs/simclr_mnist.py \
  --workdir="$WORKDIR" "$@"

#!/usr/bin/env bash
# Train-step throughput on one GPU: bf16 compute with GPU-sized batches, then float32 for the
# ratio, then GradCache memory at a batch that strains a single device. Prints markdown tables
# (benchmarks/train_step.py) and nothing else of note.
#
# Assumes a CUDA build of jax is installed in the Python below (e.g. pip install
# "jax[cuda12]") and the repository's requirements; run from anywhere:
#   bash benchmarks/gpu_check.sh            # about 5-10 minutes on one H100/H200-class GPU
#   PYTHON=/path/to/python STEPS=20 bash benchmarks/gpu_check.sh
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
STEPS="${STEPS:-10}"
# Let XLA take what it needs rather than 75% up front, so memory_analysis and OOMs are honest.
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-false}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PYTHON" - <<'EOF'
import jax
backend = jax.default_backend()
print("jax", jax.__version__, "backend", backend, jax.devices())
if backend != "gpu":
  raise SystemExit("no GPU visible to jax: install a CUDA jax (pip install 'jax[cuda12]')")
EOF

BATCH="resnet50_simclr=128,vit_b16_clip=256,resnet18_cifar_simclr=512,convnet_mnist_simclr=1024"

echo; echo "## bfloat16 compute (float32 params)"
"$PYTHON" benchmarks/train_step.py --dtype bfloat16 --steps "$STEPS" --matmul-size 8192 \
  --batch "$BATCH" --grad-cache-model vit_b16_clip --grad-cache-batch 512 --micro 1,2,4,8

echo; echo "## float32 compute"
"$PYTHON" benchmarks/train_step.py --dtype float32 --steps "$STEPS" --matmul-size 8192 \
  --batch "$BATCH" --grad-cache-model ""

#!/usr/bin/env bash
# Cloud TPU pod: create the VM slice, put the code on every worker, run the same command on all of
# them. jax.distributed finds the pod by itself (--multihost); every host reads only its shard of
# the data; the workdir must be a gs:// bucket that all hosts can write.
#
#   TPU_NAME=my-pod ZONE=us-central2-b ACCELERATOR=v4-64 PROJECT=my-project \
#     launch/tpu_pod.sh create|setup|run|delete CONFIG gs://bucket/runs/name [extra flags]
#
# Preemptible/spot slices: see launch/README.md (a loop that re-runs `run`; training resumes from
# the newest good checkpoint in the workdir).
set -euo pipefail
ACTION=${1:?create|setup|run|delete}; shift
: "${TPU_NAME:?}" "${ZONE:?}"
ACCELERATOR=${ACCELERATOR:-v4-32}
VERSION=${TPU_SOFTWARE_VERSION:-tpu-ubuntu2204-base}
REPO=${REPO_URL:-https://github.com/your-org/contrastive_jax.git}
ssh_all() { gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="$1"; }
case "$ACTION" in
  create)
    gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" \
      --accelerator-type="$ACCELERATOR" --version="$VERSION" ${SPOT:+--spot} ;;
  setup)
    ssh_all "test -d contrastive_jax || git clone $REPO contrastive_jax; cd contrastive_jax && git pull && \
      python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt && \
      .venv/bin/pip install -q 'jax[tpu]==0.10.2' && .venv/bin/pip install -q --no-deps -e ." ;;
  run)
    CONFIG=${1:?config}; WORKDIR=${2:?gs:// workdir}; shift 2
    ssh_all "cd contrastive_jax && .venv/bin/python -m contrastive_jax.main --multihost \
      --config=$CONFIG --workdir=$WORKDIR $*" ;;
  delete)
    gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" --quiet ;;
  *) echo "unknown action $ACTION" >&2; exit 2 ;;
esac

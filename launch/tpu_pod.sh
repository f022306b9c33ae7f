#!/usr/bin/env bash
# Cloud TPU pod: create the slice (directly or as a queued resource), install this code on every
# worker, start the job detached on all of them, read their logs, stop it (a checkpoint is saved
# on SIGTERM), delete the slice. docs/launching.md walks through it.
#
#   PROJECT=my-project ZONE=us-central2-b TPU_NAME=my-pod ACCELERATOR=v4-64 \
#     launch/tpu_pod.sh create                     # QUEUED=1: a queued resource, waits for ACTIVE
#     launch/tpu_pod.sh wait                       # QUEUED=1: wait for ACTIVE again
#     launch/tpu_pod.sh setup                      # code + Python >= 3.11 venv on every worker
#     launch/tpu_pod.sh run CONFIG gs://bucket/runs/name [--config.key=value ...]
#     launch/tpu_pod.sh logs [LINES]               # the tail of every worker's log
#     launch/tpu_pod.sh status | stop | delete
#     launch/tpu_pod.sh wheelhouse gs://bucket/wheelhouse   # on a machine with internet
#
# Environment:
#   PROJECT, ZONE, TPU_NAME   required; passed to every gcloud call
#   ACCELERATOR               slice type (default v4-32): v4-N, v5e-N (= v5litepod-N, the name the
#                             API takes), v5p-N, v6e-N
#   TPU_SOFTWARE_VERSION      VM image; default from the generation: v2/v3/v4 tpu-ubuntu2204-base,
#                             v5e v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e
#   SPOT=1 | RESERVED=1       spot or reserved capacity (see docs/launching.md for the restart loop)
#   QUEUED=1                  `create` through `gcloud compute tpus queued-resources` (how large
#                             slices are obtained); QUEUED_RESOURCE names the request (default
#                             TPU_NAME-qr); VALID_UNTIL (e.g. 6h) lets it expire unserved;
#                             QUEUE_WAIT_S (3600) bounds the wait for ACTIVE, POLL_S (30) its period
#   INTERNAL_IPS=1            workers without external IPs: created with --internal-ips, reached
#                             with ssh --internal-ip (run this from a VM in the same VPC)
#   WHEELHOUSE=gs://...       `setup` installs from this wheelhouse (see `wheelhouse`) with
#                             pip --no-index: no internet needed on the workers
#   PYTHON_FROM               the venv's interpreter: uv (default without WHEELHOUSE; uv's managed
#                             CPython, downloaded: needs outbound internet), image (the image's
#                             python3, if >= 3.11) or wheelhouse (default with WHEELHOUSE)
#   REPO_URL [REF]            `setup` clones REPO_URL at REF on the workers; without it, `setup`
#                             ships this checkout's committed HEAD (git archive), so the pod runs
#                             exactly the code you have
#   LOG_SYNC_S                `run` copies each worker's log to WORKDIR/worker_logs/ every
#                             LOG_SYNC_S seconds (default 60) while the job runs, and once at its end
#   WORKER                    which workers to address (default all)
#   DRY_RUN=1                 print every command instead of running it
#
# `run` starts the trainer with nohup + setsid on every worker, so closing your laptop does not
# stop a multi-day run; each worker writes ~/contrastive_jax_logs/run.log and run.pid, and a
# background loop copies run.log to the bucket, so a preemption or `delete` keeps the logs.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,43p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
die() { echo "tpu_pod.sh: $*" >&2; exit 2; }
ACTION=${1:-}; [[ -n $ACTION ]] || usage; shift
PYVER=3.11
JAX_TPU='jax[tpu]==0.10.2'

# Every side effect goes through `run_cmd`: printed (shell-quoted) under DRY_RUN=1, run otherwise.
run_cmd() {
  if [[ ${DRY_RUN:-0} == 1 ]]; then printf '+'; printf ' %q' "$@"; printf '\n'; else "$@"; fi
}
quote() { local out='' a; for a in "$@"; do out+=" $(printf '%q' "$a")"; done; printf '%s' "${out# }"; }

if [[ $ACTION == wheelhouse ]]; then
  # Built here, on a machine with internet, for the workers' platform (Linux x86_64, Python 3.11):
  # every wheel of requirements.txt and jax[tpu], and uv's relocatable CPython 3.11 as a tarball.
  DEST=${1:-}; [[ $DEST == gs://* ]] || die "wheelhouse gs://bucket/path (where setup's WHEELHOUSE will point)"
  [[ $(uname -sm) == "Linux x86_64" ]] || die "build the wheelhouse on Linux x86_64 (the TPU VMs' platform): its CPython is this machine's build"
  command -v uv >/dev/null || [[ ${DRY_RUN:-0} == 1 ]] || die "needs uv on this machine: https://docs.astral.sh/uv/getting-started/installation/"
  dir=$(mktemp -d -t contrastive_jax_wheelhouse.XXXXXX); trap 'rm -rf "$dir"' EXIT
  platforms=(); for m in $(seq 17 35); do platforms+=("--platform=manylinux_2_${m}_x86_64"); done
  run_cmd python3 -m pip download --quiet --only-binary=:all: --implementation=cp \
    --python-version="$PYVER" "${platforms[@]}" --dest="$dir/wheels" -r requirements.txt "$JAX_TPU"
  run_cmd env UV_PYTHON_INSTALL_DIR="$dir/python" uv python install "$PYVER"
  run_cmd tar -czf "$dir/python.tar.gz" -C "$dir/python" .
  run_cmd gcloud storage cp -r "$dir/wheels" "$dir/python.tar.gz" "${DEST%/}/"
  exit 0
fi

for var in PROJECT ZONE TPU_NAME; do
  [[ -n ${!var:-} ]] || die "set $var (e.g. $var=... launch/tpu_pod.sh $ACTION)"
done
WORKER=${WORKER:-all}
CODE='~/contrastive_jax'
VENV='~/contrastive_jax_venv'
LOGS='~/contrastive_jax_logs'
GCLOUD=(gcloud compute tpus tpu-vm)
QR=(gcloud compute tpus queued-resources)
QUEUED_RESOURCE=${QUEUED_RESOURCE:-$TPU_NAME-qr}
WHERE=(--zone="$ZONE" --project="$PROJECT")
REACH=(); [[ -n ${INTERNAL_IPS:-} ]] && REACH=(--internal-ip)
# On a worker: is the job of run.pid alive (a zombie left unreaped counts as finished)?
ALIVE="[ -f $LOGS/run.pid ] && ps -o stat= -p \$(cat $LOGS/run.pid) 2>/dev/null | grep -qv Z"

# The accelerator type as the API names it, and the runtime image of its generation (Cloud TPU
# docs, "TPU software versions": cloud.google.com/tpu/docs/runtimes).
ACCELERATOR=${ACCELERATOR:-v4-32}
[[ $ACCELERATOR =~ ^([a-z0-9]+)-([0-9]+)$ ]] || die "ACCELERATOR=$ACCELERATOR: expected GENERATION-SIZE, e.g. v4-64, v5e-64, v5p-128, v6e-64"
generation=${BASH_REMATCH[1]}; size=${BASH_REMATCH[2]}
case $generation in
  v2 | v3 | v4) image=tpu-ubuntu2204-base ;;
  v5e | v5litepod) image=v2-alpha-tpuv5-lite; ACCELERATOR=v5litepod-$size ;;
  v5p) image=v2-alpha-tpuv5 ;;
  v6e) image=v2-alpha-tpuv6e ;;
  *) image='' ;;
esac
VERSION=${TPU_SOFTWARE_VERSION:-$image}
[[ -n $VERSION || $ACTION != create ]] || die "no default image for $generation accelerators;" \
  "set TPU_SOFTWARE_VERSION (gcloud compute tpus versions list --zone=$ZONE)"
[[ -z ${SPOT:-} || -z ${RESERVED:-} ]] || die "SPOT and RESERVED exclude each other"
capacity=(); [[ -n ${SPOT:-} ]] && capacity=(--spot); [[ -n ${RESERVED:-} ]] && capacity=(--reserved)
internal=(); [[ -n ${INTERNAL_IPS:-} ]] && internal=(--internal-ips)

ssh_workers() {
  run_cmd "${GCLOUD[@]}" ssh "$TPU_NAME" "${WHERE[@]}" --worker="$WORKER" "${REACH[@]}" --command="$1"
}

# Polls the queued resource until ACTIVE (the slice exists), at most QUEUE_WAIT_S seconds.
wait_active() {
  local wait_s=${QUEUE_WAIT_S:-3600} poll_s=${POLL_S:-30} state start=$SECONDS
  local describe=("${QR[@]}" describe "$QUEUED_RESOURCE" "${WHERE[@]}" --format='value(state.state)')
  if [[ ${DRY_RUN:-0} == 1 ]]; then run_cmd "${describe[@]}"; return; fi
  while :; do
    state=$("${describe[@]}") || state='unknown (describe failed)'  # transient: poll on
    case $state in
      ACTIVE) echo "tpu_pod.sh: queued resource $QUEUED_RESOURCE is ACTIVE: $TPU_NAME is ready"; return ;;
      FAILED | SUSPENDING | SUSPENDED)
        echo "tpu_pod.sh: queued resource $QUEUED_RESOURCE is $state; \`tpu_pod.sh delete\` removes it, then create again" >&2
        exit 4 ;;
    esac
    if ((SECONDS - start >= wait_s)); then
      echo "tpu_pod.sh: queued resource $QUEUED_RESOURCE still ${state:-unknown} after ${wait_s} s;" \
           "it stays queued: \`tpu_pod.sh wait\` waits again, \`tpu_pod.sh delete\` withdraws it" >&2
      exit 5
    fi
    echo "tpu_pod.sh: queued resource $QUEUED_RESOURCE is ${state:-unknown}; polling every ${poll_s} s"
    sleep "$poll_s"
  done
}

case "$ACTION" in
  create)
    if [[ -n ${QUEUED:-} ]]; then
      valid=(); [[ -n ${VALID_UNTIL:-} ]] && valid=(--valid-until-duration="$VALID_UNTIL")
      run_cmd "${QR[@]}" create "$QUEUED_RESOURCE" --node-id="$TPU_NAME" "${WHERE[@]}" \
        --accelerator-type="$ACCELERATOR" --runtime-version="$VERSION" "${capacity[@]}" \
        "${valid[@]}" "${internal[@]}"
      wait_active
    else
      run_cmd "${GCLOUD[@]}" create "$TPU_NAME" "${WHERE[@]}" --accelerator-type="$ACCELERATOR" \
        --version="$VERSION" "${capacity[@]}" "${internal[@]}"
    fi ;;
  wait)
    [[ -n ${QUEUED:-} ]] || die "wait is for queued resources (QUEUED=1)"
    wait_active ;;
  setup)
    if [[ -n ${REPO_URL:-} ]]; then
      fetch="rm -rf $CODE && git clone --quiet $(quote "$REPO_URL") $CODE && cd $CODE && git checkout --quiet $(quote "${REF:-HEAD}")"
    else
      tarball=$(mktemp -t contrastive_jax.XXXXXX.tar.gz); trap 'rm -f "$tarball"' EXIT
      run_cmd git archive --format=tar.gz -o "$tarball" HEAD
      run_cmd "${GCLOUD[@]}" scp "$tarball" "$TPU_NAME:contrastive_jax.tar.gz" "${WHERE[@]}" \
        --worker="$WORKER" "${REACH[@]}"
      fetch="rm -rf $CODE && mkdir -p $CODE && tar -xzf ~/contrastive_jax.tar.gz -C $CODE && cd $CODE"
    fi
    from=${PYTHON_FROM:-$([[ -n ${WHEELHOUSE:-} ]] && echo wheelhouse || echo uv)}
    uv='~/.local/bin/uv'
    case $from in
      uv)  # python-build-standalone via uv: astral.sh and github.com must be reachable
        python="{ [ -x $uv ] || curl -LsSf https://astral.sh/uv/install.sh | sh; } && \
$uv venv --quiet --allow-existing --python $PYVER $VENV"
        install="$uv pip install --quiet --python $VENV/bin/python" ;;
      image)
        python="python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { \
echo \"\$(hostname): the image's \$(python3 -V) is older than $PYVER: use PYTHON_FROM=uv (needs internet) or a WHEELHOUSE\" >&2; exit 4; } && \
python3 -m venv $VENV"
        install="$VENV/bin/python -m pip install --quiet" ;;
      wheelhouse)
        [[ -n ${WHEELHOUSE:-} ]] || die "PYTHON_FROM=wheelhouse needs WHEELHOUSE=gs://... (see \`tpu_pod.sh wheelhouse\`)"
        python="rm -rf ~/contrastive_jax_python && mkdir -p ~/contrastive_jax_python && \
tar -xzf ~/contrastive_jax_wheelhouse/python.tar.gz -C ~/contrastive_jax_python && \
\$(ls -d ~/contrastive_jax_python/cpython-$PYVER*/bin/python$PYVER | head -n 1) -m venv $VENV"
        install="$VENV/bin/python -m pip install --quiet" ;;
      *) die "PYTHON_FROM=$from: expected uv, image or wheelhouse" ;;
    esac
    packages="-r requirements.txt '$JAX_TPU'"
    if [[ -n ${WHEELHOUSE:-} ]]; then
      [[ $WHEELHOUSE == gs://* ]] || die "WHEELHOUSE=$WHEELHOUSE must be a gs:// path the workers can read"
      # gs:// is reachable without an external IP (Private Google Access); PyPI is not.
      python="rm -rf ~/contrastive_jax_wheelhouse && mkdir -p ~/contrastive_jax_wheelhouse && \
gcloud storage cp -r $(quote "${WHEELHOUSE%/}/*") ~/contrastive_jax_wheelhouse/ && $python"
      packages="--no-index --find-links ~/contrastive_jax_wheelhouse/wheels $packages"
    fi
    ssh_workers "set -e; $fetch && $python && $install $packages && \
$VENV/bin/python -c 'import sys, jax; assert sys.version_info >= (3, 11), sys.version; print(jax.__version__)'" ;;
  run)
    [[ $# -ge 2 ]] || { echo "tpu_pod.sh run CONFIG WORKDIR [flags]" >&2; exit 2; }
    CONFIG=$1; WORKDIR=$2; shift 2
    [[ $WORKDIR == gs://* || -n ${ALLOW_LOCAL_WORKDIR:-} ]] || {
      echo "tpu_pod.sh: WORKDIR=$WORKDIR must be a gs:// bucket that every worker can write" \
           "(ALLOW_LOCAL_WORKDIR=1 to override)" >&2; exit 2; }
    LOG_SYNC_S=${LOG_SYNC_S:-60}
    [[ $LOG_SYNC_S =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "LOG_SYNC_S=$LOG_SYNC_S must be seconds"
    job="$VENV/bin/python $(quote -m contrastive_jax.main --multihost "--config=$CONFIG" \
          "--workdir=$WORKDIR" "$@")"
    sync=''
    if [[ $WORKDIR == gs://* ]]; then
      # The worker's disk goes with a preempted or deleted slice: copy the log to the bucket
      # while the job lives (each copy bounded by `timeout`), and once more after it ends.
      copy="timeout 120 gcloud storage cp --quiet \$2 \$3 > /dev/null 2>&1"
      loop="while ps -o stat= -p \$1 2>/dev/null | grep -qv Z; do $copy; sleep \$4; done; $copy"
      sync="nohup setsid bash -c '$loop' log_sync \$(cat $LOGS/run.pid) $LOGS/run.log \
$(quote "${WORKDIR%/}/worker_logs/")\$(hostname).log $LOG_SYNC_S > /dev/null 2>&1 < /dev/null & "
    fi
    ssh_workers "set -e; mkdir -p $LOGS; cd $CODE; \
if $ALIVE; then \
echo \"already running (pid \$(cat $LOGS/run.pid)); stop it first\" >&2; exit 3; fi; \
nohup setsid $job > $LOGS/run.log 2>&1 < /dev/null & echo \$! > $LOGS/run.pid; \
${sync}echo \"\$(hostname): started pid \$(cat $LOGS/run.pid), log $LOGS/run.log\"" ;;
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
    if [[ -n ${QUEUED:-} ]]; then  # --force: the slice goes with the request
      run_cmd "${QR[@]}" delete "$QUEUED_RESOURCE" "${WHERE[@]}" --force --quiet
    else
      run_cmd "${GCLOUD[@]}" delete "$TPU_NAME" "${WHERE[@]}" --quiet
    fi ;;
  *) echo "tpu_pod.sh: unknown action '$ACTION'" >&2; usage ;;
esac

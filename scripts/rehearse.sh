#!/usr/bin/env bash
# Rehearses every full-scale config as a 2-process pod on this machine
# (python -m contrastive_jax.tools.rehearse, alias launch/rehearse.py: real architecture,
# optimizer, loss and data format; kill -9 of one process after a checkpoint, a restart of all,
# the same losses as an uninterrupted run).
#   bash scripts/rehearse.sh [CONFIG_NAME[:DEVICES] ...]   # default: all of FULL_SCALE below
# Exits non-zero if any rehearsal failed; prints each one's time. REHEARSE_TIMEOUT_S bounds each.
set -uo pipefail
cd "$(dirname "$0")/.."
[[ -x .venv/bin/python ]] || bash scripts/setup_env.sh
PY=${PYTHON:-.venv/bin/python}
# NAME:DEVICES_PER_PROCESS (2: the 2 processes x 2 devices layout of a TPU host, 4 chips per
# process; 1 where it does not fit):
# - ViT: their replicated AdamW state is 1.6-3 GiB per device, and a 2-device ViT-B/16 process
#   took 8 GiB (the OOM killer took it on this shared 23 GiB machine): 1 device per process.
# - 2 devices per process need immediate ACKs on loopback. A gloo reduce-scatter locks a
#   socket's SO_SNDBUF at the kernel's 4.5 KiB minimum (its small first message); the gradient
#   all-reduce then crosses one-way ring links one 64 KiB segment per 40 ms delayed ACK: about
#   120 s a ResNet-50 step (measured 116 s; 185 MB a link a step). quickack 1 on the loopback
#   route fixes it (.ci/run sets it as root; docs/rehearsals_gloo.md). Without it, every entry
#   runs at 1 device per process, with a warning.
# - ResNet-50: 2 x 2 with quickack runs at about twice 2 x 1's step time (twice the batch);
#   whole 2 x 2 rehearsals are not yet timed on a quiet machine, so they stay at 1 device.
FULL_SCALE=(simclr_resnet50_imagenet:1 mocov2_resnet50_imagenet:1 mocov3_resnet50_imagenet:1
            mocov3_vit_base_imagenet:1 clip_vit_b32:1 siglip_vit_b16:1 lit_vit_b32:1)
names=("$@"); [[ ${#names[@]} -gt 0 ]] || names=("${FULL_SCALE[@]}")
root=$(mktemp -d "${TMPDIR:-/tmp}/rehearsals.XXXXXX")
failed=()
quickack=0; ip route get 127.0.0.1 2> /dev/null | grep -q 'quickack 1' && quickack=1
for entry in "${names[@]}"; do
  name=${entry%%:*}; devices=2; [[ $entry == *:* ]] && devices=${entry##*:}
  if [[ $devices -gt 1 && $quickack == 0 ]]; then
    echo "warning: delayed ACKs on loopback (no 'quickack 1' in 'ip route get 127.0.0.1'):" \
      "$name at 1 device per process instead of $devices (docs/rehearsals_gloo.md)"
    devices=1
  fi
  start=$(date +%s)
  echo "=== rehearsal: $name (load: $(cut -d' ' -f1-3 /proc/loadavg)) ==="
  if "$PY" -m contrastive_jax.tools.rehearse "configs/$name.py" --devices "$devices" \
      --workdir "$root/$name" --timeout_s "${REHEARSE_TIMEOUT_S:-900}" >"$root/$name.out" 2>&1; then
    tail -n 1 "$root/$name.out"
  else
    failed+=("$name"); tail -n 60 "$root/$name.out"
  fi
  echo "=== $name: $(( $(date +%s) - start )) s ==="
  rm -rf "$root/$name"  # checkpoints of the real architectures are large
done
if [[ ${#failed[@]} -gt 0 ]]; then echo "FAILED rehearsals: ${failed[*]} (outputs in $root)"; exit 1; fi
echo "all ${#names[@]} rehearsals passed"

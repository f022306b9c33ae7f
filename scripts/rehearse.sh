#!/usr/bin/env bash
# Rehearses every full-scale config as a 2-process pod on this machine
# (launch/rehearse.py: real architecture, optimizer, loss and data format; kill -9 of one
# process after a checkpoint, a restart of all, the same losses as an uninterrupted run).
#   bash scripts/rehearse.sh [CONFIG_NAME[:DEVICES] ...]   # default: all of FULL_SCALE below
# Exits non-zero if any rehearsal failed; prints each one's time. REHEARSE_TIMEOUT_S bounds each.
set -uo pipefail
cd "$(dirname "$0")/.."
[[ -x .venv/bin/python ]] || bash scripts/setup_env.sh
PY=${PYTHON:-.venv/bin/python}
# NAME:DEVICES_PER_PROCESS. One device per process for every config on this machine:
# - ViT: their replicated AdamW state is 1.6-3 GiB per device, and a 2-device ViT-B/16 process
#   took 8 GiB (the OOM killer took it on this shared 23 GiB machine);
# - ResNet-50: at 2 devices per process every step sat idle for about 120 s (measured: 120.8,
#   120.6 and 124.8 s a step, all CPUs idle; 1 process x 2 devices: 9 s; 2 x 1: 10 s). The same
#   layout with width 0.125, and collectives of the same sizes alone, run at normal speed; the
#   cause, somewhere in XLA:CPU's gloo collectives with two local devices, is not found.
# The 2 x 2 layout itself is covered by the test suite (tests/test_multihost.py, test_launch.py).
FULL_SCALE=(simclr_resnet50_imagenet:1 mocov2_resnet50_imagenet:1 mocov3_resnet50_imagenet:1
            mocov3_vit_base_imagenet:1 clip_vit_b32:1 siglip_vit_b16:1 lit_vit_b32:1)
names=("$@"); [[ ${#names[@]} -gt 0 ]] || names=("${FULL_SCALE[@]}")
root=$(mktemp -d "${TMPDIR:-/tmp}/rehearsals.XXXXXX")
failed=()
for entry in "${names[@]}"; do
  name=${entry%%:*}; devices=2; [[ $entry == *:* ]] && devices=${entry##*:}
  start=$(date +%s)
  echo "=== rehearsal: $name (load: $(cut -d' ' -f1-3 /proc/loadavg)) ==="
  if "$PY" launch/rehearse.py "configs/$name.py" --devices "$devices" --workdir "$root/$name" \
      --timeout_s "${REHEARSE_TIMEOUT_S:-900}" > "$root/$name.out" 2>&1; then
    tail -n 1 "$root/$name.out"
  else
    failed+=("$name"); tail -n 60 "$root/$name.out"
  fi
  echo "=== $name: $(( $(date +%s) - start )) s ==="
  rm -rf "$root/$name"  # checkpoints of the real architectures are large
done
if [[ ${#failed[@]} -gt 0 ]]; then echo "FAILED rehearsals: ${failed[*]} (outputs in $root)"; exit 1; fi
echo "all ${#names[@]} rehearsals passed"

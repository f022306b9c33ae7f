#!/usr/bin/env bash
# Sets up .venv and runs the whole test suite: bash scripts/test.sh [pytest args]
# Also installs requirements-test.txt (torch, torchvision, open_clip, timm: the peers of the
# weight-conversion parity tests; ~70 s once, then a stamp skips it). They are test-only:
# the package never imports torch. SKIP_PEER_TESTS=1 leaves them out (those tests then skip).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
stamp=.venv/.contrastive_jax_test_stamp
want=$(sha256sum requirements-test.txt | cut -d' ' -f1)
if [[ "${SKIP_PEER_TESTS:-0}" != 1 && ( ! -f $stamp || "$(cat "$stamp")" != "$want" ) ]]; then
  .venv/bin/python -m pip install --quiet -r requirements-test.txt
  echo "$want" > "$stamp"
fi
# Two pytest workers (pytest-xdist, a file per worker): most tests wait on one single-threaded
# XLA compile, so two at a time use both cores of a 2-core machine. TEST_WORKERS=0 runs them in
# this process, one after the other.
exec .venv/bin/python -m pytest -q --durations=15 -n "${TEST_WORKERS:-2}" --dist loadfile "$@"

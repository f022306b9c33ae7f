"""``type="linear_probe"``: logistic regression on frozen features with every training label
(the linear evaluation protocol; SimCLR, Chen et al. 2020, Appendix B.5), top-1 and top-5.

Full-batch L-BFGS needs every training row at every iteration, so the train and test features
([N, F]) are gathered to every host and each host fits the same probe (same seed, same
numbers). The L2 penalty is chosen on a held-out part of the train split, never on the test
split. The fit is ``evaluate/linear_probe.py``.
"""

from __future__ import annotations

import numpy as np

from contrastive_jax.errors import ConfigError
from contrastive_jax.evaluate import streaming
from contrastive_jax.evaluate.linear_probe import DEFAULT_L2_GRID, linear_probe

# l2_grid: penalties tried; val_fraction: per-class share of the train split held out to pick
# one; shard_rows: split the training rows over this host's devices; cache_features: keep each
# host's frozen features on disk per step (evaluate/feature_cache.py).
SETTINGS = dict(l2_grid=DEFAULT_L2_GRID, val_fraction=0.2, shard_rows=False,
                cache_features=False)
NEEDS_TEXT = False


def check(where: str, spec: dict) -> None:
  grid = tuple(spec["l2_grid"])
  if not grid or min(grid) < 0:
    raise ConfigError(f"{where}.l2_grid={grid} must be non-empty and non-negative")
  if not 0 < float(spec["val_fraction"]) < 1:
    raise ConfigError(f"{where}.val_fraction={spec['val_fraction']} must be in (0, 1)")


programs = streaming.feature_programs


def run(ctx: streaming.Context, state, spec: dict):
  train, test, num_classes = ctx.train_test(state, spec)
  res = linear_probe(train["feat"], train["label"], test["feat"], test["label"],
                     num_classes=num_classes, seed=ctx.seed, l2_grid=tuple(spec["l2_grid"]),
                     val_fraction=spec["val_fraction"],
                     mesh=streaming.local_mesh() if spec["shard_rows"] else None)
  return {k: v for k, v in res.items() if np.isscalar(v)}, None

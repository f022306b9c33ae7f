"""``type="knn"``: the weighted kNN monitor on frozen features (Wu et al. 2018, InstDisc,
Sec. 3.4; k=200 and T=0.07 as in the MoCo monitor), top-1 and top-5.

Scoring: the labelled bank (train split) features are gathered to every host and split over
that host's own devices (``streaming.local_mesh``: no cross-host traffic while scoring); each
host scores its own contiguous block of the test rows, and the hit counts are summed over the
hosts. Memory per host: the bank ([N_train, F]: 1.28M x 2048 float32 = 10 GB of host memory for
ImageNet, spread over the local devices) plus a block. The array math is
``evaluate/knn.py``.
"""

from __future__ import annotations

import jax
import numpy as np

from contrastive_jax.errors import ConfigError
from contrastive_jax.evaluate import knn as knn_lib
from contrastive_jax.evaluate import streaming

# k: neighbours; temperature: of the exp(sim / T) vote weights; cache_features: keep each
# host's frozen features on disk per step (evaluate/feature_cache.py).
SETTINGS = dict(k=200, temperature=0.07, cache_features=False)
NEEDS_TEXT = False


def check(where: str, spec: dict) -> None:
  if int(spec["k"]) < 1:
    raise ConfigError(f"{where}.k={spec['k']} must be >= 1")
  if float(spec["temperature"]) <= 0:
    raise ConfigError(f"{where}.temperature={spec['temperature']} must be > 0")


programs = streaming.feature_programs


def run(ctx: streaming.Context, state, spec: dict):
  # The bank is gathered; the test rows could stay local, but the evaluation's cache shares them
  # with the probes. Scoring runs on this host's devices on its contiguous block of test rows.
  train, test, num_classes = ctx.train_test(state, spec)
  mine = np.array_split(np.arange(len(test["label"])), jax.process_count())[
      jax.process_index()]
  ks = (1, 5) if num_classes > 5 else (1,)
  hits = np.zeros((len(ks),), np.int64)
  k_used = min(int(spec["k"]), len(train["label"]))
  if len(mine):
    res = knn_lib.knn_accuracy(train["feat"], train["label"], test["feat"][mine],
                               test["label"][mine], num_classes=num_classes, k=int(spec["k"]),
                               temperature=float(spec["temperature"]),
                               mesh=streaming.local_mesh())
    hits = np.array([round(res[f"top{k}"] * len(mine)) for k in ks], np.int64)
  total = streaming.sum_over_processes(np.concatenate([hits, [len(mine)]]))
  res = {f"top{k}": total[i] / total[-1] for i, k in enumerate(ks)}
  res["k"] = k_used
  return res, {"feat": test["feat"], "label": test["label"]}

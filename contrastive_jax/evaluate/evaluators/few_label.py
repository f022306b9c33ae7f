"""``type="few_label"``: the linear probe with ``k`` labelled examples per class, mean and
standard deviation of the test top-1 over seeded draws of the labelled subset (the protocol is
in ``evaluate/linear_probe.py``'s docstring).

Like ``linear_probe``, the features are gathered to every host and each host fits the same
probes; the penalty is cross-validated on the labelled subset
(``linear_probe.few_label_probe``).
"""

from __future__ import annotations

from contrastive_jax.errors import ConfigError
from contrastive_jax.evaluate import streaming
from contrastive_jax.evaluate.linear_probe import few_label_probe

# shots: labelled examples per class, one probe each; draws: random labelled subsets per shot
# count; shard_rows, cache_features: as for linear_probe.
SETTINGS = dict(shots=(10,), draws=5, shard_rows=False, cache_features=False)
NEEDS_TEXT = False


def check(where: str, spec: dict) -> None:
  shots = tuple(spec["shots"])
  if any(int(k) < 1 for k in shots):
    raise ConfigError(f"{where}.shots={shots} must be labelled examples per class, each >= 1")
  if int(spec["draws"]) < 1:
    raise ConfigError(f"{where}.draws={spec['draws']} must be >= 1")


programs = streaming.feature_programs


def run(ctx: streaming.Context, state, spec: dict):
  train, test, num_classes = ctx.train_test(state, spec)
  res = few_label_probe(train["feat"], train["label"], test["feat"], test["label"],
                        num_classes=num_classes, shots=tuple(spec["shots"]),
                        draws=int(spec["draws"]), seed=ctx.seed,
                        mesh=streaming.local_mesh() if spec["shard_rows"] else None)
  return res, None

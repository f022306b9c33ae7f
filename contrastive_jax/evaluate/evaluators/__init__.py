"""The evaluator types, one module each, found by the ``type`` of a config entry.

``config.eval.evaluators.<name> = dict(type="knn", ...)`` names a module of this package (the
idea of big_vision's ``evaluators/``); ``evaluate/runner.py`` resolves the entry with the
module's settings and calls its ``run``, and never branches on the type.

To add an evaluator, write ``evaluators/<type>.py`` and add its import line and entry to
``EVALUATORS`` below (the registration is explicit: this file lists every type). A module has:

* ``SETTINGS``: ``{key: default}`` of its own settings, the keys its config entries may set
  beside the common ones (``type``, ``data``, ``every_steps``, ``final``, ``prefix``,
  ``batch_size``; ``runner.COMMON``);
* ``NEEDS_TEXT``: True when it needs ``method.encode_text`` (CLIP-style methods only);
* ``check(where, spec)``: raises ``ConfigError`` naming ``<where>.<key>`` for a bad setting of
  the resolved ``spec`` (every key filled in), before anything is compiled;
* ``programs(spec, data)``: ``[(encoder, (input, shape, dtype)), ...]``, the encoder programs it
  runs (``Encoders`` names), which ``python -m contrastive_jax.compile_for`` compiles;
* ``run(ctx, state, spec)``: ``(results, features)``, ``results`` a (nested) dict of numbers
  logged as ``<prefix>/<key>``, ``features`` the test features ``{"feat", "label"}`` of a
  feature evaluator (for the embedding plot) or None; ``ctx`` is the ``streaming.Context`` of
  the evaluation (data, encoders, gathered features, a cache shared by the evaluators).
"""

from __future__ import annotations

from types import ModuleType

from contrastive_jax.evaluate.evaluators import (few_label, knn, linear_probe, retrieval,
                                                 zero_shot)

EVALUATORS: dict[str, ModuleType] = {
    "knn": knn,
    "linear_probe": linear_probe,
    "few_label": few_label,
    "zero_shot": zero_shot,
    "retrieval": retrieval,
}
TYPES = tuple(EVALUATORS)
TEXT_TYPES = tuple(t for t, m in EVALUATORS.items() if m.NEEDS_TEXT)

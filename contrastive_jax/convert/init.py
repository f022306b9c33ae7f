"""``config.init_from``: start a run from pretrained weights instead of random ones.

Keys (``configs.common.base_config``):

* ``init_from.path``: a converted file (``python -m contrastive_jax.convert import ...``, a
  ``.safetensors`` with our variable names) or another run's work directory (its newest
  checkpoint's ``params`` and ``batch_stats``); "" = random initialisation.
* ``init_from.patterns``: variable-path substrings to load (e.g. ``("image_encoder",
  "image_proj")`` for LiT); empty = every variable in the source. Matched against our paths
  such as ``params/image_encoder/transformer/block0/attn/qkv/kernel``.
* ``init_from.prefix``: inserted after the collection name of the source's paths, to place an
  encoder file in a tower: a timm/torchvision image encoder converted alone has paths
  ``params/patch_embed/...``; ``prefix="image_encoder/"`` loads them into a CLIP image tower.

Every selected source tensor must exist in the model with the same shape (a ValueError names
the ones that do not), and every pattern must select something. Loading happens once, when the
run starts from scratch (a resumed run restores its own checkpoint); the optimizer state and
method state (EMA copies, queue) are then rebuilt from the loaded parameters, as at init.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from absl import logging
from etils import epath

from contrastive_jax.convert import core


def _read_source(path: str) -> dict[str, np.ndarray]:
  p = epath.Path(path)
  if p.is_dir():
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    ckpt_dir = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    steps = sorted(int(d.name) for d in ckpt_dir.iterdir() if d.name.isdigit())
    if not steps:
      raise ValueError(f"init_from.path={path!r}: no checkpoint steps under {ckpt_dir}")
    state = ocp.StandardCheckpointer().restore(ckpt_dir / str(steps[-1]) / "state")
    tree = {"params": state["params"], "batch_stats": state.get("batch_stats") or {}}
    return {k: np.asarray(v) for k, v in core.flatten(tree).items()}
  _, flat = core.load_converted(str(p))
  return flat


def select(source: dict[str, np.ndarray], patterns, prefix: str) -> dict[str, np.ndarray]:
  """The source tensors to load, renamed with ``prefix``, keyed by our flat paths."""
  out = {}
  for key, value in source.items():
    collection, rest = key.split("/", 1)
    key = f"{collection}/{prefix}{rest}"
    if not patterns or any(p in key for p in patterns):
      out[key] = value
  unmatched = [p for p in patterns if not any(p in k for k in out)]
  if unmatched:
    raise ValueError(f"init_from.patterns {unmatched} select nothing from the source "
                     f"(its paths look like {sorted(out or source)[:3]})")
  return out


def apply_init_from(config, method, tx, state, rng: jax.Array):
  """``state`` with the selected variables replaced, optimizer and method state rebuilt."""
  init = config.init_from
  if not init.path:
    return state
  loaded = select(_read_source(init.path), tuple(init.patterns), init.prefix or "")
  core.check_against_model(init.path, method.model, loaded, init.prefix or "")
  ours = core.flatten({"params": state.params, "batch_stats": state.batch_stats})
  missing = sorted(set(loaded) - set(ours))
  if missing:
    raise ValueError(f"init_from: source tensors {missing[:8]} have no place in the model "
                     f"(model paths look like {sorted(ours)[:3]}); fix init_from.prefix or "
                     "init_from.patterns")
  bad = [f"{k}: {tuple(v.shape)} != {tuple(ours[k].shape)}" for k, v in loaded.items()
         if tuple(v.shape) != tuple(ours[k].shape)]
  if bad:
    raise ValueError(f"init_from: mis-shaped tensors (source != model): {bad[:8]}")
  logging.info("init_from: %d of the model's %d tensors from %s (patterns %s)", len(loaded),
               len(ours), init.path, tuple(init.patterns) or "all")
  merged = {k: (np.asarray(loaded[k]).astype(ours[k].dtype) if k in loaded else ours[k])
            for k in ours}
  tree: dict[str, Any] = core.unflatten(merged)
  params, batch_stats = tree["params"], tree.get("batch_stats", {})
  _, *extra_rngs, _ = jax.random.split(rng, 2 + method.extra_state_rngs)  # as init_state
  return state.replace(params=params, batch_stats=batch_stats, opt_state=tx.init(params),
                       **method.extra_state(params, batch_stats, *extra_rngs))

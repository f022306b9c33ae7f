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
the ones that do not), and every pattern must select something; both are checked on the
source's index (the safetensors header, the checkpoint's metadata) before any tensor is read.
Loading happens once, when the run starts from scratch (a resumed run restores its own
checkpoint).

No host holds a replica (the shape-first habit of big_vision's trainers, applied to loading):
each selected tensor is read straight into its leaf's sharding in the run's abstract state
(``runs.build_run(...).abstract_state``), so every host reads only the parts its devices hold.

* converted file: ``jax.make_array_from_callback`` asks for each local device's shard, and
  ``tensor_io.read_slice`` reads just those rows of the file (safetensors stores each tensor
  C-ordered at a known offset: https://huggingface.co/docs/safetensors, "Format");
* run directory: orbax restores only the ``params`` / ``batch_stats`` leaves that are selected
  (``PyTreeRestore(partial_restore=True)``), each into its target sharding; the source's
  optimizer moments, EMA copies and queue are never read.

The optimizer state and the method state (EMA copies, queue) are then built by one jitted
function from the loaded leaves with ``out_shardings`` = the state's shardings, as the random
initialisation is: the AdamW moments of an FSDP run are created already split over the devices.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
from absl import logging

from contrastive_jax.convert import core
# The readers live in ``sources``; re-exported for callers of ``init``.
from contrastive_jax.convert.sources import (  # noqa: F401
    Source, open_source, read_host, read_sharded)


def select(source: Mapping[str, Any], patterns, prefix: str) -> dict[str, Any]:
  """The source entries to load, renamed with ``prefix``, keyed by our flat paths."""
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


def model_leaves(abstract_state) -> dict[str, jax.ShapeDtypeStruct]:
  """Flat ``params`` and ``batch_stats`` leaves of an abstract ``TrainState``."""
  return core.flatten({"params": abstract_state.params,
                       "batch_stats": abstract_state.batch_stats or {}})


def load_params(config, abstract_state, model=None) -> dict[str, jax.Array]:
  """The selected tensors of ``config.init_from``, keyed by our flat paths, each a global array
  with its leaf's sharding and dtype in ``abstract_state`` (checked before anything is read:
  names and shapes, and, given the run's flax ``model``, the converted file's recorded
  architecture, ``core.check_against_model``)."""
  init = config.init_from
  source = open_source(init.path)
  chosen = select({k: k for k in source.tensors}, tuple(init.patterns), init.prefix or "")
  if model is not None:  # heads, activation, eps: what shapes cannot show
    core.check_against_model(init.path, model, chosen, init.prefix or "")
  ours = model_leaves(abstract_state)
  missing = sorted(set(chosen) - set(ours))
  if missing:
    raise ValueError(f"init_from: source tensors {missing[:8]} have no place in the model "
                     f"(model paths look like {sorted(ours)[:3]}); fix init_from.prefix or "
                     "init_from.patterns")
  bad = [f"{k}: {tuple(source.tensors[s].shape)} != {tuple(ours[k].shape)}"
         for k, s in chosen.items() if tuple(source.tensors[s].shape) != tuple(ours[k].shape)]
  if bad:
    raise ValueError(f"init_from: mis-shaped tensors (source != model): {bad[:8]}")
  logging.info("init_from: %d of the model's %d tensors from %s (patterns %s)", len(chosen),
               len(ours), init.path, tuple(init.patterns) or "all")
  loaded = read_sharded(source, {s: ours[k] for k, s in chosen.items()})
  return {k: loaded[s] for k, s in chosen.items()}


def init_state(run, seed: int | None = None):
  """The run's step-0 ``TrainState``: random initialisation (``run.init_state``) with the
  ``config.init_from`` tensors in place, and the optimizer and method state (EMA copies, queue)
  built from the loaded parameters, all computed under ``jit`` with ``run.state_sharding``.

  The random initialisation of the loaded leaves is dead code in that program (XLA drops it),
  and the loaded arrays are donated: a device holds each of its shards once.
  """
  config = run.config
  seed = config.seed if seed is None else seed
  if not config.init_from.path:
    return run.init_state(seed)
  loaded = load_params(config, run.abstract_state, run.method.model)
  method, tx = run.method, run.tx

  def build(rng, loaded):
    state = method.init_state(rng, tx)
    flat = model_leaves(state)
    flat.update(loaded)
    tree = core.unflatten(flat)
    params, batch_stats = tree["params"], tree.get("batch_stats", {})
    _, *extra_rngs, _ = jax.random.split(rng, 2 + method.extra_state_rngs)  # as init_state
    return state.replace(params=params, batch_stats=batch_stats, opt_state=tx.init(params),
                         **method.extra_state(params, batch_stats, *extra_rngs))

  return jax.jit(build, out_shardings=run.state_sharding, donate_argnums=(1,))(
      jax.random.key(seed), loaded)

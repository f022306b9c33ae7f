"""Import peer checkpoints into our variables, export them back, save and load converted files.

A converted file is a safetensors file whose tensors are our variables flattened with "/"
(``params/image_encoder/patch_embed/kernel``, ``batch_stats/stem/bn/mean``) and whose metadata
holds ``spec``: the JSON description of the architecture (``kind`` "clip" with ``image_model``,
``image_kwargs``, ``text_kwargs``, ``embed_dim``; or ``kind`` "encoder" with registry ``name``
and ``kwargs``; plus ``image_size``). ``build_from_spec`` rebuilds the flax module, so the file
alone is enough to run the model (no torch, no peer library).

Every import and export is checked tensor by tensor: a peer key with no rule (extra), a rule
whose peer key is absent (missing), a shape that does not match our module's
(``jax.eval_shape`` of ``init``), and a variable of our module that no rule fills all raise a
``ValueError`` naming the tensors.
"""

from __future__ import annotations

import json
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from contrastive_jax import models
from contrastive_jax.convert import mappings, tensor_io

SPEC_KEY = "contrastive_jax_spec"
FORMAT_KEY = "contrastive_jax_format"


def build_from_spec(spec: dict, **overrides: Any) -> nn.Module:
  """The flax module ``spec`` describes (``overrides``: e.g. ``dtype`` for every tower)."""
  if spec["kind"] == "clip":
    return models.build_clip(spec["image_model"], image_kwargs=dict(spec["image_kwargs"]),
                             text_kwargs=dict(spec["text_kwargs"]),
                             embed_dim=int(spec["embed_dim"]), **overrides)
  if spec["kind"] == "encoder":
    return models.build_model(spec["name"], **{**spec["kwargs"], **overrides})
  raise ValueError(f"spec kind {spec['kind']!r} is unknown; use 'clip' or 'encoder'")


def example_inputs(spec: dict) -> tuple[jax.Array, ...]:
  size = int(spec["image_size"])
  images = jnp.zeros((1, size, size, 3), jnp.float32)
  if spec["kind"] == "clip":
    return images, jnp.zeros((1, int(spec["text_kwargs"]["context_length"])), jnp.int32)
  return (images,)


def abstract_variables(spec: dict) -> dict[str, jax.ShapeDtypeStruct]:
  """Flat ``{path: ShapeDtypeStruct}`` of the module's variables, without allocating them."""
  model = build_from_spec(spec)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *example_inputs(spec),
                                             train=False))
  return flatten(flax.core.unfreeze(shapes))


def flatten(tree: dict) -> dict[str, Any]:
  return {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(tree).items()}


def unflatten(flat: dict[str, Any]) -> dict:
  return flax.traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def _ignored(key: str, ignored: tuple[str, ...]) -> bool:
  return any(key.startswith(i) or key.endswith(i) for i in ignored)


def _check_ours(spec: dict, flat: dict[str, np.ndarray], what: str) -> None:
  want = _abstract_cache(spec)
  missing = sorted(set(want) - set(flat))
  extra = sorted(set(flat) - set(want))
  if missing or extra:
    raise ValueError(f"{what}: our model's variables {missing} are not filled and "
                     f"{extra} are not variables of the model")
  bad = [f"{k}: {tuple(flat[k].shape)} != {tuple(want[k].shape)}" for k in sorted(want)
         if tuple(flat[k].shape) != tuple(want[k].shape)]
  if bad:
    raise ValueError(f"{what}: mis-shaped tensors (given != model): {bad}")


def import_state_dict(fmt: str, sd: dict[str, np.ndarray], *, activation: str | None = None,
                      spec: dict | None = None) -> tuple[dict, dict[str, np.ndarray]]:
  """``(spec, flat variables)`` from a peer state dict (numpy arrays), checked completely."""
  sd = {k: np.asarray(v) for k, v in sd.items()}
  spec = spec or mappings.spec_for(fmt, sd, activation=activation)
  rules, ignored = mappings.rules_for(fmt, spec)
  used = {r.peer for r in rules}
  extra = sorted(k for k in sd if k not in used and not _ignored(k, ignored))
  missing = sorted(r.peer for r in rules if r.peer not in sd)
  if extra or missing:
    raise ValueError(f"{fmt} state dict: missing tensors {missing}; unexpected tensors {extra}")
  # Views (transposes), not copies: a shape-only check of a large model allocates nothing.
  flat = {r.ours: mappings.to_ours(sd[r.peer], r.kind) for r in rules}
  abstract = _abstract_cache(spec)
  for r in rules:  # name the peer key in shape errors, not only ours
    want = abstract.get(r.ours)
    if want is not None and tuple(flat[r.ours].shape) != tuple(want.shape):
      raise ValueError(f"{fmt} tensor {r.peer!r} has shape {tuple(sd[r.peer].shape)}, which "
                       f"gives {tuple(flat[r.ours].shape)} for {r.ours!r}; the model needs "
                       f"{tuple(want.shape)}")
  _check_ours(spec, flat, f"{fmt} import")
  return spec, flat


_CACHE: dict[str, dict] = {}


def _abstract_cache(spec: dict) -> dict:
  key = json.dumps(spec, sort_keys=True)
  if key not in _CACHE:
    _CACHE[key] = abstract_variables(spec)
  return _CACHE[key]


def export_state_dict(fmt: str, spec: dict, flat: dict[str, Any]) -> dict[str, np.ndarray]:
  """Our flat variables -> the peer's state dict (numpy), the exact inverse of the import."""
  flat = {k: np.asarray(v) for k, v in flat.items()}
  rules, _ = mappings.rules_for(fmt, spec)
  covered = {r.ours for r in rules}
  extra = sorted(set(flat) - covered)
  missing = sorted(covered - set(flat))
  if extra or missing:
    raise ValueError(f"export to {fmt}: variables {missing} are missing and {extra} have no "
                     f"place in the {fmt} layout")
  _check_ours(spec, flat, f"export to {fmt}")
  return {r.peer: np.array(mappings.to_peer(flat[r.ours], r.kind), order="C") for r in rules}


def save_converted(path: str, spec: dict, flat: dict[str, Any], fmt: str = "") -> None:
  tensors = {k: np.asarray(v) for k, v in flat.items()}
  tensor_io.write_safetensors(path, tensors, {SPEC_KEY: json.dumps(spec), FORMAT_KEY: fmt})


def load_converted(path: str) -> tuple[dict, dict[str, np.ndarray]]:
  """``(spec, flat variables)`` of a file written by ``save_converted``."""
  tensors, meta = tensor_io.read_safetensors(path)
  if SPEC_KEY not in meta:
    raise ValueError(f"{path} is not a converted file (no {SPEC_KEY!r} metadata); convert "
                     "it first: python -m contrastive_jax.convert import ...")
  return json.loads(meta[SPEC_KEY]), tensors


def load_variables(path: str) -> tuple[dict, dict]:
  """``(spec, nested variables {"params": ..., "batch_stats": ...})`` of a converted file."""
  spec, flat = load_converted(path)
  return spec, unflatten({k: jnp.asarray(v) for k, v in flat.items()})

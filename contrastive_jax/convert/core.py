"""Import peer checkpoints into our variables, export them back, save and load converted files.

A converted file is a safetensors file whose tensors are our variables flattened with "/"
(``params/image_encoder/patch_embed/kernel``, ``batch_stats/stem/bn/mean``) and whose metadata
holds (file version 2):

* ``contrastive_jax_spec``: the JSON architecture (``kind`` "clip" with ``image_model``,
  ``image_kwargs``, ``text_kwargs``, ``embed_dim``; or ``kind`` "encoder" with registry ``name``
  and ``kwargs``; plus ``image_size`` and ``peer``: ``{"format", "model"}``);
* ``contrastive_jax_format``, ``contrastive_jax_peer_model``: where the weights came from
  (``open_clip`` / ``ViT-H-14``);
* ``contrastive_jax_file_version``: "2". Files of the older format have no version: their head
  count was guessed and their activation taken from a flag, so they load with a warning and
  ``python -m contrastive_jax.convert upgrade --model NAME`` rewrites them, checked.

``build_from_spec`` rebuilds the flax module, so the file alone is enough to run the model (no
torch, no peer library), and ``check_against_model`` refuses to load a file into a run whose
model differs in what shapes cannot show (heads, activation, LayerNorm epsilon, ...).

Every import and export is checked tensor by tensor: a peer key with no rule (extra), a rule
whose peer key is absent (missing), a shape that does not match our module's
(``jax.eval_shape`` of ``init``), and a variable of our module that no rule fills all raise a
``ValueError`` naming the tensors.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath

from contrastive_jax import models
from contrastive_jax.convert import mappings, tensor_io
from contrastive_jax.errors import ConfigError, DataError

SPEC_KEY = "contrastive_jax_spec"
FORMAT_KEY = "contrastive_jax_format"
PEER_MODEL_KEY = "contrastive_jax_peer_model"
VERSION_KEY = "contrastive_jax_file_version"
# 2: the peer model name and the architecture it fixes are recorded (files of the older format,
# with no version, came from a converter that guessed heads and took the activation from a flag).
FILE_VERSION = "2"


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


def import_state_dict(sd: dict[str, np.ndarray], model: str | None = None, *,
                      spec: dict | None = None) -> tuple[dict, dict[str, np.ndarray]]:
  """``(spec, flat variables)`` from a peer state dict (numpy arrays), checked completely.

  ``model``: the peer's model name (``"ViT-H-14"``, ``"vit_base_patch16_224"``, ``"resnet50"``;
  ``mappings.MODELS``), which fixes the architecture, head count and activation included.
  ``spec``: instead of a name, a complete architecture with ``spec["peer"]["format"]`` (e.g. a
  ``mappings.named_spec`` with fewer layers). The file's tensors must have exactly the shapes
  the architecture gives; nothing is read off the file but ``logit_scale``'s storage shape.
  """
  if (model is None) == (spec is None):
    raise ConfigError("import needs the peer's model name (e.g. model='ViT-B-32-quickgelu'; "
                      "mappings.MODELS lists them) or a full spec, not both")
  spec = mappings.named_spec(model) if model is not None else copy.deepcopy(spec)
  fmt = (spec.get("peer") or {}).get("format")
  if fmt not in mappings.FORMATS:
    raise ConfigError(f"spec['peer']['format']={fmt!r}; use one of {mappings.FORMATS}")
  sd = {k: np.asarray(v) for k, v in sd.items()}
  mappings.check_state_dict(spec, sd)
  if fmt == "open_clip" and "logit_scale" in sd:  # [] (OpenAI) or [1] (open_clip 3.x): both exact
    spec["logit_scale_shape"] = list(np.shape(sd["logit_scale"]))
  rules, ignored = mappings.rules_for(fmt, spec)
  used = {r.peer for r in rules}
  extra = sorted(k for k in sd if k not in used and not _ignored(k, ignored))
  missing = sorted(r.peer for r in rules if r.peer not in sd)
  if extra or missing:
    raise DataError(f"{fmt} state dict: missing tensors {missing}; unexpected tensors {extra}")
  # Views (transposes), not copies: a shape-only check of a large model allocates nothing.
  flat = {r.ours: mappings.to_ours(sd[r.peer], r.kind) for r in rules}
  abstract = _abstract_cache(spec)
  for r in rules:  # name the peer key in shape errors, not only ours
    want = abstract.get(r.ours)
    if want is not None and tuple(flat[r.ours].shape) != tuple(want.shape):
      raise DataError(f"{fmt} tensor {r.peer!r} has shape {tuple(sd[r.peer].shape)}, which "
                      f"gives {tuple(flat[r.ours].shape)} for {r.ours!r}; the model needs "
                      f"{tuple(want.shape)}")
  _check_ours(spec, flat, f"{fmt} import")
  return spec, flat


_CACHE: dict[str, dict] = {}


def _abstract_cache(spec: dict) -> dict:
  key = json.dumps({k: v for k, v in spec.items() if k != "peer"}, sort_keys=True)
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
  """Writes a converted file: ``flat`` variables plus the architecture ``spec`` and, when the
  spec came from a peer (``spec["peer"]``), the peer's format and model name, so that readers
  can check the file against their config (``check_against_model``)."""
  peer = spec.get("peer") or {}
  tensors = {k: np.asarray(v) for k, v in flat.items()}
  tensor_io.write_safetensors(path, tensors, {
      SPEC_KEY: json.dumps(spec), FORMAT_KEY: fmt or peer.get("format", ""),
      PEER_MODEL_KEY: peer.get("model", ""), VERSION_KEY: FILE_VERSION})


def _legacy_warning(path: str) -> str:
  return (f"{path} was written by an older converter, which guessed the head count as "
          "width // 64 (wrong for ViT-H/14, g/14, bigG/14) and took the activation from a flag, "
          "and recorded no peer model name: its tensors load unchecked against the config. "
          "Rewrite it with the name: python -m contrastive_jax.convert upgrade --model NAME "
          f"--input {path} --output NEW.safetensors")


def read_metadata(path: str) -> dict[str, Any]:
  """The converted file's header, without its tensors: ``{"spec", "format", "peer_model",
  "version"}`` (``version`` "" for files of the older format, which warn on every read)."""
  meta = tensor_io.read_safetensors_metadata(path)
  if SPEC_KEY not in meta:
    raise DataError(f"{path} is not a converted file (no {SPEC_KEY!r} metadata); convert "
                    "it first: python -m contrastive_jax.convert import --model NAME ...")
  return dict(spec=json.loads(meta[SPEC_KEY]), format=meta.get(FORMAT_KEY, ""),
              peer_model=meta.get(PEER_MODEL_KEY, ""), version=meta.get(VERSION_KEY, ""))


def load_converted(path: str) -> tuple[dict, dict[str, np.ndarray]]:
  """``(spec, flat variables)`` of a file written by ``save_converted`` (a file of the older
  format, without the peer name, loads with a warning)."""
  tensors, meta = tensor_io.read_safetensors(path)
  if SPEC_KEY not in meta:
    raise DataError(f"{path} is not a converted file (no {SPEC_KEY!r} metadata); convert "
                    "it first: python -m contrastive_jax.convert import --model NAME ...")
  if VERSION_KEY not in meta:
    logging.warning(_legacy_warning(path))
  return json.loads(meta[SPEC_KEY]), tensors


def load_variables(path: str) -> tuple[dict, dict]:
  """``(spec, nested variables {"params": ..., "batch_stats": ...})`` of a converted file."""
  spec, flat = load_converted(path)
  return spec, unflatten({k: jnp.asarray(v) for k, v in flat.items()})


# Module fields that define the function a set of weights computes (not dtype, remat, dropout).
ARCH_FIELDS = ("patch_size", "width", "depth", "num_heads", "mlp_dim", "pool", "posemb",
               "patch_bias", "ln_pre", "ln_eps", "activation", "vocab_size", "context_length",
               "stem")


def _arch(module: nn.Module) -> dict[str, Any]:
  out: dict[str, Any] = {"type": type(module).__name__}
  for f in ARCH_FIELDS:
    if hasattr(module, f):
      out[f] = getattr(module, f)
  if out.get("mlp_dim", 0) is None:  # ViT/TextTransformer default
    out["mlp_dim"] = 4 * out["width"]
  return out


def check_against_model(source: str | dict, model: nn.Module,
                        loaded_keys: Iterable[str] | None = None, prefix: str = "") -> None:
  """Raises ``ConfigError`` when a converted file's architecture differs from ``model``'s.

  Shapes alone cannot show a wrong head count, activation or LayerNorm epsilon, so the file's
  recorded architecture (``read_metadata(...)["spec"]``) is compared field by field
  (``ARCH_FIELDS``) with the towers of ``model`` (the run's flax module) that receive weights.

  Args:
    source: a converted file's path, or its ``read_metadata`` dict. A run directory (orbax
      checkpoint) has no architecture record and is not checked.
    model: the module the weights go into (a ``CLIP`` or an encoder).
    loaded_keys: our flat paths that will be loaded (``params/image_encoder/...``); a tower is
      checked only if some of them fall in it. None: every tower of the file.
    prefix: ``init_from.prefix``: where the file's paths are placed in ``model``.
  """
  if isinstance(source, str):
    if epath.Path(source).is_dir():
      return
    meta = read_metadata(source)
  else:
    meta = source
  where = source if isinstance(source, str) else "the converted file"
  if not meta.get("version"):
    logging.warning(_legacy_warning(where))
    return
  spec = meta["spec"]
  if "image_kwargs" not in spec and "kwargs" not in spec:
    return  # a stand-in without an architecture (rehearsal's random weights of the config)
  ours = build_from_spec(spec)
  towers = ({"image_encoder": ours.image_encoder, "text_encoder": ours.text_encoder}
            if spec["kind"] == "clip" else {"": ours})
  keys = None if loaded_keys is None else list(loaded_keys)
  name = meta.get("peer_model") or "a custom architecture"
  bad = []
  for sub, module in towers.items():
    target = (prefix + sub).strip("/")
    if keys is not None and target and not any(
        k.split("/", 1)[-1].startswith(target + "/") for k in keys):
      continue
    theirs: Any = model
    for part in filter(None, target.split("/")):
      theirs = getattr(theirs, part, None)
    if not isinstance(theirs, nn.Module):
      continue  # no such tower: the path checks of the loader name it
    a, b = _arch(module), _arch(theirs)
    bad += [f"{target or 'model'}.{f}: file {a[f]!r}, config {b.get(f)!r}"
            for f in a if f in b and a[f] != b[f] and not _same_float(a[f], b[f])]
  if bad:
    raise ConfigError(
        f"{where} holds {name} ({meta.get('format')}), whose architecture differs from the "
        f"config's model: {'; '.join(bad)}. Set these fields in the config's model/text kwargs "
        "to the file's values (the weights compute a different function otherwise), or "
        "convert the checkpoint of the model the config describes")


def _same_float(a: Any, b: Any) -> bool:
  return (isinstance(a, float) and isinstance(b, (int, float))
          and not isinstance(b, bool) and abs(a - b) <= 1e-12 * max(abs(a), abs(b)))

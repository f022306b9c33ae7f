"""Serialized ``jax.export`` encoders: a tower served without this codebase's Python.

``export_tower(spec, variables, tower, path)`` writes ``jax.export.Exported.serialize()`` bytes
(StableHLO plus the calling convention) with the weights baked in as constants. Calling
convention of the file (any program with jax >= 0.4.30 can run it):

    exp = jax.export.deserialize(open(path, "rb").read())
    emb = exp.call(x)

* ``tower="image"``: ``x`` ``[B, S, S, 3] float32`` (NHWC, pixels normalised as the model
  was trained: for OpenAI CLIP, RGB in [0, 1] minus mean (0.4815, 0.4578, 0.4082) divided by std
  (0.2686, 0.2613, 0.2758)), ``S = spec["image_size"]``; returns ``[B, E] float32``
  L2-normalised joint embeddings (CLIP) or ``[B, F]`` features (an encoder spec).
* ``tower="text"`` (CLIP): ``x`` ``[B, L] int32`` token ids (CLIP BPE, ``L`` = the context
  length); returns ``[B, E] float32`` L2-normalised.

``B`` is symbolic: one file serves every batch size. Exported for CPU by default
(``platforms=("cpu", "cuda", "tpu")`` to run on accelerators too).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from etils import epath

from contrastive_jax.convert import core
from contrastive_jax.models import CLIP


def tower_fn(spec: dict, variables: dict, tower: str):
  """``(fn, input ShapeDtypeStruct)`` of ``tower`` with ``variables`` closed over."""
  model = core.build_from_spec(spec)
  (b,) = jax.export.symbolic_shape("b")
  size = int(spec["image_size"])
  if tower == "image":
    arg = jax.ShapeDtypeStruct((b, size, size, 3), jnp.float32)
    if spec["kind"] == "clip":
      return (lambda x: model.apply(variables, x, method=CLIP.encode_image)), arg
    return (lambda x: model.apply(variables, x, train=False)), arg
  if tower == "text" and spec["kind"] == "clip":
    arg = jax.ShapeDtypeStruct((b, int(spec["text_kwargs"]["context_length"])), jnp.int32)
    return (lambda t: model.apply(variables, t, method=CLIP.encode_text)), arg
  raise ValueError(f"tower={tower!r}: use 'image', or 'text' for a CLIP spec")


def export_tower(spec: dict, variables: dict, tower: str, path: str,
                 platforms: Sequence[str] = ("cpu",)) -> jax.export.Exported:
  fn, arg = tower_fn(spec, variables, tower)
  exported = jax.export.export(jax.jit(fn), platforms=tuple(platforms))(arg)
  epath.Path(path).write_bytes(exported.serialize())
  return exported


def load_tower(path: str) -> jax.export.Exported:
  return jax.export.deserialize(bytearray(epath.Path(path).read_bytes()))

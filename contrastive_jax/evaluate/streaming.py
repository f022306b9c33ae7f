"""The machinery every evaluator shares: streamed, host-sharded encoding and gathering.

An evaluator (``evaluate/evaluators/``) never reads a dataset or calls a method itself: it asks
the ``Context`` of one evaluation for what it needs, and the context does it the same way for
every evaluator (the layout is described in ``evaluate/runner.py``):

* ``encode_split``: one pass over this host's contiguous shard of a split
  (``pipeline.eval_iterator``: padded batches with a mask, the same number of batches on every
  host), each global batch encoded over all devices of all hosts;
* ``Context.features``: a split's frozen image features gathered to every host in the split's
  order, computed once per evaluation for all the evaluators that read the same split (and
  kept on disk per host and step with ``cache_features``, ``feature_cache``);
* ``allgather_rows`` / ``sum_over_processes``: rows in process order, hit counts summed;
* ``Encoders``: the method's encoders, jitted once per run; ``local_mesh``: this host's own
  devices, for host-local scoring without cross-host traffic.
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from contrastive_jax import distributed
from contrastive_jax.data import pipeline
from contrastive_jax.evaluate import feature_cache
from contrastive_jax.evaluate import features as feature_lib


def to_dict(node) -> Any:
  """A ConfigDict (or a plain value) as plain Python, copied."""
  return node.to_dict() if hasattr(node, "to_dict") else copy.deepcopy(node)


def data_config(config: ml_collections.ConfigDict, spec: dict) -> ml_collections.ConfigDict:
  """``config.data`` with the evaluator's ``data`` overrides applied."""
  data = ml_collections.ConfigDict(config.data.to_dict())
  with data.unlocked():
    data.update(spec["data"])
  return data


# ----------------------------------------------------------------------------- multi-host


def allgather_rows(local: np.ndarray) -> np.ndarray:
  """Every process's rows ``[n_p, ...]`` concatenated in process order (all processes)."""
  if jax.process_count() == 1:
    return local
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  counts = multihost_utils.process_allgather(np.asarray(local.shape[0], np.int64))
  counts = np.asarray(counts).reshape(-1)
  pad = np.zeros((int(counts.max()) - local.shape[0],) + local.shape[1:], local.dtype)
  stacked = np.asarray(multihost_utils.process_allgather(np.concatenate([local, pad])))
  return np.concatenate([stacked[p, :int(c)] for p, c in enumerate(counts)])


def sum_over_processes(values: np.ndarray) -> np.ndarray:
  """Element-wise sum of an int64 vector over processes."""
  values = np.asarray(values, np.int64)
  if jax.process_count() == 1:
    return values
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(values)).sum(axis=0)


@functools.lru_cache(maxsize=None)
def local_mesh() -> Mesh:
  """This process's own devices as a ``("data",)`` mesh: host-local work, no collectives."""
  return distributed.make_mesh(devices=jax.local_devices())


# ----------------------------------------------------------------------------- encoding


class Encoders:
  """The method's encoders, jitted once per run (so evaluations reuse one compilation).

  ``image_features(state, images)``: ``method.encode`` (kNN, probes); ``image_embedding`` /
  ``text_embedding``: ``method.encode_image`` / ``encode_text`` (zero-shot, retrieval).
  """

  def __init__(self, method):
    self.method = method
    self.image_features = lambda state, x: method.encode(state, x).astype(jnp.float32)
    if hasattr(method, "encode_text"):
      self.image_embedding = lambda state, x: method.encode_image(state, x).astype(jnp.float32)
      self.text_embedding = functools.partial(_encode_captions, method)

  @functools.cached_property
  def jitted(self):
    return {}

  def get(self, name: str, mesh: Mesh):
    key = (name, id(mesh))
    if key not in self.jitted:
      self.jitted[key] = jax.jit(getattr(self, name),
                                 out_shardings=distributed.data_sharding(mesh))
    return self.jitted[key]


def _encode_captions(method, state, tokens: jax.Array) -> jax.Array:
  """``[B, L] -> [B, E]``, or ``[B, K, L] -> [B, K, E]`` (K captions per image), float32."""
  if tokens.ndim == 3:
    b, k, length = tokens.shape
    emb = method.encode_text(state, tokens.reshape(b * k, length))
    return emb.reshape(b, k, -1).astype(jnp.float32)
  return method.encode_text(state, tokens).astype(jnp.float32)


def encode_split(encoders: Encoders, state, mesh: Mesh, data_cfg, split: str, batch_size: int,
                 outputs: Sequence[tuple[str, str, str]]) -> dict[str, np.ndarray]:
  """One pass over this host's shard of ``split``: ``{name: [n_local, ...]}``.

  ``outputs``: ``(name, encoder, input key)`` triples, e.g. ``("feat", "image_features",
  "image")``; also returned: ``label``, ``index`` and, when ``tokens`` is an input, ``tokens``.
  """
  with_text = any(key == "tokens" for _, _, key in outputs)
  batches = pipeline.eval_iterator(data_cfg, split, batch_size, with_text=with_text)
  fns = [(name, encoders.get(enc, mesh), key) for name, enc, key in outputs]
  parts: dict[str, list[np.ndarray]] = {}
  pending = None

  def flush(pending):
    outs, mask = pending
    for name, out in outs.items():
      parts.setdefault(name, []).append(feature_lib._host_local_rows(out)[mask])  # pylint: disable=protected-access

  for batch in batches:
    mask = np.asarray(batch["mask"], bool)
    outs = {name: fn(state, distributed.host_local_to_global(batch[key], mesh))
            for name, fn, key in fns}
    for key in ("label", "index") + (("tokens",) if with_text else ()):
      parts.setdefault(key, []).append(np.asarray(batch[key])[mask])
    if pending is not None:  # fetch the previous batch while this one computes
      flush(pending)
    pending = (outs, mask)
  if pending is not None:
    flush(pending)
  return {k: np.concatenate(v) for k, v in parts.items()}


def image_program(spec: dict, data) -> tuple[str, tuple[int, ...], str]:
  """The image input of an evaluator's encoder program: ``("image", [B, S, S, 3], float32)``."""
  size = int(data.image_size)
  return ("image", (spec["batch_size"], size, size, 3), "float32")


def feature_programs(spec: dict, data) -> list:
  """``programs`` of the evaluators of frozen image features (kNN, probes): ``encode``."""
  return [("image_features", image_program(spec, data))]


def flatten(tree: Any, prefix: str = "") -> dict[str, float]:
  """Nested results ``{"1shot": {"top1": x}}`` as ``{"1shot/top1": x}`` (scalars only)."""
  out = {}
  if isinstance(tree, dict):
    for k, v in tree.items():
      out.update(flatten(v, f"{prefix}{k}/"))
  elif np.isscalar(tree) and not isinstance(tree, str):
    out[prefix[:-1]] = float(tree)
  return out


# ----------------------------------------------------------------------------- one evaluation


class Context:
  """What the evaluators of one ``Runner.run`` call share: the run, the step, a feature cache.

  Args:
    config: the run's config (``config.data``, ``config.seed``, the model for the disk cache).
    encoders: the run's ``Encoders``.
    mesh: the run's ``("data",)`` mesh over all devices of all hosts.
    workdir, step: with both, feature evaluators that set ``cache_features`` keep each host's
      frozen features under ``workdir/eval/features/step_<step>/`` (``feature_cache``).
  """

  def __init__(self, config: ml_collections.ConfigDict, encoders: Encoders, mesh: Mesh,
               workdir=None, step: int | None = None):
    self.config, self.encoders, self.mesh = config, encoders, mesh
    self.workdir, self.step = workdir, step
    self.cache: dict[tuple, Any] = {}  # per evaluation: features, class embeddings

  @property
  def seed(self) -> int:
    return self.config.seed

  def data(self, spec: dict) -> ml_collections.ConfigDict:
    """``config.data`` with the evaluator's ``data`` overrides."""
    return data_config(self.config, spec)

  def features(self, state, spec: dict, split_key: str) -> dict[str, np.ndarray]:
    """Gathered image features ``{"feat": [N, F], "label": [N], "index": [N]}`` of the split
    ``data[split_key]`` (every host, the split's order), computed once per evaluation."""
    data = self.data(spec)
    split = data[split_key]
    key = (json.dumps(data.to_dict(), sort_keys=True, default=str), split, spec["batch_size"])
    if key not in self.cache:
      encode = lambda: encode_split(self.encoders, state, self.mesh, data, split,
                                    spec["batch_size"], [("feat", "image_features", "image")])
      if spec.get("cache_features") and self.workdir is not None and self.step is not None:
        local = self._disk_cached(key, encode)
      else:
        local = encode()
      self.cache[key] = {k: allgather_rows(v) for k, v in local.items()}
    return self.cache[key]

  def train_test(self, state, spec: dict):
    """``(train, test, num_classes)``: the gathered features of the train and eval splits."""
    train = self.features(state, spec, "train_split")
    test = self.features(state, spec, "eval_split")
    num_classes = 1 + int(max(train["label"].max(), test["label"].max()))
    return train, test, num_classes

  def _disk_cached(self, key: tuple, encode) -> dict[str, np.ndarray]:
    """This host's rows from its cache file, or encoded and written. All hosts use their files
    only if every host's is good: encoding is a collective over all hosts' devices."""
    text = json.dumps({"data": key[0], "split": key[1], "batch_size": key[2],
                       "method": self.config.method,
                       "model": to_dict(self.config.model)}, sort_keys=True, default=str)
    path = feature_cache.cache_path(self.workdir, self.step, text, jax.process_index(),
                                    jax.process_count())
    local = feature_cache.load(path, text)
    good = int(sum_over_processes(np.array([local is not None]))[0])
    if good == jax.process_count():
      return local
    local = encode()
    feature_cache.save(path, local, text)
    return local

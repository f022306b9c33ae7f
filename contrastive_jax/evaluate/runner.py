"""Evaluators declared in the config, streamed and sharded over hosts (layer 3).

The idea of big_vision's ``evaluators/common.py``: a run names its evaluators in the config,
each with its data, its frequency and its settings, and the training loop and the command line
(``python -m contrastive_jax.evaluate``) build them from that one declaration, so the numbers
of a checkpoint are the same whoever computes them. A method only says how to encode: ``encode``
(frozen image features, for kNN and probes), ``encode_image`` / ``encode_text`` (the joint
embeddings of CLIP-style methods, for zero-shot and retrieval).

Declaration (``config.evals``; every key but ``type`` optional)::

    config.evals.imagenet_0shot = dict(
        type="zero_shot",            # knn | linear_probe | few_label | zero_shot | retrieval
        data=dict(source="tfds", name="imagenet2012", eval_split="validation[:10000]",
                  cache=False),      # overrides of config.data for this evaluator
        every_steps=5000,            # in the loop every N steps (0: only at the end)
        final=True,                  # also after the last step
        prefix="imagenet",           # metric keys <prefix>/<metric> (default: the name)
        classes="imagenet", templates="clip")   # the evaluator's own settings

A subset for a cheap in-loop evaluation is a tfds split slice (``"validation[:10000]"``): the
same examples whatever the number of hosts. An empty ``config.evals`` means the defaults of
``default_specs``: kNN (every ``config.eval.every_steps``), linear and few-label probes and, for
image-text methods, zero-shot and retrieval on ``config.data.eval_split`` with the source's
held-out caption templates: the evaluations of the embedded runs, under their metric names.

Streaming and sharding: every evaluator reads its split with ``pipeline.eval_iterator`` (this
host's contiguous shard, padded batches with a mask, the same number of batches on every host)
and encodes it with the global batch split over all devices, so each host reads and encodes
only 1/P of the split. Then, per type:

* ``zero_shot``: the class prompts are split over the hosts too (each encodes 1/P of the
  C x T prompts; the embeddings are gathered once, [C x T, E]); each host scores its own images
  and only the hit counts are summed over hosts. Memory per host: a batch and [C, E].
* ``knn``: the labelled bank (train split) features are gathered to every host and split over
  that host's own devices (a process-local mesh: no cross-host traffic while scoring); each
  host scores its own test rows in blocks, and the hit counts are summed. Memory per host: the
  bank ([N_train, F]: 1.28M x 2048 float32 = 10 GB of host memory for ImageNet, spread over
  the local devices) plus a block.
* ``linear_probe`` / ``few_label``: full-batch L-BFGS needs every training row at every
  iteration, so the train and test features ([N, F]) are gathered to every host and each host
  fits the same probe (same seed, same numbers). The regulariser is chosen on a held-out part
  of the train split (``linear_probe.linear_probe``), never on the test split. With
  ``cache_features=True`` each host keeps the rows it encoded on disk per step
  (``feature_cache``), so a re-run at the same step does not encode the split again.
* ``retrieval``: the image and caption embeddings ([N_img, E] and [N_txt, E]: 5k x 512 and
  25k x 512 float32 for COCO, 61 MB) are gathered to every host, never the images. COCO from
  tfds ``coco_captions``, or COCO / Flickr30k from Karpathy's split files
  (``data.source="karpathy_json"``, ``sources.karpathy_json_source``).

Rows are gathered in process order, and each host's shard is a contiguous block of the split,
so the gathered features are in the split's order for any number of hosts: 1 and 2 processes
give the same numbers (tests/test_eval_runner.py).
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from jax.sharding import Mesh

from contrastive_jax import distributed
from contrastive_jax.data import pipeline
from contrastive_jax.errors import ConfigError
from contrastive_jax.evaluate import class_names as class_names_lib
from contrastive_jax.evaluate import feature_cache
from contrastive_jax.evaluate import features as feature_lib
from contrastive_jax.evaluate import knn as knn_lib
from contrastive_jax.evaluate.linear_probe import (DEFAULT_L2_GRID, few_label_probe,
                                                   linear_probe)
from contrastive_jax.evaluate import retrieval as retrieval_lib
from contrastive_jax.evaluate import zero_shot as zero_shot_lib

TYPES = ("knn", "linear_probe", "few_label", "zero_shot", "retrieval")
FEATURE_TYPES = ("knn", "linear_probe", "few_label")
TEXT_TYPES = ("zero_shot", "retrieval")
# Keys every spec has after ``resolve_spec`` (the type-specific ones default from config.eval).
_COMMON = dict(type=None, data=None, every_steps=0, final=True, prefix=None, batch_size=None)
_SETTINGS = {
    "knn": dict(k=None, temperature=None, cache_features=False),
    "linear_probe": dict(l2_grid=DEFAULT_L2_GRID, val_fraction=0.2, shard_rows=False,
                         cache_features=False),
    "few_label": dict(shots=None, draws=5, shard_rows=False, cache_features=False),
    "zero_shot": dict(classes="source", templates="source", wnids=()),
    "retrieval": dict(ks=(1, 5, 10)),
}


# ----------------------------------------------------------------------------- specs


def default_specs(config: ml_collections.ConfigDict, input_mode: str) -> dict[str, dict]:
  """The evaluators of a config that declares none (``config.evals`` empty)."""
  every = int(config.eval.every_steps or 0)
  specs = {"knn": dict(type="knn", every_steps=every),
           "linear": dict(type="linear_probe"),
           "few": dict(type="few_label")}
  if input_mode == "image_text":
    specs["zero_shot"] = dict(type="zero_shot")
    specs["retrieval"] = dict(type="retrieval", ks=(1, 5))
  return specs


def _to_dict(node) -> Any:
  return node.to_dict() if hasattr(node, "to_dict") else copy.deepcopy(node)


def resolve_spec(name: str, spec: dict, config: ml_collections.ConfigDict) -> dict:
  """``spec`` with every key filled in and checked (a ``ConfigError`` names the fix)."""
  spec = dict(_to_dict(spec))
  kind = spec.get("type")
  if kind not in TYPES:
    raise ConfigError(f"config.evals.{name}.type={kind!r} is unknown; use one of {TYPES}")
  unknown = set(spec) - set(_COMMON) - set(_SETTINGS[kind])
  if unknown:
    raise ConfigError(f"config.evals.{name} has unknown key(s) {sorted(unknown)} for type "
                      f"{kind!r}; known: {sorted(set(_COMMON) | set(_SETTINGS[kind]))}")
  out = {**_COMMON, **_SETTINGS[kind], **spec}
  ev = config.eval
  out["prefix"] = out["prefix"] or name
  out["batch_size"] = int(out["batch_size"] or ev.batch_size)
  out["data"] = dict(_to_dict(out["data"]) or {})
  bad = set(out["data"]) - set(config.data.keys())
  if bad:
    raise ConfigError(f"config.evals.{name}.data has key(s) {sorted(bad)} that config.data "
                      f"does not; known: {sorted(config.data.keys())}")
  if kind == "knn":
    out["k"] = int(out["k"] or ev.knn_k)
    out["temperature"] = float(out["temperature"] or ev.knn_temperature)
    if out["k"] < 1:
      raise ConfigError(f"config.evals.{name}.k={out['k']} must be >= 1")
  if kind == "zero_shot" and out["wnids"]:
    if out["classes"] != "imagenet":
      raise ConfigError(f"config.evals.{name}.wnids needs classes='imagenet' (a subset of "
                        "the 1,000 ImageNet classes)")
    try:
      class_names_lib.wnid_subset(out["wnids"])
    except ValueError as error:
      raise ConfigError(f"config.evals.{name}.wnids: {error}") from None
  if kind == "few_label" and out["shots"] is None:
    out["shots"] = tuple(ev.few_shots)
  every = out["every_steps"]
  if not isinstance(every, int) or every < 0:
    raise ConfigError(f"config.evals.{name}.every_steps={every!r} must be an integer >= 0 "
                      "(0: only at the end)")
  return out


def specs_of(config: ml_collections.ConfigDict, input_mode: str) -> dict[str, dict]:
  """The run's evaluators, resolved: ``config.evals`` or, when empty, ``default_specs``."""
  declared = _to_dict(config.get("evals")) or {}
  raw = declared or default_specs(config, input_mode)
  specs = {name: resolve_spec(name, spec, config) for name, spec in raw.items()}
  for name, spec in specs.items():
    if spec["type"] in TEXT_TYPES and input_mode != "image_text":
      raise ConfigError(f"config.evals.{name} is a {spec['type']} evaluator, which needs a "
                        "method with a text tower (clip, siglip); remove it for this method")
  return specs


def data_config(config: ml_collections.ConfigDict, spec: dict) -> ml_collections.ConfigDict:
  """``config.data`` with the evaluator's ``data`` overrides applied."""
  data = ml_collections.ConfigDict(config.data.to_dict())
  with data.unlocked():
    data.update(spec["data"])
  return data


# ----------------------------------------------------------------------------- multi-host


def _allgather_rows(local: np.ndarray) -> np.ndarray:
  """Every process's rows ``[n_p, ...]`` concatenated in process order (all processes)."""
  if jax.process_count() == 1:
    return local
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  counts = multihost_utils.process_allgather(np.asarray(local.shape[0], np.int64))
  counts = np.asarray(counts).reshape(-1)
  pad = np.zeros((int(counts.max()) - local.shape[0],) + local.shape[1:], local.dtype)
  stacked = np.asarray(multihost_utils.process_allgather(np.concatenate([local, pad])))
  return np.concatenate([stacked[p, :int(c)] for p, c in enumerate(counts)])


def _sum_over_processes(values: np.ndarray) -> np.ndarray:
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


def class_embeddings(encoders: Encoders, state, mesh: Mesh, tokenizer,
                     prompts: Sequence[Sequence[str]], batch_size: int) -> np.ndarray:
  """``[C, E]`` prompt-ensembled class embeddings; the ``C x T`` prompts split over hosts.

  Each process tokenizes and encodes its contiguous part of the flattened prompts (global
  batches over all devices), the embeddings are gathered once, and
  ``zero_shot.ensemble_class_embeddings`` averages the normalised template embeddings.
  """
  num_classes, num_templates = len(prompts), len(prompts[0])
  flat = [p for row in prompts for p in row]
  mine = np.array_split(np.arange(len(flat)), jax.process_count())[jax.process_index()]
  tokens = np.asarray(tokenizer.encode([flat[i] for i in mine]), np.int32)
  if tokens.shape[0] == 0:  # more processes than prompts: encode one dummy row, drop it
    tokens = np.zeros((1, tokenizer.encode(["x"]).shape[1]), np.int32)
  fn = encoders.get("text_embedding", mesh)
  emb = feature_lib.extract_features(lambda s, t: fn(s, t), tokens, mesh=mesh,
                                     batch_size=batch_size, variables=state)[:len(mine)]
  emb = _allgather_rows(emb)
  return zero_shot_lib.ensemble_class_embeddings(emb.reshape(num_classes, num_templates, -1))


# ----------------------------------------------------------------------------- the runner


class Runner:
  """The run's evaluators, built once from the config; ``run(state, names)`` evaluates.

  Args:
    config: the run's config (``config.evals``, ``config.eval``, ``config.data``).
    method: the bound method (its encoders).
    mesh: the run's ``("data",)`` mesh over all devices of all hosts.
    workdir: the run's directory; with it, feature evaluators that set ``cache_features``
      keep each host's frozen features under ``workdir/eval/features/step_<step>/``
      (``feature_cache``) when ``run`` is given the step.
  """

  def __init__(self, config: ml_collections.ConfigDict, method, mesh: Mesh, workdir=None):
    self.config, self.method, self.mesh = config, method, mesh
    self.workdir = workdir
    self.specs = specs_of(config, getattr(method, "input_mode", "views"))
    self.encoders = Encoders(method)
    self._step = None
    for name, spec in self.specs.items():
      try:
        distributed.check_batch_divisible(spec["batch_size"], mesh,
                                          f"config.evals.{name}.batch_size")
      except ValueError as error:
        raise ConfigError(str(error)) from None

  def due(self, step: int) -> list[str]:
    """The evaluators that run in the loop after ``step``."""
    return [n for n, s in self.specs.items() if s["every_steps"] and step % s["every_steps"] == 0]

  def final(self) -> list[str]:
    return [n for n, s in self.specs.items() if s["final"]]

  def select(self, names: Iterable[str]) -> list[str]:
    """Evaluator names from names or types (``extra``: the text evaluators), in spec order."""
    wanted = set(names)
    if "all" in wanted:
      return list(self.specs)
    picked = [n for n, s in self.specs.items()
              if n in wanted or s["type"] in wanted
              or ("extra" in wanted and s["type"] in TEXT_TYPES)]
    unknown = wanted - set(self.specs) - set(TYPES) - {"extra"}
    if unknown:
      raise ConfigError(f"unknown evaluator(s) {sorted(unknown)}; this run declares "
                        f"{sorted(self.specs)} (types {TYPES})")
    return picked

  def run(self, state, names: Sequence[str], *, keep_features: bool = False,
          step: int | None = None):
    """``{<prefix>/<metric>: float}`` of the named evaluators on ``state``.

    With ``keep_features``, returns ``(results, features)``, ``features`` the test features and
    labels of the first feature evaluator (``{"feat", "label"}``; None without one). ``step``:
    the checkpoint step of ``state``, which names the on-disk feature cache (none without it).
    """
    self._step = step
    cache: dict[tuple, dict[str, np.ndarray]] = {}
    out: dict[str, float] = {}
    kept = None
    for name in names:
      spec = self.specs[name]
      res, feats = getattr(self, "_" + spec["type"])(state, spec, cache)
      out.update({f"{spec['prefix']}/{k}": float(v) for k, v in _flatten(res).items()})
      if kept is None and feats is not None:
        kept = feats
    return (out, kept) if keep_features else out

  # -- the types
  def _features(self, state, spec, split_key: str, cache) -> dict[str, np.ndarray]:
    """Gathered image features of a split (every host, the split's order), cached per call."""
    data = data_config(self.config, spec)
    split = data[split_key]
    key = (json.dumps(data.to_dict(), sort_keys=True, default=str), split, spec["batch_size"])
    if key not in cache:
      encode = lambda: encode_split(self.encoders, state, self.mesh, data, split,
                                    spec["batch_size"], [("feat", "image_features", "image")])
      if spec["cache_features"] and self.workdir is not None and self._step is not None:
        local = self._disk_cached(key, encode)
      else:
        local = encode()
      cache[key] = {k: _allgather_rows(v) for k, v in local.items()}
    return cache[key]

  def _disk_cached(self, key: tuple, encode) -> dict[str, np.ndarray]:
    """This host's rows from its cache file, or encoded and written. All hosts use their files
    only if every host's is good: encoding is a collective over all hosts' devices."""
    text = json.dumps({"data": key[0], "split": key[1], "batch_size": key[2],
                       "method": self.config.method,
                       "model": _to_dict(self.config.model)}, sort_keys=True, default=str)
    path = feature_cache.cache_path(self.workdir, self._step, text, jax.process_index(),
                                    jax.process_count())
    local = feature_cache.load(path, text)
    good = int(_sum_over_processes(np.array([local is not None]))[0])
    if good == jax.process_count():
      return local
    local = encode()
    feature_cache.save(path, local, text)
    return local

  def _train_test(self, state, spec, cache):
    train = self._features(state, spec, "train_split", cache)
    test = self._features(state, spec, "eval_split", cache)
    num_classes = 1 + int(max(train["label"].max(), test["label"].max()))
    return train, test, num_classes

  def _knn(self, state, spec, cache):
    # The bank is gathered; the test rows could stay local, but the cache shares them with the
    # probes. Scoring runs on this host's devices on its contiguous block of the test rows.
    train, test, num_classes = self._train_test(state, spec, cache)
    mine = np.array_split(np.arange(len(test["label"])), jax.process_count())[
        jax.process_index()]
    ks = (1, 5) if num_classes > 5 else (1,)
    hits = np.zeros((len(ks),), np.int64)
    k_used = min(spec["k"], len(train["label"]))
    if len(mine):
      res = knn_lib.knn_accuracy(train["feat"], train["label"], test["feat"][mine],
                                 test["label"][mine], num_classes=num_classes, k=spec["k"],
                                 temperature=spec["temperature"], mesh=local_mesh())
      hits = np.array([round(res[f"top{k}"] * len(mine)) for k in ks], np.int64)
    total = _sum_over_processes(np.concatenate([hits, [len(mine)]]))
    res = {f"top{k}": total[i] / total[-1] for i, k in enumerate(ks)}
    res["k"] = k_used
    return res, {"feat": test["feat"], "label": test["label"]}

  def _linear_probe(self, state, spec, cache):
    train, test, num_classes = self._train_test(state, spec, cache)
    res = linear_probe(train["feat"], train["label"], test["feat"], test["label"],
                                 num_classes=num_classes, seed=self.config.seed,
                                 l2_grid=tuple(spec["l2_grid"]),
                                 val_fraction=spec["val_fraction"],
                                 mesh=local_mesh() if spec["shard_rows"] else None)
    return {k: v for k, v in res.items() if np.isscalar(v)}, None

  def _few_label(self, state, spec, cache):
    train, test, num_classes = self._train_test(state, spec, cache)
    res = few_label_probe(train["feat"], train["label"], test["feat"], test["label"],
                                    num_classes=num_classes, shots=tuple(spec["shots"]),
                                    draws=int(spec["draws"]), seed=self.config.seed,
                                    mesh=local_mesh() if spec["shard_rows"] else None)
    return res, None

  def _zero_shot(self, state, spec, cache):
    data = data_config(self.config, spec)
    names, prompts = zero_shot_prompts(data, spec)
    tokenizer = pipeline.make_tokenizer(data)
    # ImageNet and its variants share one set of class embeddings per evaluation.
    key = ("classes", json.dumps(prompts), data.tokenizer, data.spm_model,
           int(data.context_length), spec["batch_size"])
    if key not in cache:
      cache[key] = class_embeddings(self.encoders, state, self.mesh, tokenizer, prompts,
                                    spec["batch_size"])
    classes = cache[key]
    local = encode_split(self.encoders, state, self.mesh, data, data.eval_split,
                         spec["batch_size"], [("emb", "image_embedding", "image")])
    labels = local["label"]
    if spec["wnids"]:  # a class subset (ImageNet-R/-A): labels into the subset's indices
      _, label_map = class_names_lib.wnid_subset(spec["wnids"])
      labels = label_map[labels]
      if (labels < 0).any():
        raise ValueError(f"{int((labels < 0).sum())} images of {data.name}/{data.eval_split} "
                         "have labels outside the zero-shot wnids subset")
    ks = (1, 5) if len(names) > 5 else (1,)
    hits = np.zeros((len(ks),), np.int64)
    if len(labels):
      h = zero_shot_lib.zero_shot_hits(local["emb"], classes, labels, ks=ks)
      hits = h.sum(axis=0).astype(np.int64)
    total = _sum_over_processes(np.concatenate([hits, [len(labels)]]))
    return {f"top{k}": total[i] / total[-1] for i, k in enumerate(ks)}, None

  def _retrieval(self, state, spec, cache):
    del cache
    data = data_config(self.config, spec)
    local = encode_split(self.encoders, state, self.mesh, data, data.eval_split,
                         spec["batch_size"], [("img", "image_embedding", "image"),
                                              ("txt", "text_embedding", "tokens")])
    g = {k: _allgather_rows(v) for k, v in local.items()}
    tokens = g["tokens"]
    if tokens.ndim == 3:  # [N, captions per image, L]: every caption its own text (COCO)
      per = tokens.shape[1]
      text_emb = g["txt"].reshape(-1, g["txt"].shape[-1])
      text_to_image = np.repeat(np.arange(len(tokens)), per)
      groups = None
    else:  # one caption per example; identical captions are one text (class captions)
      text_emb, text_to_image = g["txt"], np.arange(len(tokens))
      groups = np.unique(tokens, axis=0, return_inverse=True)[1].reshape(-1)
    res = retrieval_lib.retrieval_recall(g["img"], text_emb, text_to_image,
                                         ks=tuple(spec["ks"]), text_groups=groups)
    return {k: v for k, v in res.items() if "R@" in k}, None


def zero_shot_prompts(data_cfg, spec) -> tuple[list[str], list[list[str]]]:
  """``(class names [C], prompts [C][T])`` of a zero-shot spec.

  ``classes="source"``: the dataset's class names with its held-out caption templates
  (``templates="source"``); ``classes="imagenet"``: the 1,000 names of CLIP's ImageNet
  evaluation in tfds ``imagenet2012`` label order (also the label space of tfds
  ``imagenet_v2``, ``imagenet_sketch``, ``imagenet_r`` and ``imagenet_a``), with
  ``templates="clip"`` (the 80 templates) or a tuple of format strings such as
  ``("a photo of a {}.",)``. ``wnids``: score only these classes, labels mapped into the
  subset: ``"imagenet_r"`` / ``"imagenet_a"`` (the 200 classes of each, shipped in
  ``data/imagenet_subsets.json``) or a tuple of WordNet ids.
  """
  classes, templates = spec["classes"], spec["templates"]
  if classes == "source":
    if templates == "source":
      p = pipeline.class_prompts(data_cfg, templates="eval")
      return p["class_names"], p["prompts"]
    names = pipeline.class_prompts(data_cfg, templates="eval")["class_names"]
  elif classes == "imagenet":
    names = class_names_lib.imagenet_class_names()
    if spec.get("wnids"):
      names = class_names_lib.wnid_subset(spec["wnids"])[0]
  else:
    raise ConfigError(f"zero-shot classes={classes!r} is unknown; use 'source' or 'imagenet'")
  if templates == "clip":
    templates = class_names_lib.imagenet_templates()
  elif isinstance(templates, str):
    raise ConfigError(f"zero-shot templates={templates!r} is unknown; use 'source' (with "
                      "classes='source'), 'clip' or a tuple of strings with '{}'")
  for t in templates:
    if "{}" not in t:
      raise ConfigError(f"zero-shot template {t!r} has no '{{}}' for the class name")
  return list(names), [[t.format(n) for t in templates] for n in names]


def _flatten(tree: Any, prefix: str = "") -> dict[str, float]:
  out = {}
  if isinstance(tree, dict):
    for k, v in tree.items():
      out.update(_flatten(v, f"{prefix}{k}/"))
  elif np.isscalar(tree) and not isinstance(tree, str):
    out[prefix[:-1]] = float(tree)
  return out


def write_results(workdir, step: int, results: dict[str, float], names: Sequence[str]) -> None:
  """``workdir/eval/step_<step>.json`` (chief only; ``etils.epath``: local or gs://)."""
  if jax.process_index() != 0:
    return
  path = epath.Path(workdir) / "eval"
  path.mkdir(parents=True, exist_ok=True)
  (path / f"step_{step}.json").write_text(json.dumps(
      {"step": int(step), "evaluators": list(names), "results": results}, indent=2))


def raw_pixel_baseline(config: ml_collections.ConfigDict) -> dict[str, float]:
  """The linear and few-label probes on flattened raw pixels (small, in-memory data only):
  what the encoder has to beat."""
  train = pipeline.eval_arrays(config.data, config.data.train_split)
  test = pipeline.eval_arrays(config.data, config.data.eval_split)
  num_classes = 1 + int(max(train["label"].max(), test["label"].max()))

  def flat(x):
    x = np.asarray(x, np.float32)
    if x.ndim == 4 and all(np.array_equal(x[..., 0], x[..., c]) for c in range(1, x.shape[-1])):
      x = x[..., :1]  # grayscale replicated to 3 channels: the same pixels, a third the cost
    return x.reshape(len(x), -1)

  train_x, test_x = flat(train["image"]), flat(test["image"])
  out = {}
  res = linear_probe(train_x, train["label"], test_x, test["label"],
                               num_classes=num_classes, seed=config.seed)
  out.update({f"linear/{k}": v for k, v in res.items() if np.isscalar(v)})
  res = few_label_probe(train_x, train["label"], test_x, test["label"],
                                  num_classes=num_classes, shots=tuple(config.eval.few_shots),
                                  seed=config.seed)
  out.update(_flatten(res, "few/"))
  return {k: float(v) for k, v in out.items()}


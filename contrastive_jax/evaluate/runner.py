"""Evaluators declared in the config, streamed and sharded over hosts (layer 3).

The idea of big_vision's ``evaluators/common.py``: a run names its evaluators in the config,
each with its data, its frequency and its settings, and the training loop and the command line
(``python -m contrastive_jax.evaluate``) build them from that one declaration, so the numbers
of a checkpoint are the same whoever computes them. A method only says how to encode: ``encode``
(frozen image features, for kNN and probes), ``encode_image`` / ``encode_text`` (the joint
embeddings of CLIP-style methods, for zero-shot and retrieval).

One config section, ``config.eval``: ``enabled``, ``every_steps`` (the in-loop period of the
default kNN), ``batch_size`` (every evaluator's default), ``raw_pixel_baseline``,
``embedding_plot`` and ``evaluators``, the declaration (every key but ``type`` optional)::

    config.eval.evaluators.imagenet_0shot = dict(
        type="zero_shot",            # a module of evaluate/evaluators/ (knn, linear_probe,
                                     # few_label, zero_shot, retrieval)
        data=dict(source="tfds", name="imagenet2012", eval_split="validation[:10000]",
                  cache=False),      # overrides of config.data for this evaluator
        every_steps=5000,            # in the loop every N steps (0: only at the end)
        final=True,                  # also after the last step
        prefix="imagenet",           # metric keys <prefix>/<metric> (default: the name)
        batch_size=1024,             # default config.eval.batch_size
        classes="imagenet", templates="clip")   # the type's own settings (its SETTINGS)

A type's settings and their defaults, their checks and the evaluation itself live in its module
(``evaluate/evaluators/<type>.py``, found through ``evaluators.EVALUATORS``); this file only
resolves the declarations, checks the keys every evaluator shares and schedules them. A subset
for a cheap in-loop evaluation is a tfds split slice (``"validation[:10000]"``): the same
examples whatever the number of hosts. An empty ``config.eval.evaluators`` means the defaults of
``default_specs``: kNN (every ``config.eval.every_steps``), linear and few-label probes and, for
image-text methods, zero-shot and retrieval on ``config.data.eval_split`` with the source's
held-out caption templates: the evaluations of the embedded runs, under their metric names.

Streaming and sharding (``evaluate/streaming.py``): every evaluator reads its split with
``pipeline.eval_iterator`` (this host's contiguous shard, padded batches with a mask, the same
number of batches on every host) and encodes it with the global batch split over all devices,
so each host reads and encodes only 1/P of the split; what each type gathers and what it keeps
per host is said in its module. Rows are gathered in process order, and each host's shard is a
contiguous block of the split, so the gathered features are in the split's order for any number
of hosts: 1 and 2 processes give the same numbers (tests/test_eval_runner.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

import jax
import ml_collections
import numpy as np
from etils import epath
from jax.sharding import Mesh

from contrastive_jax import distributed, methods
from contrastive_jax.data import pipeline
from contrastive_jax.errors import ConfigError
from contrastive_jax.evaluate import evaluators, streaming
from contrastive_jax.evaluate.linear_probe import few_label_probe, linear_probe

# The keys every evaluator's entry has after ``resolve_spec``, beside its type's SETTINGS.
COMMON = dict(type=None, data=None, every_steps=0, final=True, prefix=None, batch_size=None)


def where(name: str) -> str:
  """The config key of evaluator ``name``, for error messages."""
  return f"config.eval.evaluators.{name}"


# ----------------------------------------------------------------------------- specs


def default_specs(config: ml_collections.ConfigDict, input_mode: str) -> dict[str, dict]:
  """The evaluators of a config that declares none (``config.eval.evaluators`` empty)."""
  every = int(config.eval.every_steps or 0)
  specs = {"knn": dict(type="knn", every_steps=every),
           "linear": dict(type="linear_probe"),
           "few": dict(type="few_label")}
  if input_mode == "image_text":
    specs["zero_shot"] = dict(type="zero_shot")
    specs["retrieval"] = dict(type="retrieval", ks=(1, 5))
  return specs


def resolve_spec(name: str, spec: dict, config: ml_collections.ConfigDict) -> dict:
  """``spec`` with every key filled in (its type's defaults) and checked (a ``ConfigError``
  names the key and the fix)."""
  spec = dict(streaming.to_dict(spec))
  kind = spec.get("type")
  if kind not in evaluators.EVALUATORS:
    raise ConfigError(f"{where(name)}.type={kind!r} is unknown; use one of "
                      f"{evaluators.TYPES} (evaluate/evaluators/)")
  module = evaluators.EVALUATORS[kind]
  unknown = set(spec) - set(COMMON) - set(module.SETTINGS)
  if unknown:
    raise ConfigError(f"{where(name)} has unknown key(s) {sorted(unknown)} for type "
                      f"{kind!r}; known: {sorted(set(COMMON) | set(module.SETTINGS))}")
  out = {**COMMON, **module.SETTINGS, **spec}
  out["prefix"] = out["prefix"] or name
  out["batch_size"] = int(out["batch_size"] or config.eval.batch_size)
  out["data"] = dict(streaming.to_dict(out["data"]) or {})
  bad = set(out["data"]) - set(config.data.keys())
  if bad:
    raise ConfigError(f"{where(name)}.data has key(s) {sorted(bad)} that config.data "
                      f"does not; known: {sorted(config.data.keys())}")
  module.check(where(name), out)
  every = out["every_steps"]
  if not isinstance(every, int) or every < 0:
    raise ConfigError(f"{where(name)}.every_steps={every!r} must be an integer >= 0 "
                      "(0: only at the end)")
  return out


def specs_of(config: ml_collections.ConfigDict, input_mode: str) -> dict[str, dict]:
  """The run's evaluators, resolved: ``config.eval.evaluators`` or, when empty,
  ``default_specs``."""
  declared = streaming.to_dict(config.eval.evaluators) or {}
  raw = declared or default_specs(config, input_mode)
  specs = {name: resolve_spec(name, spec, config) for name, spec in raw.items()}
  for name, spec in specs.items():
    if spec["type"] in evaluators.TEXT_TYPES and input_mode != "image_text":
      raise ConfigError(f"{where(name)} is a {spec['type']} evaluator, which needs a "
                        "method with a text tower (clip, siglip); remove it for this method")
  return specs


def _check_batch_sizes(specs: dict[str, dict], mesh: Mesh) -> None:
  for name, spec in specs.items():
    try:
      distributed.check_batch_divisible(spec["batch_size"], mesh,
                                        f"{where(name)}.batch_size (default "
                                        "config.eval.batch_size)")
    except ValueError as error:
      raise ConfigError(str(error)) from None


def check_config(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
  """The checks of ``config.eval`` before anything compiles: every evaluator's keys and
  settings (its module's ``check``) and its batch against ``mesh``; nothing when evaluation is
  off. Raises ``ConfigError`` naming the key."""
  if not config.eval.enabled:
    return
  method = methods.METHODS.get(config.method)  # an unknown method is config.method's error
  _check_batch_sizes(specs_of(config, getattr(method, "input_mode", "views")), mesh)


# ----------------------------------------------------------------------------- the runner


class Runner:
  """The run's evaluators, built once from the config; ``run(state, names)`` evaluates.

  Args:
    config: the run's config (``config.eval``, ``config.data``).
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
    _check_batch_sizes(self.specs, mesh)
    self.encoders = streaming.Encoders(method)

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
              or ("extra" in wanted and s["type"] in evaluators.TEXT_TYPES)]
    unknown = wanted - set(self.specs) - set(evaluators.TYPES) - {"extra"}
    if unknown:
      raise ConfigError(f"unknown evaluator(s) {sorted(unknown)}; this run declares "
                        f"{sorted(self.specs)} (types {evaluators.TYPES})")
    return picked

  def run(self, state, names: Sequence[str], *, keep_features: bool = False,
          step: int | None = None):
    """``{<prefix>/<metric>: float}`` of the named evaluators on ``state``.

    With ``keep_features``, returns ``(results, features)``, ``features`` the test features and
    labels of the first feature evaluator (``{"feat", "label"}``; None without one). ``step``:
    the checkpoint step of ``state``, which names the on-disk feature cache (none without it).
    """
    ctx = streaming.Context(self.config, self.encoders, self.mesh, self.workdir, step)
    out: dict[str, float] = {}
    kept = None
    for name in names:
      spec = self.specs[name]
      res, feats = evaluators.EVALUATORS[spec["type"]].run(ctx, state, spec)
      out.update({f"{spec['prefix']}/{k}": float(v)
                  for k, v in streaming.flatten(res).items()})
      if kept is None and feats is not None:
        kept = feats
    return (out, kept) if keep_features else out


def write_results(workdir, step: int, results: dict[str, float], names: Sequence[str]) -> None:
  """``workdir/eval/step_<step>.json`` (chief only; ``etils.epath``: local or gs://)."""
  if jax.process_index() != 0:
    return
  path = epath.Path(workdir) / "eval"
  path.mkdir(parents=True, exist_ok=True)
  (path / f"step_{step}.json").write_text(json.dumps(
      {"step": int(step), "evaluators": list(names), "results": results}, indent=2))


def _few_label_shots(config: ml_collections.ConfigDict) -> tuple[int, ...]:
  """The shots of the run's first declared few-label evaluator, else the type's default."""
  declared = streaming.to_dict(config.eval.evaluators) or {}
  for spec in declared.values():
    if spec.get("type") == "few_label" and "shots" in spec:
      return tuple(spec["shots"])
  return tuple(evaluators.EVALUATORS["few_label"].SETTINGS["shots"])


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
                        num_classes=num_classes, shots=_few_label_shots(config),
                        seed=config.seed)
  out.update(streaming.flatten(res, "few/"))
  return {k: float(v) for k, v in out.items()}

"""The run configs, shipped inside the package (as big_vision keeps ``big_vision/configs``), so
that an installed package finds them: ``from contrastive_jax.configs import simclr_mnist``.

On the command line a config is a file, ``--config=configs/simclr_mnist.py[:arg]``
(``configs/`` at the repository root links to this folder) or
``--config=contrastive_jax/configs/simclr_mnist.py``. ``resolve`` maps ``configs/NAME.py`` to
the packaged file when no such file exists from the current directory (an installed package
run from elsewhere). ``accept_none_overrides`` lets ``--config.key=None`` reset a number:
``--config.total_steps=None --config.total_epochs=100`` switches a run to epochs.

The one dotted-key setter, for code and tools that change a config outside the flags
(``launch/sweep.py``, ``python -m contrastive_jax.evaluate --set``, tests, benchmarks):
``set_value(config, "loss.temperature", 0.2)`` and ``apply_overrides(config, ["a.b=1", ...])``.
A checkpoint's JSON config comes back through ``config_from_json``.
"""

from __future__ import annotations

import ast
import importlib.util
import os
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from contrastive_jax.errors import ConfigError

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_NOT_CONFIGS = ("__init__", "common")


def names() -> list[str]:
  """The configs shipped with the package, e.g. ``["clip_mnist", ..., "simclr_mnist"]``."""
  return sorted(f[:-3] for f in os.listdir(PACKAGE_DIR)
                if f.endswith(".py") and f[:-3] not in _NOT_CONFIGS)


def resolve(spec: str) -> str:
  """``"configs/x.py[:arg]"`` -> the same spec with a path that exists.

  A path that exists (from the current directory) is kept; otherwise a file name that is one of
  the packaged configs is replaced by the packaged file. Anything else is returned unchanged,
  for the caller's "file not found" message.
  """
  path, sep, arg = spec.partition(":")
  if os.path.isfile(path):
    return spec
  name = os.path.basename(path)
  if name.endswith(".py") and name[:-3] in names():
    return os.path.join(PACKAGE_DIR, name) + sep + arg
  return spec


def resolve_argv(argv: Sequence[str], flag: str = "config") -> list[str]:
  """``argv`` with the value of ``--config=...`` (or ``--config ...``) passed through
  ``resolve``."""
  out = list(argv)
  for i, arg in enumerate(out):
    if arg.startswith(f"--{flag}="):
      out[i] = f"--{flag}=" + resolve(arg.split("=", 1)[1])
    elif arg == f"--{flag}" and i + 1 < len(out):
      out[i + 1] = resolve(out[i + 1])
  return out


def _tuples(node: Any) -> Any:
  if isinstance(node, Mapping):
    return {k: _tuples(v) for k, v in node.items()}
  if isinstance(node, (list, tuple)):
    return tuple(_tuples(v) for v in node)
  return node


def config_from_json(data: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A checkpoint's JSON config (plain dicts and lists) as a ConfigDict, lists as tuples.

  A key declared in ``common.py`` after the checkpoint was written takes its default there, so
  that the code, which reads every key without a default of its own, can rebuild older runs.
  """
  if not isinstance(data, Mapping):
    raise ConfigError(f"a saved config must be a JSON object, got {type(data).__name__}")
  saved = _upgrade_eval_section(_tuples(data))
  return ml_collections.ConfigDict(_merge(_declared_defaults(saved), saved))


# Settings of config.eval that were the defaults of evaluator types until the evaluators moved
# into config.eval.evaluators (2026-12): (type, its setting, the old default).
_LEGACY_EVAL_KEYS = {"knn_k": ("knn", "k", 200), "knn_temperature": ("knn", "temperature", 0.07),
                     "few_shots": ("few_label", "shots", (10,))}


def _upgrade_eval_section(saved: dict[str, Any]) -> dict[str, Any]:
  """A config saved with ``config.evals`` and ``config.eval.knn_k`` / ``knn_temperature`` /
  ``few_shots`` in the one section of today: the declared evaluators become
  ``config.eval.evaluators``, and the old defaults fill the settings their evaluators left
  unset, as the old code did. Runs that declared none and changed a default are evaluated with
  the type's default now (a warning says so; declare the evaluator to keep the old value)."""
  ev = dict(saved.get("eval") or {})
  legacy = {k: ev.pop(k) for k in _LEGACY_EVAL_KEYS if k in ev}
  if "evals" not in saved and not legacy:
    return saved
  saved = dict(saved)
  declared = {name: dict(spec) for name, spec in (saved.pop("evals", None) or {}).items()}
  for key, value in legacy.items():
    kind, setting, old_default = _LEGACY_EVAL_KEYS[key]
    for spec in declared.values():
      if spec.get("type") == kind and spec.get(setting) in (None, 0):
        spec[setting] = value
    if not declared and value != old_default:
      from absl import logging  # pylint: disable=g-import-not-at-top
      logging.warning("the saved config sets eval.%s=%r, which no longer exists; its default "
                      "evaluators use the %s evaluator's own %s (%r). Declare the evaluator in "
                      "config.eval.evaluators to keep the old value.", key, value, kind,
                      setting, old_default)
  ev["evaluators"] = declared
  saved["eval"] = ev
  return saved


def _declared_defaults(saved: Mapping[str, Any]) -> dict[str, Any]:
  """The defaults of ``common.py`` for the sections ``saved`` has."""
  from contrastive_jax.configs import common  # pylint: disable=g-import-not-at-top
  out = common.base_config().to_dict()
  data, optim, clip = (saved.get(k) for k in ("data", "optim", "clip"))
  if isinstance(data, Mapping) and {"source", "recipe", "image_size"} <= set(data):
    out["data"] = common.data_config(data["source"], recipe=data["recipe"],
                                     image_size=data["image_size"]).to_dict()
  if isinstance(optim, Mapping) and {"name", "base_lr"} <= set(optim):
    out["optim"] = common.optim_config(optim["name"], base_lr=optim["base_lr"]).to_dict()
  if isinstance(clip, Mapping) and {"loss", "embed_dim"} <= set(clip):
    out["clip"] = common.clip_config(clip["loss"], embed_dim=clip["embed_dim"]).to_dict()
  return _tuples(out)


def _merge(defaults: Mapping[str, Any], saved: Mapping[str, Any]) -> dict[str, Any]:
  out = dict(defaults)
  for key, value in saved.items():
    if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
      out[key] = _merge(out[key], value)
    else:
      out[key] = value
  return out


def load_config(spec: str) -> ml_collections.ConfigDict:
  """``"configs/x.py[:arg]"`` -> ``get_config(arg)`` of that file (as ``--config`` does);
  ``configs/NAME.py`` finds the packaged config (``contrastive_jax.configs.resolve``)."""
  path, _, arg = resolve(spec).partition(":")
  if not os.path.isfile(path):
    raise ConfigError(f"config file {path!r} does not exist; pass --config=configs/<name>.py[:arg] "
                      f"with a name in {names()}, or the path of your own config file")
  name = "_config_" + os.path.splitext(os.path.basename(path))[0]
  module_spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {path!r} has no get_config(arg) function")
  return module.get_config(arg or None)


def parse_value(text: str) -> Any:
  """A command-line value: a Python literal (``0.1``, ``True``, ``(16, 32)``, ``None``) or text."""
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def set_value(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
  """Sets dotted ``key`` (e.g. ``"loss.temperature"``) in place; the key must already exist.

  Lists become tuples; an int given for a float setting is converted (ConfigDict's own type
  check rejects other mismatches, e.g. a string for a number).
  """
  *path, last = key.split(".")
  node = config
  for i, part in enumerate(path):
    if part not in node or not isinstance(node[part], (ml_collections.ConfigDict, dict)):
      raise ConfigError(f"config key {key!r}: {'.'.join(path[:i + 1])!r} is not a section of "
                        "the config; check the spelling against the config file")
    node = node[part]
  if last not in node:
    raise ConfigError(f"config key {key!r} does not exist (known in this section: "
                      f"{sorted(node.keys())}); check the spelling against the config file")
  value = _tuples(value)
  kind = node.get_type(last) if isinstance(node, ml_collections.ConfigDict) else type(node[last])
  if kind is float and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  with config.unlocked():  # a config from main.py's flags is locked against new keys only
    node[last] = value


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Sequence[str] | Mapping[str, Any]) -> ml_collections.ConfigDict:
  """Applies ``["a.b=1", ...]`` (values parsed by ``parse_value``) or ``{"a.b": 1}`` in place."""
  if isinstance(overrides, Mapping):
    items = list(overrides.items())
  else:
    items = []
    for text in overrides:
      key, sep, value = text.partition("=")
      if not sep or not key:
        raise ConfigError(f"override {text!r} must look like key=value, e.g. "
                          "loss.temperature=0.1")
      items.append((key.strip(), parse_value(value.strip())))
  for key, value in items:
    set_value(config, key, value)
  return config


def accept_none_overrides() -> None:
  """Lets ml_collections' ``--config.key=None`` set an int or float field to None.

  ml_collections parses an override with the field's type (``int`` for ``total_steps``, also
  when it is a typed placeholder), and its integer parser refuses "None"; optional settings
  (``total_steps``, ``optim.grad_clip_norm``, ``checkpoint.max_to_keep``) need it. Any other
  text still goes to the type's own parser.
  """
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  class NoneOr(flags.ArgumentParser):
    def __init__(self, inner: flags.ArgumentParser):
      self.inner = inner

    def parse(self, argument):
      if isinstance(argument, str) and argument.strip() in ("None", "none"):
        return None
      return self.inner.parse(argument)

    def flag_type(self):
      return self.inner.flag_type()

  for kind, inner in ((int, flags.IntegerParser()), (float, flags.FloatParser())):
    config_flags.register_flag_parser_for_type(kind, NoneOr(inner))

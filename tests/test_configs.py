"""The configs: packaged, every key settable from the command line, user errors without traceback.

Every leaf of every packaged config is overridden through the flag path that
``contrastive_jax.main`` uses (ml_collections ``config_flags`` with ``--config.key=value``, after
``configs.accept_none_overrides``), all at once, and each must take its new value. A key the
code reads with a default of its own instead of declaring it could not be set this way (the
NaN message once told users to set ``config.optim.grad_clip_norm``, which did not exist).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from contrastive_jax import configs, errors, runs, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _parse(argv: list[str]) -> ml_collections.ConfigDict:
  """``argv`` through main.py's flag path, on a fresh set of flags."""
  configs.accept_none_overrides()
  flag_values = flags.FlagValues()
  argv = configs.resolve_argv(argv)
  config_flags.DEFINE_config_file("config", None, "config", flag_values=flag_values,
                                  lock_config=True, sys_argv=argv)
  flag_values(argv)
  return flag_values.config


def _leaves(node: ml_collections.ConfigDict, prefix: str = ""):
  """``(dotted key, value, declared type)`` of every leaf; an empty section is a leaf."""
  for key in node.keys():
    value = node[key]
    if isinstance(value, ml_collections.ConfigDict) and value.keys():
      yield from _leaves(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value, node.get_type(key)


def _new_value(key, value, kind):
  """A value different from ``value`` with the declared type, and its command-line text."""
  if kind is bool:
    return (not value), str(not value).lower()
  if kind is int:
    new = 7 if value is None else value + 1
    return new, str(new)
  if kind is float:
    new = 0.25 if value is None else value * 2 + 0.5
    return new, repr(new)
  if kind is str:
    new = (value or "") + "_x"
    return new, new
  if kind is tuple:
    if value and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
      new = tuple(v + 1 for v in value)
    else:
      new = tuple(value) + ("x",)
    return new, repr(new)
  if isinstance(kind, type) and issubclass(kind, ml_collections.ConfigDict):
    return ml_collections.ConfigDict({"strength": 0.5}), "{'strength': 0.5}"
  raise AssertionError(f"config key {key} = {value!r} has type {kind.__name__}, which the "
                       "command line cannot set; declare it with a type (e.g. "
                       "ml_collections.config_dict.placeholder(float) for an optional number)")


@pytest.mark.parametrize("name", configs.names())
def test_every_key_is_settable_from_the_command_line(name):
  spec = f"configs/{name}.py"
  default = _parse(["prog", f"--config={spec}"])
  expected, argv = {}, ["prog", f"--config={spec}"]
  for key, value, kind in _leaves(default):
    expected[key], text = _new_value(key, value, kind)
    argv.append(f"--config.{key}={text}")
  assert len(expected) > 40, sorted(expected)
  config = _parse(argv)
  got = dict((key, value) for key, value, _ in _leaves(config))
  for key, want in expected.items():
    have = got[key] if key in got else config[key]  # a set empty section is a section now
    if isinstance(want, float):
      assert have == pytest.approx(want), key
    elif isinstance(want, ml_collections.ConfigDict):
      assert dict(have) == dict(want), key
    else:
      assert have == want and type(have) is type(want), (key, have, want)


def test_packaged_configs_load_by_every_spelling(tmp_path, monkeypatch):
  for spec in ("configs/simclr_mnist.py:quick", "contrastive_jax/configs/simclr_mnist.py:quick"):
    assert _parse(["prog", f"--config={spec}"]).total_steps == 4
  monkeypatch.chdir(tmp_path)  # an installed package run from elsewhere: no configs/ here
  assert _parse(["prog", "--config=configs/simclr_mnist.py:quick"]).total_steps == 4
  assert configs.load_config("configs/mocov3_mnist.py:quick").method == "mocov3"
  with pytest.raises(errors.ConfigError, match="does not exist.*simclr_mnist"):
    configs.load_config("configs/no_such_config.py")


def test_grad_clip_norm_from_the_command_line():
  config = _parse(["prog", "--config=configs/simclr_mnist.py:quick",
                   "--config.optim.grad_clip_norm=1.0"])
  assert config.optim.grad_clip_norm == 1.0
  assert "--config.optim.grad_clip_norm=1.0" in str(
      pytest.raises(train.NonFiniteLossError, train.check_finite, 3, {"loss": math.nan}).value)


def test_switch_from_steps_to_epochs_and_back_to_none():
  config = _parse(["prog", "--config=configs/simclr_mnist.py",
                   "--config.total_steps=None", "--config.total_epochs=2",
                   "--config.checkpoint.max_to_keep=None"])
  assert config.total_steps is None and config.total_epochs == 2.0
  assert config.checkpoint.max_to_keep is None
  assert runs.total_steps(config, num_train_examples=4000) == math.ceil(2 * 4000 / 256)
  # The same through the setter of the tools (sweep, evaluate --set).
  config = configs.apply_overrides(configs.load_config("configs/simclr_mnist.py"),
                                   ["total_steps=None", "total_epochs=2"])
  assert runs.total_steps(config, num_train_examples=4000) == math.ceil(2 * 4000 / 256)
  with pytest.raises(flags.IllegalFlagValueError):  # other text still needs a number
    _parse(["prog", "--config=configs/simclr_mnist.py", "--config.total_steps=many"])


def test_setter_refuses_unknown_keys():
  config = configs.load_config("configs/simclr_mnist.py:quick")
  configs.set_value(config, "loss.temperature", 1)
  assert config.loss.temperature == 1.0 and isinstance(config.loss.temperature, float)
  with pytest.raises(errors.ConfigError, match="los.temperature"):
    configs.set_value(config, "los.temperature", 0.1)
  with pytest.raises(errors.ConfigError, match="optim.grad_clip"):
    configs.apply_overrides(config, ["optim.grad_clip=1.0"])


def _run(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True,
                        timeout=300, env=dict(os.environ, PYTHONPATH=REPO))


def test_user_errors_print_the_message_alone(tmp_path):
  """A user's mistake ends with its message and status 2, not a traceback."""
  proc = _run("contrastive_jax.main", "--config=configs/simclr_mnist.py:quick",
              "--config.model.name=resnet1000", f"--workdir={tmp_path / 'run'}")
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "error: config.model.name='resnet1000' is unknown" in proc.stderr
  assert "Traceback" not in proc.stderr + proc.stdout
  proc = _run("contrastive_jax.evaluate", f"--workdir={tmp_path / 'nothing'}")
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "has no checkpoints/ directory" in proc.stderr
  assert "Traceback" not in proc.stderr + proc.stdout


def test_saved_config_of_an_older_run_gets_the_keys_declared_since():
  """A checkpoint's JSON config written before a key existed still rebuilds the run."""
  import json
  saved = json.loads(json.dumps(configs.load_config("configs/simclr_mnist.py:quick").to_dict()))
  del saved["optim"]["no_decay_patterns"], saved["checkpoint"]["preemption_check_every"]
  del saved["data"]["prefetch"]
  config = configs.config_from_json(saved)
  assert config.optim.no_decay_patterns == () and config.checkpoint.preemption_check_every == 10
  assert config.data.prefetch == 2
  assert config.model.kwargs.widths == (16, 16, 32, 32)  # lists come back as tuples
  assert config.data.augment.crop_area == (0.5, 1.0) and config.loss.temperature == 0.1

"""The run builder: from a config and a mesh, everything a run fixes before its first step.

``build_run(config, mesh)`` gives the method, the optimizer and its learning-rate schedule, the
number of steps, the abstract ``TrainState`` (``jax.ShapeDtypeStruct`` leaves carrying their
shardings), the batch sharding, the jitted initialiser and the jitted train step. It is the one
place where placement is decided (``sharding.py``'s rules from ``config.sharding``); the
trainer (``train.py``), ``restore.py``, the standalone evaluator and the benchmarks all build
their runs here, so a checkpoint, a resumed run and a benchmark see the same state layout.

It is also where the config is checked, before anything is read or compiled: ``check_config``
calls each module's own ``check_config`` (the run, checkpoint, losses, optim, data, model,
method and evaluator sections), and ``build_run`` calls it first.

Shape-first initialisation (big_vision's trainers): ``jax.eval_shape(method.init_state)`` gives
the state's shapes without computing anything, the shardings follow from shapes and paths, and
``jax.jit(init, out_shardings=...)`` materialises each device's shards in place, so no host ever
holds a full replica of an FSDP state. orbax restores into the same abstract state, so a
checkpoint moves between strategies and device counts (it stores global arrays).

The step is ``make_train_step`` (the method's ``value_and_grad``, the optimizer update, the
method's ``post_update``) jitted with the state's shardings in and out, the batch split over
``"data"``, the metrics replicated and the state donated: shardings are fixed, so it compiles
once per run.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from contrastive_jax import checkpoint, distributed, losses, methods, optim, sharding
from contrastive_jax.train_state import TrainState
from contrastive_jax.data import pipeline
from contrastive_jax.evaluate import runner as eval_runner
from contrastive_jax.errors import ConfigError, require
from contrastive_jax.models import registry


def check_config(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
  """Every section's own check, cheap (well under a second) and before any data is read or
  anything is compiled; a ``ConfigError`` naming the key and the fix. ``build_run`` calls it.

  The order matters only where one check reads keys another has checked: the model's reads
  the image size (data), building the method reads the batch and the run length."""
  _check_run(config, mesh)
  checkpoint.check_config(config)
  losses.check_config(config)
  optim.check_config(config)
  pipeline.check_config(config)
  registry.check_config(config)
  methods.check_config(config, mesh)
  eval_runner.check_config(config, mesh)


def _check_run(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
  """The run's own keys: the global batch (on this mesh), ``log_every``, the run length."""
  gb = config.global_batch
  require(isinstance(gb, int) and gb > 0, f"config.global_batch={gb!r} must be a positive integer")
  try:
    distributed.check_batch_divisible(gb, mesh, "config.global_batch")
  except ValueError as error:
    raise ConfigError(str(error)) from None
  require(isinstance(config.log_every, int) and config.log_every > 0,
          f"config.log_every={config.log_every!r} must be >= 1")
  total_steps(config, 1)  # exactly one of total_steps / total_epochs, positive


def total_steps(config: ml_collections.ConfigDict, num_train_examples: int | None) -> int:
  """``config.total_steps``, or ``config.total_epochs`` converted with the dataset size."""
  steps, epochs = config.total_steps, config.total_epochs
  if (steps is None) == (epochs is None):
    raise ConfigError("set exactly one of config.total_steps and config.total_epochs, the "
                      "other to None (e.g. --config.total_steps=None --config.total_epochs=100)")
  if steps is not None:
    if steps <= 0:
      raise ConfigError(f"config.total_steps={steps} must be positive")
    return int(steps)
  if epochs <= 0:
    raise ConfigError(f"config.total_epochs={epochs} must be positive")
  if not num_train_examples:
    raise ConfigError("config.total_epochs needs the dataset size; set config.total_steps")
  return max(1, int(math.ceil(epochs * num_train_examples / config.global_batch)))


def run_length(config: ml_collections.ConfigDict) -> int:
  """The run's optimizer steps. A run given in epochs reads the train split's size from the
  dataset's metadata (``pipeline.split_size``: tfds split info, the TFRecord shard index), so
  no host reads the data to count it."""
  num_train = None
  if config.total_epochs is not None:
    num_train = pipeline.split_size(config.data, config.data.train_split)
  return total_steps(config, num_train)


def make_mesh(config: ml_collections.ConfigDict) -> Mesh:
  """The ``("data",)`` mesh over ``config.num_devices`` devices (None: all)."""
  available = jax.device_count()
  if config.num_devices is not None and not 0 < config.num_devices <= available:
    raise ConfigError(f"config.num_devices={config.num_devices} but {available} devices are "
                      f"visible; use a number in 1..{available}, or None for all of them")
  return distributed.make_mesh(config.num_devices)


def make_train_step(method: methods.base.Method, tx: optax.GradientTransformation, lr_schedule,
                    skip_nonfinite: bool = False):
  """``step(state, batch) -> (state, metrics)``, pure; jitted by the caller. The method
  differentiates its own loss (``Method.value_and_grad``: autodiff or GradCache).

  With ``skip_nonfinite``, a step whose loss, gradients or updated parameters are not finite
  leaves every field but ``step`` unchanged (the data and the schedules still advance), reports
  its metrics as 0 and counts itself in ``metrics["nonfinite_skipped"]``.
  """

  def step(state: TrainState, batch: dict[str, jax.Array]):
    rng = jax.random.fold_in(state.rng, state.step)
    (loss, (metrics, updates)), grads = method.value_and_grad(state.params, state, batch, rng)
    param_updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, param_updates)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    new_state = method.post_update(new_state, updates)
    grad_norm = optax.global_norm(grads)
    param_norm = optax.global_norm(params)
    metrics = dict(metrics, loss=loss, learning_rate=lr_schedule(state.step),
                   grad_norm=grad_norm, param_norm=param_norm)
    if skip_nonfinite:
      # Finite gradients can still overflow the parameters (a huge learning rate): skip then too.
      ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(param_norm)
      keep = state.replace(step=new_state.step, rng=None)
      merged = jax.tree.map(lambda new, old: jnp.where(ok, new, old),
                            new_state.replace(rng=None), keep)
      new_state = merged.replace(rng=new_state.rng)  # the key never changes within a step
      metrics = {k: jnp.where(ok, v, jnp.zeros_like(v)) for k, v in metrics.items()}
      metrics["nonfinite_skipped"] = 1.0 - ok.astype(jnp.float32)
    return new_state, metrics

  return step


@dataclasses.dataclass(frozen=True)
class Run:
  """A run's fixed parts. ``abstract_state`` leaves are ``ShapeDtypeStruct`` with ``.sharding``
  (the argument orbax restores into); ``state_sharding`` is the same tree of ``NamedSharding``.
  """
  config: ml_collections.ConfigDict
  mesh: Mesh
  method: Any
  tx: optax.GradientTransformation
  lr_schedule: Any
  num_steps: int
  abstract_state: Any
  state_sharding: Any
  batch_sharding: NamedSharding

  @property
  def init_fn(self):
    """``rng -> TrainState`` (pure; jit it with ``state_sharding``, as ``init_state`` does)."""
    return functools.partial(self.method.init_state, tx=self.tx)

  def init_state(self, seed: int | None = None):
    """The step-0 state, each device computing only its own shards."""
    seed = self.config.seed if seed is None else seed
    return jax.jit(self.init_fn, out_shardings=self.state_sharding)(jax.random.key(seed))

  @functools.cached_property
  def train_step(self):
    """``jit(step)(state, batch) -> (state, metrics)``: state donated, shardings fixed."""
    step = make_train_step(self.method, self.tx, self.lr_schedule,
                           skip_nonfinite=self.config.skip_nonfinite)
    # FSDP: the models pin their activations' batch dimension to "data" (sharding.py).
    step = sharding.traced_under(step, sharding.activation_mesh(self.config.sharding, self.mesh))
    return jax.jit(step, donate_argnums=(0,),
                   in_shardings=(self.state_sharding, self.batch_sharding),
                   out_shardings=(self.state_sharding, distributed.replicated(self.mesh)))

  def abstract_batch(self, global_batch: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch's shapes as the input pipeline yields them, with the batch sharding
    (for compile-only use: ``run.train_step.lower(run.abstract_state, batch).compile()``)."""
    b = int(global_batch or self.config.global_batch)
    s = int(self.config.data.image_size)
    f32, i32 = np.float32, np.int32
    if self.method.input_mode == "views":
      shapes = {"view1": ((b, s, s, 3), f32), "view2": ((b, s, s, 3), f32)}
    else:
      shapes = {"image": ((b, s, s, 3), f32),
                "tokens": ((b, int(self.config.data.context_length)), i32)}
    return {k: jax.ShapeDtypeStruct(shape, dt, sharding=self.batch_sharding)
            for k, (shape, dt) in shapes.items()}

  @property
  def num_params(self) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.abstract_state.params))

  @property
  def state_bytes_per_device(self) -> int:
    """Bytes of the train state one device holds (the largest shard of each leaf)."""
    return sharding.bytes_per_device(self.abstract_state, self.state_sharding)


def build_run(config: ml_collections.ConfigDict, mesh: Mesh | None = None, *,
              num_steps: int | None = None, check: bool = True) -> Run:
  """Everything a run fixes before its first step; see the module docstring.

  Args:
    config: the run's config (``config.sharding`` chooses the placement; absent: replicated).
    mesh: default ``make_mesh(config)``.
    num_steps: the run length when already known (otherwise ``run_length(config)``, which
      reads the dataset size for runs given in epochs); it shapes the schedules, not the state.
    check: run ``check_config`` first. ``restore.py`` passes False: restoring a state needs
      none of the training checks, and a checkpoint restores onto any mesh, also one that
      does not divide the global batch it trained with.
  """
  mesh = make_mesh(config) if mesh is None else mesh
  if check:
    check_config(config, mesh)
  sharding.resolve_rules(config.sharding, mesh)  # bad rules fail before any tracing
  method = methods.build_method(config, mesh)
  num_steps = run_length(config) if num_steps is None else int(num_steps)
  tx, lr_schedule = optim.build_optimizer(config.optim, global_batch=config.global_batch,
                                          total_steps=num_steps)
  shapes = jax.eval_shape(functools.partial(method.init_state, tx=tx),
                          jax.random.key(config.seed))
  state_sharding = sharding.state_shardings(shapes, config.sharding, mesh)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          shapes, state_sharding)
  return Run(config=config, mesh=mesh, method=method, tx=tx, lr_schedule=lr_schedule,
             num_steps=num_steps, abstract_state=abstract, state_sharding=state_sharding,
             batch_sharding=distributed.data_sharding(mesh))

"""Optimizers and learning-rate schedules of the contrastive recipes, built from one config.

* LARS (You, Gitman & Ginsburg 2017, "Large Batch Training of Convolutional Networks", Eq. 6)
  in the form of SimCLR's ``lars_optimizer.py`` (Chen et al. 2020, Sec. B.1): per leaf,
  ``g <- g + wd * w``; ``g <- g * eta * ||w|| / ||g||`` (the trust ratio, 1 when either norm
  is 0); ``v <- m * v + lr_t * g``; ``w <- w - v``. The momentum accumulates the
  lr-scaled step, so warmup and cosine decay act through the buffer as in SimCLR.
  ``optax.lars`` chains ``add_decayed_weights -> scale_by_trust_ratio -> scale_by_learning_rate
  -> trace``, which is exactly this order (checked against a numpy hand computation in
  tests/test_optim.py); we use it with our masks.
* SGD with momentum (MoCo v2, as PyTorch's ``SGD``): ``v <- m * v + (g + wd * w)``,
  ``w <- w - lr_t * v``.
* AdamW (Loshchilov & Hutter 2019; PyTorch semantics as used by MoCo v3 and CLIP): the decay
  ``lr_t * wd * w`` is decoupled from the Adam moments.

Which leaves are decayed (``weight_decay_mask``; the same mask selects LARS's trust-ratio
adaptation): a leaf is *excluded* when

1. it has ``ndim <= 1`` (biases, BN/LN/GN scales and offsets, scalar logit scale/bias), or
2. its path (keys joined with "/", lower-cased) contains one of ``NO_DECAY_SUBSTRINGS``:
   "bias", "scale", "batchnorm", "layernorm", "groupnorm" (normalisation and gain
   parameters), "pos_embed", "posemb", "positional_embedding", "token_embed", "cls_token",
   "class_token" (positional/token/class embeddings), "temperature", "logit_scale",
   "logit_bias" (the learned contrastive temperature of CLIP/SigLIP), or
3. its own (last) key is ``"embedding"``, the table of ``flax.linen.Embed``. Only the last key
   is matched here, so a patch-embedding convolution named "embedding" (big_vision's ViT)
   keeps its kernel decayed, as in MoCo v3 and timm.

``optim_config.no_decay_patterns`` (tuple of substrings) adds patterns to rule 2.

Freezing: paths containing any of ``optim_config.frozen_patterns`` (e.g. "patch_embed" for
MoCo v3's frozen random patch projection) get zero updates through ``optax.multi_transform``
with ``optax.set_to_zero``; they have no optimizer state and are excluded from gradient
clipping. A pattern that matches no parameter raises a ValueError at ``tx.init``.

Moment precision: ``optim_config.mu_dtype`` ("bfloat16", or None for the parameters' float32)
stores the first moment in that dtype: AdamW's ``mu`` (``optax.adamw(mu_dtype=...)``; the second
moment ``nu`` stays float32, where bf16's 8-bit mantissa would distort ``1 / sqrt(nu)``) and the
momentum buffer of SGD and LARS (``optax.trace(accumulator_dtype=...)``). Updates are computed
in float32 and only the stored buffer is rounded; parameters stay float32. It saves 2 bytes per
parameter (AdamW: 12 -> 10 bytes of parameters + moments; SGD/LARS: 8 -> 6).

Learning rate: peak ``= base_lr * global_batch / 256`` ("linear"), ``base_lr * sqrt(global_batch)``
("sqrt", SimCLR's 0.075 * sqrt(B)) or ``base_lr`` ("none"); linear warmup from 0 at step 0 to
the peak at ``warmup_steps``, then cosine (Loshchilov & Hutter 2017, no restarts) to
``end_lr_fraction * peak`` at ``total_steps``, or constant.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from contrastive_jax.errors import ConfigError, require, require_one_of

PyTree = Any
Schedule = Callable[[Any], jax.Array]

NO_DECAY_SUBSTRINGS = (
    "bias", "scale", "batchnorm", "layernorm", "groupnorm",
    "pos_embed", "posemb", "positional_embedding", "token_embed", "cls_token", "class_token",
    "temperature", "logit_scale", "logit_bias",
)
NO_DECAY_LEAF_NAMES = ("embedding",)

NAMES = ("lars", "sgd", "adamw")
SCALINGS = ("linear", "sqrt", "none")
SCHEDULES = ("cosine", "constant")
MU_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _key_name(entry: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def path_to_str(path: Sequence[Any]) -> str:
  """A ``jax.tree_util`` key path as ``"encoder/Dense_0/kernel"``."""
  return "/".join(_key_name(p) for p in path)


def is_decayed(path: str, ndim: int, extra_patterns: Sequence[str] = ()) -> bool:
  """Whether a leaf at ``path`` (see ``path_to_str``) with ``ndim`` dims gets weight decay."""
  if ndim <= 1:
    return False
  lowered = path.lower()
  if any(s.lower() in lowered for s in (*NO_DECAY_SUBSTRINGS, *extra_patterns)):
    return False
  return lowered.rsplit("/", 1)[-1] not in NO_DECAY_LEAF_NAMES


def weight_decay_mask(params: PyTree, extra_patterns: Sequence[str] = ()) -> PyTree:
  """A tree of bools, True where weight decay (and LARS adaptation) applies. See module doc."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: is_decayed(path_to_str(path), jnp.ndim(x), extra_patterns), params)


def resolve_warmup_steps(optim_config: Any, total_steps: int) -> int:
  """The one place that turns ``warmup_steps`` or ``warmup_fraction`` into a step count."""
  steps, fraction = optim_config.warmup_steps, optim_config.warmup_fraction
  # A zero in either field means "unset", so a base config may default both to 0.
  steps = steps or None
  fraction = fraction or None
  if steps is not None and fraction is not None:
    raise ValueError(
        f"optim.warmup_steps={steps} and optim.warmup_fraction={fraction} are both set; "
        "set one of them and leave the other None or 0")
  if fraction is not None:
    if not 0.0 <= fraction < 1.0:
      raise ValueError(f"optim.warmup_fraction={fraction} must lie in [0, 1)")
    steps = int(round(fraction * total_steps))
  steps = int(steps or 0)
  if steps < 0 or (steps and steps >= total_steps):
    raise ValueError(
        f"warmup of {steps} steps must be non-negative and shorter than total_steps="
        f"{total_steps}; lower optim.warmup_steps/warmup_fraction or train longer")
  return steps


def check_config(config: Any) -> None:
  """``config.optim``'s names, learning rate, weight decay and warmup; a ``ConfigError``
  naming the key. The warmup is checked without the run length here; the schedule checks it
  against ``total_steps`` when the run builder builds the optimizer."""
  c = config.optim
  require_one_of("optim.name", c.name, NAMES)
  require_one_of("optim.lr_scaling", c.lr_scaling, SCALINGS)
  require_one_of("optim.schedule", c.schedule, SCHEDULES)
  require(float(c.base_lr) > 0, f"config.optim.base_lr={c.base_lr} must be positive")
  require(float(c.weight_decay) >= 0, f"config.optim.weight_decay={c.weight_decay} must be >= 0")
  try:
    resolve_warmup_steps(c, 2**31)
  except ValueError as error:
    raise ConfigError(str(error)) from None


def peak_learning_rate(optim_config: Any, global_batch: int) -> float:
  """``base_lr`` scaled by the global batch as ``optim_config.lr_scaling`` says."""
  base_lr = float(optim_config.base_lr)
  scaling = optim_config.lr_scaling
  if global_batch <= 0:
    raise ValueError(f"global_batch={global_batch} must be positive")
  if scaling == "linear":
    return base_lr * global_batch / 256.0
  if scaling == "sqrt":
    return base_lr * math.sqrt(global_batch)
  if scaling == "none":
    return base_lr
  raise ValueError(f"optim.lr_scaling={scaling!r} is not one of {SCALINGS}")


def learning_rate_schedule(optim_config: Any, *, global_batch: int,
                           total_steps: int) -> Schedule:
  """``step -> lr`` ([] float32): linear warmup from 0, then cosine to the end value or constant."""
  if total_steps <= 0:
    raise ValueError(f"total_steps={total_steps} must be positive")
  peak = peak_learning_rate(optim_config, global_batch)
  warmup = resolve_warmup_steps(optim_config, total_steps)
  kind = optim_config.schedule
  if kind not in SCHEDULES:
    raise ValueError(f"optim.schedule={kind!r} is not one of {SCHEDULES}")
  end = float(optim_config.end_lr_fraction) * peak
  decay_steps = max(total_steps - warmup, 1)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = peak * step / max(warmup, 1)
    if kind == "cosine":
      progress = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
      after = end + (peak - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    else:
      after = jnp.full_like(step, peak)
    return jnp.where(step < warmup, warm, after)

  return schedule


def _frozen_labels(patterns: Sequence[str]) -> Callable[[PyTree], PyTree]:
  def labels(params):
    paths = [path_to_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    unmatched = [pat for pat in patterns if not any(pat in p for p in paths)]
    if unmatched:
      raise ValueError(
          f"optim.frozen_patterns {unmatched} match no parameter path; fix the substrings "
          f"(paths look like {paths[:3]})")
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "frozen" if any(pat in path_to_str(path) for pat in patterns)
        else "train", params)
  return labels


def build_optimizer(optim_config: Any, *, global_batch: int,
                    total_steps: int) -> tuple[optax.GradientTransformation, Schedule]:
  """The optax transformation and its learning-rate schedule from ``optim_config``.

  Args:
    optim_config: a ConfigDict with ``name`` ("lars" | "sgd" | "adamw"), ``base_lr``,
      ``lr_scaling`` ("linear" | "sqrt" | "none"), ``warmup_steps`` or ``warmup_fraction``,
      ``schedule`` ("cosine" | "constant"), ``end_lr_fraction`` (0), ``weight_decay`` (0),
      ``momentum`` (0.9), ``nesterov`` (False), ``lars_eta`` (1e-3), ``b1`` (0.9),
      ``b2`` (0.999), ``eps`` (1e-8), ``grad_clip_norm`` (None), ``frozen_patterns`` (()),
      ``no_decay_patterns`` (()), ``mu_dtype`` (None: float32; or "bfloat16"):
      ``configs.common.optim_config`` declares them all with these defaults.
    global_batch: the global batch size (for lr scaling).
    total_steps: optimizer steps of the whole run.

  Returns:
    ``(tx, schedule)``; ``schedule(step)`` is the learning rate used at update ``step``
    (0-based), for logging.
  """
  name = optim_config.name
  if name not in NAMES:
    raise ValueError(f"optim.name={name!r} is not one of {NAMES}")
  schedule = learning_rate_schedule(optim_config, global_batch=global_batch,
                                    total_steps=total_steps)
  weight_decay = float(optim_config.weight_decay)
  momentum = float(optim_config.momentum)
  nesterov = bool(optim_config.nesterov)
  extra = tuple(optim_config.no_decay_patterns)
  mu_name = optim_config.mu_dtype
  if mu_name is not None and mu_name not in MU_DTYPES:
    raise ValueError(f"optim.mu_dtype={mu_name!r} is not one of {sorted(MU_DTYPES)} (or None)")
  mu_dtype = None if mu_name is None else MU_DTYPES[mu_name]

  def mask(params):
    return weight_decay_mask(params, extra)

  if name == "lars":
    # optax.lars's own chain (see the module docstring), spelled out for the trace's dtype.
    tx = optax.chain(
        optax.add_decayed_weights(weight_decay, mask=mask),
        optax.masked(optax.scale_by_trust_ratio(
            trust_coefficient=float(optim_config.lars_eta), eps=0.0), mask),
        optax.scale_by_learning_rate(schedule),
        optax.trace(decay=momentum, nesterov=nesterov, accumulator_dtype=mu_dtype))
  elif name == "sgd":
    tx = optax.chain(
        optax.add_decayed_weights(weight_decay, mask=mask),
        optax.trace(decay=momentum, nesterov=nesterov, accumulator_dtype=mu_dtype),
        optax.scale_by_learning_rate(schedule))
  else:
    tx = optax.adamw(schedule, b1=float(optim_config.b1), b2=float(optim_config.b2),
                     eps=float(optim_config.eps),
                     weight_decay=weight_decay, mask=mask, mu_dtype=mu_dtype)

  clip = optim_config.grad_clip_norm
  if clip is not None:
    if clip <= 0:
      raise ValueError(f"optim.grad_clip_norm={clip} must be positive (or None to disable)")
    tx = optax.chain(optax.clip_by_global_norm(float(clip)), tx)

  frozen = tuple(optim_config.frozen_patterns)
  if frozen:
    tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()},
                               _frozen_labels(frozen))
  return tx, schedule

"""Where each leaf of the train state lives on the mesh: replicated, or split on "data" (FSDP).

Two strategies, chosen by ``config.sharding.strategy``:

* ``"replicated"``: every leaf on every device (plain data parallelism). Memory per device is
  the whole state: parameters, optimizer moments, EMA encoder, MoCo queue.
* ``"fsdp"``: fully sharded data parallelism, the parameter/optimizer-state partitioning of
  ZeRO stage 3 (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training
  Trillion Parameter Models", Sec. 5.1-5.3) as big_vision's ``fsdp`` rule expresses it for
  XLA: each large leaf is split along one of its dimensions over the ``"data"`` axis, the same
  axis that splits the batch. Under ``jit`` XLA's SPMD partitioner inserts the all-gather of a
  parameter before its use and turns its gradient's all-reduce into a reduce-scatter, so the
  step's code does not change; the contrastive losses keep their ``shard_map`` over
  ``"data"`` unchanged (their inputs are activations, sharded on the batch as before).

Which dimension: the largest one divisible by the axis size N (ties: the last, e.g. a Dense
kernel's output features). A leaf is replicated when it has fewer than ``min_size`` elements
(biases, norm gains, scalars: gathering them costs a collective each and saves nothing). The rule
is a function of the leaf's path and shape only, so a parameter, its optimizer moments (same
shape, any dtype) and its EMA copy always get the same placement.

When no dimension is divisible by N (ViT-bigG's width 1,664 = 2^7 x 13 and its qkv width
4,992 on a 256-chip slice: 5.98 of its 28.4 GiB of state stayed whole on every chip), the leaf is
split k ways along one dimension, k the largest divisor of N that divides one of its dimensions
(1,664 and 4,992 on 256 chips: 128), over a factored view of the same devices: the devices of
``"data"`` in their ring order reshaped to ``[N / k, k]`` (axes ``"data_replica"``,
``"data_shard"``), so each shard is held by N / k chips. A leaf is replicated only when no
dimension shares a factor with N. ``fsdp_split`` gives the ways per dimension. Why this and not
the alternatives:

* uneven shards (ceil(d / N) rows per device): jax 0.10's ``NamedSharding`` refuses a dimension
  that the tiling does not divide (``IndivisibleError``) for arrays that live between steps, so
  the train state cannot be stored that way;
* padding the parameter to a multiple of N changes the model (a padded attention width, a
  padded vocabulary) unless every use masks the padding, and changes checkpoints and converters;
* splitting two dimensions (1,664 / 2 x 4,992 / 128 = all 256 chips) needs a view too and
  puts a Dense kernel's contracting dimension on the devices; it is not what big_vision's or
  ZeRO's FSDP does, and it measured no better (docs/largest_runs.md);
* a second axis on the run's mesh would change the batch axis that losses, input pipeline and
  evaluators share. The view changes nothing for them: it is the same devices in the same
  order, so XLA sees one device assignment. Only leaves that need it use the view; a leaf with
  a dimension divisible by N keeps ``P(..., "data")`` on the run's mesh (checkpoints unchanged).

Holding 1/k instead of 1/N of such leaves costs little: for bigG on 256 chips, 47 MiB per chip
instead of 24. ``config.sharding.view=False`` turns the view off (such leaves stay whole on every
chip): libtpu 0.0.42 cannot compile bigG's step on a v5e:16x16 with it (an all-reduce over
128-chip halves of the ring fails with "Failed to create limited ICI routing replica info
table"; docs/largest_runs.md), so ``configs/clip_vit_bigg14.py`` sets it.

Activations (``activation_mesh``, ``traced_under``): under ``"fsdp"`` on more than one device
the step is traced under the run mesh's abstract mesh, and the models pin the batch dimension
of each transformer block's activations to ``"data"`` (``models.layers.shard_batch``), so the
partitioner gathers the weights, not the activations (docs/largest_runs.md has the bigG
figures). A replicated run traces without a mesh and its program does not change.

Rules (``config.sharding.rules``) override the strategy for matching leaves: a sequence of
``(regex, action)`` pairs, the first whose regex ``re.search``-es the leaf's path wins (as in
big_vision's ``sharding_rules``). Paths are the ``TrainState`` field then the tree keys, joined
by "/": ``params/image_encoder/block3/mlp/fc1/kernel``, ``opt_state/0/mu/image_encoder/...``,
``ema_params/encoder/...``, ``queue``. An unanchored pattern such as ``"mlp/fc1/kernel"`` thus
applies to a parameter, its moments and its EMA alike. Actions: ``"fsdp"`` (the rule above,
with ``min_size``), ``"replicate"``, or an explicit partition spec as a tuple of mesh-axis names
or ``None`` per dimension, e.g. ``(None, "data")``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from contrastive_jax.distributed import DATA_AXIS

STRATEGIES = ("replicated", "fsdp")
# Axes of the factored device view for leaves no dimension of which N divides (module docstring).
VIEW_AXES = ("data_replica", "data_shard")
ACTIONS = ("fsdp", "replicate")
# 16Ki elements (64 KiB in float32): below this a leaf is replicated under "fsdp". In a ViT-B
# that leaves only biases and LayerNorm gains (<0.1% of the parameters) whole on each device.
DEFAULT_MIN_SIZE = 2 ** 14


def _get(config: Any, key: str, default: Any) -> Any:
  if config is None:
    return default
  value = config.get(key, None) if hasattr(config, "get") else getattr(config, key, None)
  return default if value is None else value


def path_str(path: Sequence[Any]) -> str:
  """A ``jax.tree_util`` key path as ``"params/encoder/Dense_0/kernel"``."""
  return jax.tree_util.keystr(tuple(path), simple=True, separator="/")


def fsdp_spec(shape: Sequence[int], axis_size: int, axis_name: str = DATA_AXIS) -> P:
  """Splits the largest dimension of ``shape`` divisible by ``axis_size`` (ties: the last);
  ``P()`` (replicated) when none is."""
  best = None
  for dim, size in enumerate(shape):
    if size % axis_size == 0 and size >= axis_size and (best is None or size >= shape[best]):
      best = dim
  if best is None:
    return P()
  return P(*([None] * best), axis_name)


def _check_action(action: Any, where: str, mesh: Mesh) -> Any:
  if isinstance(action, str):
    if action not in ACTIONS:
      raise ValueError(f"{where}: action {action!r} is unknown; use 'fsdp', 'replicate' or a "
                       f"tuple of mesh axis names / None per dimension, e.g. (None, 'data')")
    return action
  if isinstance(action, P):
    action = tuple(action)
  if not isinstance(action, (tuple, list)):
    raise ValueError(f"{where}: action {action!r} must be 'fsdp', 'replicate' or a tuple such "
                     "as (None, 'data')")
  for entry in action:
    names = entry if isinstance(entry, (tuple, list)) else (entry,)
    for name in names:
      if name is not None and name not in mesh.axis_names:
        raise ValueError(f"{where}: mesh axis {name!r} does not exist; the mesh has axes "
                         f"{mesh.axis_names}")
  return P(*[tuple(e) if isinstance(e, list) else e for e in action])


def use_view(sharding_config: Any) -> bool:
  """``config.sharding.view`` (default True): split leaves N does not divide over the view."""
  view = _get(sharding_config, "view", True)
  if not isinstance(view, (bool, np.bool_)):
    raise ValueError(f"config.sharding.view={view!r} must be True or False")
  return bool(view)


def resolve_rules(sharding_config: Any, mesh: Mesh) -> tuple[list[tuple[re.Pattern, Any]], int]:
  """``(rules, min_size)`` from ``config.sharding``; the strategy's catch-all rule comes last.

  Raises a ``ValueError`` naming the key and the fix for an unknown strategy, a bad regex or
  action, before anything is traced.
  """
  strategy = _get(sharding_config, "strategy", "replicated")
  if strategy not in STRATEGIES:
    raise ValueError(f"config.sharding.strategy={strategy!r} is unknown; use one of "
                     f"{STRATEGIES}")
  use_view(sharding_config)
  min_size = _get(sharding_config, "min_size", DEFAULT_MIN_SIZE)
  if not isinstance(min_size, (int, np.integer)) or min_size < 0:
    raise ValueError(f"config.sharding.min_size={min_size!r} must be an integer >= 0 "
                     f"(elements; default {DEFAULT_MIN_SIZE})")
  rules = []
  for i, rule in enumerate(_get(sharding_config, "rules", ()) or ()):
    where = f"config.sharding.rules[{i}]={rule!r}"
    if not isinstance(rule, (tuple, list)) or len(rule) != 2 or not isinstance(rule[0], str):
      raise ValueError(f"{where} must be a (regex, action) pair, e.g. ('queue', 'replicate')")
    try:
      pattern = re.compile(rule[0])
    except re.error as e:
      raise ValueError(f"{where}: invalid regex ({e})") from None
    rules.append((pattern, _check_action(rule[1], where, mesh)))
  rules.append((re.compile(""), "fsdp" if strategy == "fsdp" else "replicate"))
  return rules, int(min_size)


@functools.lru_cache(maxsize=None)
def _divisors(n: int) -> tuple[int, ...]:
  return tuple(d for d in range(1, n + 1) if n % d == 0)


def fsdp_split(shape: Sequence[int], axis_size: int) -> tuple[int, ...]:
  """Ways each dimension of ``shape`` is split by the ``"fsdp"`` rule over ``axis_size`` devices:
  one dimension, by the largest divisor of ``axis_size`` that divides it (ties: the larger
  dimension, then the last, as ``fsdp_spec``); all ones when nothing shares a factor."""
  best, best_key = (1,) * len(shape), (1,)
  for i, size in enumerate(shape):
    for ways in _divisors(int(axis_size)):
      key = (ways, size, i)
      if ways > 1 and size % ways == 0 and key > best_key:
        best, best_key = tuple(ways if d == i else 1 for d in range(len(shape))), key
  return best


def fsdp_sharding(shape: Sequence[int], mesh: Mesh, axis_name: str = DATA_AXIS,
                  view: bool = True) -> NamedSharding:
  """The ``"fsdp"`` placement of a leaf of ``shape`` (module docstring; no ``min_size``).

  A split over all N devices is ``P(..., axis_name)`` on ``mesh``; a k-way split is a
  ``NamedSharding`` on the view ``[N / k, k]`` of the same devices (``VIEW_AXES``). On a mesh
  with other axes than ``axis_name``, or with ``view=False``, only the N-way rule applies
  (``fsdp_spec``: a leaf no dimension of which N divides stays whole).
  """
  n = mesh.shape[axis_name]
  if tuple(mesh.axis_names) != (axis_name,) or not view:
    return NamedSharding(mesh, fsdp_spec(shape, n, axis_name))
  ways = fsdp_split(shape, n)
  k = max(ways, default=1)
  if k == 1:
    return NamedSharding(mesh, P())
  dim = ways.index(k)
  if k == n:
    return NamedSharding(mesh, P(*([None] * dim), axis_name))
  # Replicas outermost: the k shards of one replica are consecutive in ring order.
  view = Mesh(mesh.devices.reshape(n // k, k), VIEW_AXES, axis_types=(AxisType.Auto,) * 2)
  return NamedSharding(view, P(*([None] * dim), VIEW_AXES[1]))


def leaf_sharding(path: str, shape: Sequence[int], rules: Sequence[tuple[re.Pattern, Any]],
                  mesh: Mesh, min_size: int, axis_name: str = DATA_AXIS,
                  view: bool = True) -> NamedSharding:
  """The ``NamedSharding`` of one leaf: the first rule whose regex matches ``path``."""
  for pattern, action in rules:
    if pattern.search(path):
      break
  if action == "replicate" or not shape:
    return NamedSharding(mesh, P())
  if action == "fsdp":
    if int(np.prod(shape)) < min_size:
      return NamedSharding(mesh, P())
    return fsdp_sharding(shape, mesh, axis_name, view)
  spec = tuple(action)
  if len(spec) > len(shape):
    raise ValueError(f"sharding rule {pattern.pattern!r} -> {action} has {len(spec)} entries but "
                     f"{path} has shape {tuple(shape)}; narrow the regex or shorten the spec")
  for dim, entry in enumerate(spec):
    names = entry if isinstance(entry, tuple) else (() if entry is None else (entry,))
    split = int(np.prod([mesh.shape[n] for n in names])) if names else 1
    if shape[dim] % split:
      raise ValueError(f"sharding rule {pattern.pattern!r} -> {action}: dimension {dim} of "
                       f"{path} (shape {tuple(shape)}) is not divisible by {split} devices")
  return NamedSharding(mesh, action)


def leaf_spec(path: str, shape: Sequence[int], rules: Sequence[tuple[re.Pattern, Any]],
              mesh: Mesh, min_size: int, axis_name: str = DATA_AXIS) -> P:
  """The ``PartitionSpec`` of ``leaf_sharding``: over ``VIEW_AXES`` for a factored split."""
  return leaf_sharding(path, shape, rules, mesh, min_size, axis_name).spec


def state_specs(abstract_state: Any, sharding_config: Any, mesh: Mesh) -> Any:
  """A tree of ``PartitionSpec`` like ``abstract_state`` (arrays or ``ShapeDtypeStruct``); a
  spec over ``VIEW_AXES`` refers to the factored view (``state_shardings`` carries its mesh)."""
  return jax.tree.map(lambda s: s.spec, state_shardings(abstract_state, sharding_config, mesh),
                      is_leaf=lambda x: isinstance(x, NamedSharding))


def state_shardings(abstract_state: Any, sharding_config: Any, mesh: Mesh) -> Any:
  """A tree of ``NamedSharding`` like ``abstract_state``."""
  rules, min_size = resolve_rules(sharding_config, mesh)
  view = use_view(sharding_config)
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: leaf_sharding(path_str(path), tuple(np.shape(leaf)), rules, mesh,
                                       min_size, view=view),
      abstract_state)


def bytes_per_device(abstract_state: Any, shardings: Any) -> int:
  """Bytes of ``abstract_state`` held by one device under ``shardings`` (largest shard)."""
  total = 0
  for leaf, sharding in zip(jax.tree.leaves(abstract_state), jax.tree.leaves(shardings)):
    shard = sharding.shard_shape(tuple(leaf.shape))
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      itemsize = 8  # a threefry key: two uint32 words
    else:
      itemsize = np.dtype(leaf.dtype).itemsize
    total += int(np.prod(shard)) * itemsize
  return total


def activation_mesh(sharding_config: Any, mesh: Mesh) -> Mesh | None:
  """The mesh to trace the step under so that the models pin their activations to the batch
  axis (module docstring): ``mesh`` for ``"fsdp"`` on more than one device, else ``None``."""
  strategy = _get(sharding_config, "strategy", "replicated")
  if strategy != "fsdp" or mesh.size == 1 or DATA_AXIS not in mesh.axis_names:
    return None
  return mesh


def traced_under(fn: Any, mesh: Mesh | None) -> Any:
  """``fn`` traced under ``mesh``'s abstract mesh (``jax.sharding.use_abstract_mesh``), the
  context ``models.layers.shard_batch`` reads; ``fn`` itself when ``mesh`` is None. Entered
  inside the function, so it holds wherever ``jax.jit`` traces it (first call or ``lower``)."""
  if mesh is None:
    return fn

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args, **kwargs)
  return wrapped

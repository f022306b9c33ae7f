"""Weights sources read without a host replica: converted files and run directories.

A source is opened by its index alone (the safetensors header, the orbax checkpoint's
metadata), so shapes are checked before any tensor is read; then

* ``read_sharded``: each tensor straight into a target sharding, every host reading only its
  devices' shards (``config.init_from``, the zero-shot command). A converted file is read with
  ``jax.make_array_from_callback`` and ``tensor_io.read_slice`` (safetensors stores each tensor
  C-ordered at a known offset: https://huggingface.co/docs/safetensors, "Format"); a run
  directory with orbax's partial restore (``PyTreeRestore(partial_restore=True)``), which reads
  only the named leaves (never the optimizer moments, EMA copies or queue).
* ``read_host``: whole tensors on one host, a few at a time (``group_bytes``), for tools that
  write files: ``export_to_peer`` streams a run's parameters (FSDP-sharded or not: a checkpoint
  stores global arrays) into a peer's safetensors layout, tensor by tensor, never holding the
  whole tree.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Mapping, Sequence

import jax
import numpy as np
from etils import epath

from contrastive_jax.convert import core, mappings, tensor_io

COLLECTIONS = ("params", "batch_stats")


@dataclasses.dataclass(frozen=True)
class Source:
  """An ``init_from`` source, opened without reading its tensors.

  Attributes:
    path: what the user gave (file or run directory).
    kind: ``"converted"`` (a converted safetensors file) or ``"run"`` (a run's checkpoint).
    tensors: flat source path (``params/...``, ``batch_stats/...``) -> ``ShapeDtypeStruct``.
    location: the safetensors file, or the checkpoint step's ``state`` directory.
    metadata: the converted file's metadata (``core.SPEC_KEY``: its architecture); ``{}`` for
      a run.
    header: ``tensor_io.read_safetensors_header`` of a converted file, else None.
  """
  path: str
  kind: str
  tensors: dict[str, jax.ShapeDtypeStruct]
  location: epath.Path
  metadata: dict[str, str]
  header: tuple | None = None

  @property
  def spec(self) -> dict:
    """The architecture a converted file records (``core.SPEC_KEY``)."""
    if core.SPEC_KEY not in self.metadata:
      raise ValueError(f"{self.path} records no architecture (it is a run directory, or not a "
                       "converted file)")
    return json.loads(self.metadata[core.SPEC_KEY])


def newest_step_directory(path: str | epath.Path) -> epath.Path:
  """The ``state`` item directory of the newest checkpoint step of a run directory."""
  p = epath.Path(path)
  ckpt_dir = p / "checkpoints" if (p / "checkpoints").is_dir() else p
  steps = sorted(int(d.name) for d in ckpt_dir.iterdir() if d.name.isdigit())
  if not steps:
    raise ValueError(f"{path}: no checkpoint steps under {ckpt_dir}; pass a run directory "
                     "that has saved a checkpoint, or a converted .safetensors file")
  return ckpt_dir / str(steps[-1]) / "state"


def open_source(path: str) -> Source:
  """The index of ``path`` (shapes and dtypes of its params and batch_stats), no tensor read."""
  p = epath.Path(path)
  if p.is_dir():
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    state_dir = newest_step_directory(p)
    meta = ocp.PyTreeCheckpointer().metadata(state_dir)
    tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta
    tree = {c: tree.get(c) or {} for c in COLLECTIONS}
    tensors = {k: jax.ShapeDtypeStruct(tuple(m.shape), np.dtype(m.dtype))
               for k, m in core.flatten(tree).items()}
    return Source(str(path), "run", tensors, state_dir, {})
  if not p.exists():
    raise ValueError(f"init_from.path={path!r} does not exist; pass a converted .safetensors "
                     "file or a run directory")
  header = tensor_io.read_safetensors_header(str(p))
  infos, metadata, _ = header
  if core.SPEC_KEY not in metadata:
    raise ValueError(f"{path} is not a converted file (no {core.SPEC_KEY!r} metadata); convert "
                     "it first: python -m contrastive_jax.convert import ...")
  tensors = {k: jax.ShapeDtypeStruct(tuple(i["shape"]), tensor_io.tensor_dtype(i))
             for k, i in infos.items()}
  return Source(str(path), "converted", tensors, p, metadata, header)


def read_sharded(source: Source, targets: Mapping[str, jax.ShapeDtypeStruct]
                 ) -> dict[str, jax.Array]:
  """Source tensors as global arrays, each host reading only its devices' shards.

  Args:
    source: ``open_source(path)``.
    targets: source path -> ``ShapeDtypeStruct`` with ``sharding`` (the shape must be the
      source's; the dtype is the one wanted, cast from the file's shard by shard).

  Returns:
    ``{source path: jax.Array}`` laid out as ``targets`` says.
  """
  if source.kind == "run":
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    item = core.unflatten(dict(targets))
    restored = ocp.PyTreeCheckpointer().restore(source.location, args=ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
        partial_restore=True))
    return {k: v for k, v in core.flatten(restored).items() if k in targets}
  out = {}
  with source.location.open("rb") as f:  # one open for every slice (a request on gs://)
    for key, target in targets.items():
      shards: dict[tuple, np.ndarray] = {}  # devices holding the same shard share one read

      def shard(index, key=key, target=target, shards=shards):
        bounds = tuple((s.start, s.stop) for s in index)
        if bounds not in shards:
          shards[bounds] = tensor_io.read_slice(str(source.location), key, index,
                                                header=source.header,
                                                file=f).astype(target.dtype)
        return shards[bounds]

      # The callback runs for each local device inside this call, so the file is still open.
      out[key] = jax.make_array_from_callback(target.shape, target.sharding, shard)
  return out


def read_host(source: Source, keys: Sequence[str], *, group_bytes: int = 2**30
              ) -> Iterator[tuple[str, np.ndarray]]:
  """``(key, numpy array)`` of each of ``keys`` in order, a few at a time (at most about
  ``group_bytes`` in memory): whole tensors on this host, for tools that write files (the
  exporter) and for tests. Single-process use."""
  keys = list(keys)
  if source.kind == "converted":
    for key in keys:
      yield key, tensor_io.read_slice(str(source.location), key, header=source.header)
    return
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  checkpointer = ocp.PyTreeCheckpointer()
  group: list[str] = []
  size = 0
  for i, key in enumerate(keys):
    group.append(key)
    t = source.tensors[key]
    size += int(np.prod(t.shape, dtype=np.int64)) * t.dtype.itemsize
    if size < group_bytes and i + 1 < len(keys):
      continue
    item = core.unflatten({k: np.zeros((), source.tensors[k].dtype) for k in group})
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    restored = core.flatten(checkpointer.restore(source.location, args=ocp.args.PyTreeRestore(
        item=item, restore_args=args, partial_restore=True)))
    for k in group:
      yield k, np.asarray(restored[k])
    group, size = [], 0


def export_to_peer(fmt: str, spec: dict, source: Source, output: str) -> int:
  """Writes ``source``'s variables in ``fmt``'s state-dict layout to ``output`` (safetensors),
  one tensor in memory at a time (a few for a run directory: ``read_host``). ``spec``: the
  architecture (a converted file's ``core.SPEC_KEY`` metadata). Every rule's tensor must be in
  the source with the model's shape, checked before anything is read. Returns the tensor count.
  """
  rules, _ = mappings.rules_for(fmt, spec)
  covered = {r.ours for r in rules}
  extra = sorted(set(source.tensors) - covered)
  missing = sorted(covered - set(source.tensors))
  if extra or missing:
    raise ValueError(f"export to {fmt}: variables {missing} are missing from {source.path} and "
                     f"{extra} have no place in the {fmt} layout; is --spec-from the "
                     "architecture of this run?")
  core._check_ours(spec, source.tensors, f"export of {source.path} to {fmt}")  # pylint: disable=protected-access
  rules = sorted(rules, key=lambda r: r.peer)  # the writer's order: tensors stream in it
  entries = []
  for r in rules:
    t = source.tensors[r.ours]
    view = np.broadcast_to(np.zeros((), t.dtype), t.shape)  # a shape, no memory
    entries.append((r.peer, mappings.to_peer(view, r.kind).shape, t.dtype))
  by_ours = {r.ours: r for r in rules}
  arrays = ((by_ours[k].peer, np.array(mappings.to_peer(v, by_ours[k].kind), order="C"))
            for k, v in read_host(source, [r.ours for r in rules]))
  tensor_io.write_safetensors_streaming(output, entries, arrays)
  return len(entries)

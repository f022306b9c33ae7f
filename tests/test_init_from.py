"""``config.init_from`` without a host replica (convert/init.py).

On the 8 simulated devices with FSDP (``min_size=0``: every leaf with a dimension divisible by
8 is split), pretrained weights from a converted file and from another run's checkpoint land
bit-identical in the run's shardings; each host reads only its devices' shards (the reads are
counted: no slice read returns a whole sharded leaf, no read is larger than the read block);
the optimizer and method state (AdamW moments, EMA, queue) come out of one jitted program with
the state's shardings. ``test_multihost.py`` repeats it with 2 processes.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from contrastive_jax import checkpoint, runs
from contrastive_jax.configs import clip_mnist, mocov2_mnist
from contrastive_jax.convert import core, init as init_lib, tensor_io


def fsdp_config(module, **kw):
  c = module.get_config("quick")
  c.global_batch = 16
  c.data.image_size = 16
  c.total_steps = 4
  c.sharding.strategy = "fsdp"
  c.sharding.min_size = 0
  for k, v in kw.items():
    setattr(c.moco, k, v)
  return c


def host_values(state) -> dict[str, np.ndarray]:
  return {k: np.asarray(v) for k, v in init_lib.model_leaves(state).items()}


class ReadSpy:
  """Counts what the loader reads from a safetensors file."""

  def __init__(self, monkeypatch):
    self.slices: list[tuple[str, tuple[int, ...]]] = []
    self.reads: list[int] = []
    read_slice, read_bytes = tensor_io.read_slice, tensor_io._read_bytes  # pylint: disable=protected-access

    def spy_slice(path, name, index=(), **kw):
      out = read_slice(path, name, index, **kw)
      self.slices.append((name, out.shape))
      return out

    def spy_bytes(f, offset, size):
      self.reads.append(size)
      return read_bytes(f, offset, size)

    def no_full_read(*args, **kw):
      raise AssertionError("init_from read a whole file into host memory")

    monkeypatch.setattr(tensor_io, "read_slice", spy_slice)
    monkeypatch.setattr(tensor_io, "_read_bytes", spy_bytes)
    monkeypatch.setattr(tensor_io, "read_safetensors", no_full_read)
    monkeypatch.setattr(tensor_io, "READ_BLOCK_BYTES", 256)


def assert_state_sharded_like(state, run):
  for x, s in zip(jax.tree.leaves(state), jax.tree.leaves(run.state_sharding)):
    assert x.sharding.is_equivalent_to(s, x.ndim), (x.sharding, s)


def test_converted_file_loads_shard_by_shard_under_fsdp(tmp_path, monkeypatch):
  c = fsdp_config(clip_mnist)
  run = runs.build_run(c)
  variables = run.method.model.init(jax.random.key(123), *run.method.example_inputs(),
                                    train=False)
  pretrained = {k: np.asarray(v) for k, v in core.flatten(dict(variables)).items()}
  c.init_from.path = str(tmp_path / "pretrained.safetensors")
  core.save_converted(c.init_from.path, {"kind": "clip"}, pretrained)

  spy = ReadSpy(monkeypatch)
  state = init_lib.init_state(runs.build_run(c))
  assert_state_sharded_like(state, run)
  got = host_values(state)
  assert set(got) == set(pretrained)
  for k, v in pretrained.items():
    np.testing.assert_array_equal(got[k], v, err_msg=k)  # bit-identical
  # Only shards were read: every sharded leaf's slices are its 1/8 shards, no read is larger
  # than the block, and the whole file was never read.
  leaves = init_lib.model_leaves(run.abstract_state)
  sharded = {k for k, a in leaves.items() if not a.sharding.is_fully_replicated}
  assert len(sharded) > len(leaves) // 2
  for name, shape in spy.slices:
    if name in sharded:
      assert np.prod(shape) * 8 == np.prod(leaves[name].shape), (name, shape)
  assert {n for n, _ in spy.slices} == set(leaves)
  assert max(spy.reads) <= 256
  # AdamW's moments: zeros of the parameters' shapes, already in their shardings.
  mu = jax.tree.leaves(state.opt_state)
  assert mu and all(not np.any(np.asarray(m)) for m in mu if m.dtype == np.float32)


def test_run_directory_loads_only_params_into_fsdp_shardings(tmp_path):
  """MoCo v2 (BN statistics, EMA encoder, queue) from another run's checkpoint: only params
  and batch_stats are restored; EMA copies are rebuilt from them and the queue is the fresh
  one, as at initialisation."""
  c = fsdp_config(mocov2_mnist, queue_size=64)
  run = runs.build_run(c)
  source = run.init_state(seed=123)
  # Make the source's method state differ from what init builds: it must not be read.
  source = source.replace(ema_params=jax.tree.map(lambda x: x + 1, source.ema_params))
  with checkpoint.Checkpointer(tmp_path / "src", async_save=False) as ckpt:
    ckpt.save(7, source, data_state={"step": 7}, config=c)
  want = host_values(source)

  c.init_from.path = str(tmp_path / "src")
  target = runs.build_run(c)
  state = init_lib.init_state(target)
  assert_state_sharded_like(state, target)
  got = host_values(state)
  for k, v in want.items():
    np.testing.assert_array_equal(got[k], v, err_msg=k)
  fresh = target.init_state()
  for a, b in zip(jax.tree.leaves(state.ema_params), jax.tree.leaves(state.params)):
    if a.shape == b.shape:
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(np.asarray(state.queue), np.asarray(fresh.queue))


def test_bad_source_is_refused_before_reading(tmp_path):
  c = fsdp_config(clip_mnist)
  path = tmp_path / "wrong.safetensors"
  core.save_converted(str(path), {"kind": "clip"}, {"params/image_proj/kernel": np.zeros((3, 3),
                                                                                    np.float32)})
  c.init_from.path = str(path)
  with pytest.raises(ValueError, match="mis-shaped"):
    init_lib.init_state(runs.build_run(c))
  c.init_from.path = str(tmp_path / "missing.safetensors")
  with pytest.raises(ValueError, match="does not exist"):
    init_lib.init_state(runs.build_run(c))


def test_export_a_fsdp_run_directory_to_the_open_clip_layout(tmp_path, monkeypatch):
  """``convert export --input RUN --spec-from FILE``: an FSDP run's checkpoint, streamed into
  open_clip's layout one tensor at a time, equals the in-memory export of the same values,
  and imports back bit for bit."""
  from test_zero_shot_imagenet import SPEC  # a tiny open_clip-shaped CLIP

  from contrastive_jax.convert import __main__ as cli
  from contrastive_jax.evaluate import zero_shot_imagenet

  spec_file = str(tmp_path / "arch.safetensors")  # --spec-from reads only the metadata
  core.save_converted(spec_file, SPEC, {"params/logit_scale": np.zeros((), np.float32)})
  c = zero_shot_imagenet.weights_config(SPEC, "", batch_size=8)
  c.sharding.min_size = 0
  run = runs.build_run(c, num_steps=1)
  state = run.init_state(seed=5)
  assert not jax.tree.leaves(state.params)[0].sharding.is_fully_replicated
  with checkpoint.Checkpointer(tmp_path / "run", async_save=False) as ckpt:
    ckpt.save(1, state, data_state={"step": 1}, config=c)
  flat = host_values(state)

  from contrastive_jax.convert import sources
  read_host = sources.read_host

  def spy(source, keys, **kw):
    return read_host(source, keys, group_bytes=1)  # one tensor per restore

  monkeypatch.setattr(sources, "read_host", spy)
  out = str(tmp_path / "open_clip.safetensors")
  assert cli.main(["export", "--format", "open_clip", "--input", str(tmp_path / "run"),
                   "--spec-from", spec_file, "--output", out]) == 0
  got, _ = tensor_io.read_safetensors(out)
  want = core.export_state_dict("open_clip", SPEC, flat)
  assert set(got) == set(want)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  _, back = core.import_state_dict(got, spec={**SPEC, "peer": {"format": "open_clip"}})
  for k in flat:
    np.testing.assert_array_equal(back[k], flat[k], err_msg=k)
  # A run directory without --spec-from is refused with the fix.
  assert cli.main(["export", "--format", "open_clip", "--input", str(tmp_path / "run"),
                   "--output", out]) == 2

"""The run builder: FSDP steps equal replicated ones; checkpoints move between strategies.

On the 8 simulated devices of conftest.py, for SimCLR, MoCo v2 (queue and EMA), MoCo v3 (EMA)
and CLIP, three jitted steps on the same synthetic batches under ``sharding.strategy="fsdp"``
(``min_size=0``: every leaf with a dimension divisible by 8 split) give the parameters, EMA and
queue of the replicated run to float32 tolerance, while each device's compiled arguments hold
about 1/8 of the state.
"""

from __future__ import annotations

import numpy as np
import jax
import pytest

from configs import clip_mnist, mocov2_mnist, mocov3_mnist, simclr_mnist
from contrastive_jax import checkpoint, distributed, runs, sharding
from contrastive_jax.errors import ConfigError

CONFIGS = {"simclr": simclr_mnist, "mocov2": mocov2_mnist, "mocov3": mocov3_mnist,
           "clip": clip_mnist}


def tiny_config(name: str, strategy: str, **overrides):
  c = CONFIGS[name].get_config("quick")
  c.global_batch = 16
  c.data.image_size = 16
  c.total_steps = 10
  if name == "mocov2":
    c.moco.queue_size = 64
  if c.optim.name == "adamw":
    # (CLIP) Adam divides by sqrt(nu): a gradient that is exactly 0 in exact arithmetic (the
    # key bias of attention; softmax ignores it) is float noise of either sign, scaled to +-lr.
    # eps=1e-3 keeps such noise at its own size: the comparison tests sharding, not noise.
    c.optim.eps = 1e-3
  c.sharding.strategy = strategy
  c.sharding.min_size = 0
  for key, value in overrides.items():
    node = c
    *path, last = key.split(".")
    for p in path:
      node = node[p]
    node[last] = value
  return c


def synthetic_batches(run, num: int):
  rs = np.random.RandomState(0)
  out = []
  for _ in range(num):
    batch = {}
    for k, spec in run.abstract_batch().items():
      x = (rs.rand(*spec.shape).astype(np.float32) if spec.dtype == np.float32
           else rs.randint(1, 200, spec.shape).astype(np.int32))
      batch[k] = jax.device_put(x, run.batch_sharding)
    out.append(batch)
  return out


def run_steps(config, num_steps: int = 3, mesh=None):
  run = runs.build_run(config, mesh)
  state = run.init_state()
  history = []
  for batch in synthetic_batches(run, num_steps):
    state, metrics = run.train_step(state, batch)
    history.append((float(metrics["loss"]), float(metrics["grad_norm"])))
  return run, state, history


def _sharded_fraction(tree) -> float:
  leaves = jax.tree.leaves(tree)
  sharded = sum(x.size for x in leaves if not x.sharding.is_fully_replicated)
  return sharded / sum(x.size for x in leaves)


@pytest.mark.parametrize("name", ["simclr", "mocov2", "mocov3", "clip"])
def test_fsdp_steps_equal_replicated_steps(name):
  rep_run, rep, rep_history = run_steps(tiny_config(name, "replicated"))
  fsdp_run, fsdp, fsdp_history = run_steps(tiny_config(name, "fsdp"))
  # The FSDP state really is split: most of the parameters (and EMA / queue) are sharded.
  assert _sharded_fraction(fsdp.params) > 0.9
  assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(rep))
  if name in ("mocov2", "mocov3"):
    assert _sharded_fraction(fsdp.ema_params) > 0.9
  if name == "mocov2":
    assert not fsdp.queue.sharding.is_fully_replicated
  # Losses and gradient norms (Adam's update would hide a wrongly scaled gradient).
  np.testing.assert_allclose(fsdp_history, rep_history, rtol=1e-5)
  fields = ("params", "opt_state", "batch_stats", "ema_params", "ema_batch_stats", "queue",
            "queue_ptr", "step")
  for field in fields:
    for a, b in zip(jax.tree.leaves(getattr(rep, field)), jax.tree.leaves(getattr(fsdp, field))):
      np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6,
                                 err_msg=f"{name}: {field}")
  # The compiled step's per-device arguments are exactly the state's shards plus the batch's
  # (XLA takes the sharded state as is), and the FSDP state is about 1/8 of the replicated one.
  batch = rep_run.abstract_batch()
  batch_bytes = sharding.bytes_per_device(batch, [s.sharding for s in batch.values()])
  for run in (rep_run, fsdp_run):
    compiled = run.train_step.lower(run.abstract_state, run.abstract_batch()).compile()
    args = compiled.memory_analysis().argument_size_in_bytes
    assert abs(args - (run.state_bytes_per_device + batch_bytes)) <= 64, (name, args)
  ratio = fsdp_run.state_bytes_per_device / rep_run.state_bytes_per_device
  print(f"{name}: state bytes per device fsdp/replicated = {ratio:.4f}")
  assert 1 / 8 <= ratio < 0.14, ratio


@pytest.mark.parametrize("direction", ["replicated->fsdp", "fsdp->replicated"])
def test_checkpoint_moves_between_strategies_and_device_counts(tmp_path, direction):
  """Saved by one strategy on 8 devices, restored into the other on 4: same next loss."""
  src, dst = direction.split("->")
  name = "mocov2"  # the state with every kind of leaf: EMA, queue, pointer, BN statistics
  # shuffle_bn=False: per-device BN groups would differ between 8 and 4 devices.
  run8, state8, _ = run_steps(tiny_config(name, src, **{"moco.shuffle_bn": False}),
                              num_steps=2)
  with checkpoint.Checkpointer(tmp_path, async_save=False) as ckpt:
    ckpt.save(2, state8, data_state={"step": 2}, config=run8.config, force=True)
  batch = synthetic_batches(run8, 3)[2]
  _, metrics8 = run8.train_step(state8, batch)

  mesh4 = distributed.make_mesh(4)
  run4 = runs.build_run(tiny_config(name, dst, **{"moco.shuffle_bn": False}), mesh4)
  with checkpoint.Checkpointer(tmp_path, async_save=False) as ckpt:
    state4, _, _, step = ckpt.restore(run4.abstract_state)
  assert step == 2
  for leaf, want in zip(jax.tree.leaves(state4), jax.tree.leaves(run4.state_sharding)):
    assert leaf.sharding == want
  if dst == "fsdp":
    assert _sharded_fraction(state4.params) > 0.9
  batch4 = {k: jax.device_put(np.asarray(v), run4.batch_sharding) for k, v in batch.items()}
  _, metrics4 = run4.train_step(state4, batch4)
  # Same global batch, same state: the loss differs only by float32 reduction order.
  np.testing.assert_allclose(float(metrics4["loss"]), float(metrics8["loss"]), rtol=1e-5)


def test_bad_sharding_config_fails_before_tracing():
  c = tiny_config("simclr", "zero3")
  with pytest.raises(ValueError, match="config.sharding.strategy='zero3'"):
    runs.build_run(c)


def test_build_run_checks_the_config_before_tracing(monkeypatch):
  """Every builder of a run (the trainer, the pod compile command, the benchmarks) gets the
  sections' checks first: a bad key fails with its ConfigError before anything is traced."""
  def no_tracing(*args, **kwargs):
    raise AssertionError("traced before the config was checked")
  monkeypatch.setattr(jax, "eval_shape", no_tracing)
  with pytest.raises(ConfigError, match=r"config\.loss_tile=4 tiles the ring loss only"):
    runs.build_run(tiny_config("simclr", "replicated", loss_tile=4))


def test_unchecked_run_builds_on_a_mesh_that_does_not_divide_its_batch():
  """``restore.py`` builds with ``check=False``: a checkpoint restores onto any mesh, even one
  whose device count does not divide the global batch it trained with."""
  c = tiny_config("simclr", "replicated", global_batch=12)
  with pytest.raises(ConfigError, match=r"config\.global_batch of 12 is not divisible by the 8"):
    runs.build_run(c)
  assert runs.build_run(c, check=False).num_params > 0


def test_clip_presets_have_open_clips_parameter_counts():
  """The towers the memory benchmark compiles: open_clip's ViT-L/14, g/14 and bigG/14 sizes."""
  from contrastive_jax.models import registry
  want = {"clip_vit_l14": 427_616_513, "clip_vit_g14": 1_366_678_273,
          "clip_vit_bigg14": 2_539_567_105}
  for name, count in want.items():
    model = registry.build_clip_preset(name)
    shapes = jax.eval_shape(lambda m=model: m.init(
        jax.random.key(0), jax.numpy.zeros((1, 224, 224, 3)),
        jax.numpy.zeros((1, 77), jax.numpy.int32)))
    got = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"]))
    assert got == count, (name, got)
    # open_clip's published sizes: 427.62M, 1366.68M, 2539.57M.

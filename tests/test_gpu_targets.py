"""GPU targets: a tiny program compiled by XLA:GPU for a described 8 x A100 node, no GPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from contrastive_jax import distributed, gpu_targets
from contrastive_jax.errors import ConfigError


def test_specs_keep_the_interface():
  for name, spec in gpu_targets.GPU_SPECS.items():
    for key in ("peak_bf16_flops", "hbm_bytes", "hbm_bw_bytes_s", "interconnect_bw_bytes_s"):
      assert spec[key] > 0, (name, key)
  a100 = gpu_targets.GPU_SPECS["8xa100-80gb"]
  assert a100["num_gpus"] == 8 and a100["hbm_bytes"] == 80 * 2**30
  assert a100["peak_bf16_flops"] == 312e12
  assert gpu_targets.GPU_SPECS["1xrtx4090"]["hbm_bytes"] == 24 * 2**30
  text = gpu_targets.target_config(gpu_targets.H100_80GB)
  assert "core_count: 132" in text and "major: 9 minor: 0" in text


def test_unknown_target_and_missing_plugin_name_the_fix(monkeypatch):
  with pytest.raises(ConfigError, match="8xa100-80gb"):
    gpu_targets.gpu_devices("8xv100")
  monkeypatch.setattr(gpu_targets, "plugin_available", lambda: False)
  with pytest.raises(ConfigError, match="pip install jax-cuda12-pjrt==0.10.2"):
    gpu_targets.gpu_devices("8xa100-80gb")


@pytest.mark.skipif(not gpu_targets.plugin_available(),
                    reason="jax's CUDA plugin is not importable: " + gpu_targets.PLUGIN_PIP)
def test_compiles_a_sharded_program_for_8_a100():
  devices = gpu_targets.gpu_devices("8xa100-80gb")
  assert len(devices) == 8 and devices[0].device_kind == "NVIDIA A100-SXM4-80GB"
  mesh = distributed.make_mesh(devices=devices)
  data = NamedSharding(mesh, P("data"))

  def loss(x, w):  # a data-parallel matmul and a mean: one all-reduce
    return jnp.mean(jnp.tanh(x @ w))

  x = jax.ShapeDtypeStruct((64, 128), jnp.bfloat16, sharding=data)
  w = jax.ShapeDtypeStruct((128, 128), jnp.bfloat16, sharding=NamedSharding(mesh, P()))
  compiled = jax.jit(jax.grad(loss, argnums=1)).lower(x, w).compile(
      compiler_options=gpu_targets.COMPILER_OPTIONS)
  mem = compiled.memory_analysis()
  # Per GPU: its 8 x 128 bf16 rows of x and the replicated 128 x 128 bf16 w.
  assert mem.argument_size_in_bytes == 8 * 128 * 2 + 128 * 128 * 2
  hlo = compiled.as_text()
  assert "all-reduce" in hlo and "num_partitions=8" in hlo
  assert "__cublas" in hlo  # GEMMs on cuBLAS: Triton GEMMs are off without a device

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
  # Counted from the HLO (no cost model on GPU): x @ w and x^T @ dy, 8 rows per GPU.
  from contrastive_jax import hlo_stats  # pylint: disable=g-import-not-at-top
  module = hlo_stats.parse(hlo)
  assert compiled.cost_analysis() is None or "flops" not in compiled.cost_analysis()
  assert hlo_stats.loop_flops(module) == 2 * (2 * 8 * 128 * 128)
  assert hlo_stats.collective_bytes(module, 8)["all-reduce"]["bytes"] == 2 * 7 / 8 * 128 * 128 * 2


@pytest.mark.skipif(not gpu_targets.plugin_available(),
                    reason="jax's CUDA plugin is not importable: " + gpu_targets.PLUGIN_PIP)
def test_compile_for_reports_a_gpu_node():
  """``compile_for --topology=8xA100``: the trainer's step for simclr_mnist compiled by XLA:GPU
  (about 15 s of CPU), in the TPU report's shape."""
  from contrastive_jax import compile_for, configs  # pylint: disable=g-import-not-at-top
  config = configs.load_config("configs/simclr_mnist.py")
  configs.apply_overrides(config, {"global_batch": 16})
  devices, chip, label = compile_for.target_devices("8xA100")
  rep = compile_for.report(config, devices, chip, name="simclr_mnist", target=label,
                           input_rate=100.0, evals="none")
  train = rep["programs"][0]
  assert label == "8xa100-80gb (8 x NVIDIA A100-SXM4-80GB)" and rep["chips"] == 8
  assert rep["fits"] and rep["hosts"] == 1 and rep["input"]["host_vcpus"] == 96
  assert train["argument_bytes"] >= train["state_bytes"] > 0 and train["temp_bytes"] > 0
  assert train["flops_counted"] == "matrix products" and train["flops"] > 1e6
  assert train["collectives"]["all-reduce"]["bytes"] > 0
  bound = train["bound"]
  assert bound["hbm_s"] == 0 and bound["limiter"] in ("compute", "NVLink")
  assert bound["step_s"] == max(bound["compute_s"], bound["ici_s"]) > 0
  assert rep["made"]["compiler"].startswith("jax-cuda12-plugin")
  text = compile_for.format_report(rep)
  for words in ("memory per GPU", "matrix products only", "NVLink", "80.00 GiB HBM",
                "Nothing here has run on a GPU"):
    assert words in text


@pytest.mark.parametrize("spelling,name", [
    ("8xa100-80gb", "8xa100-80gb"), ("8xA100", "8xa100-80gb"), ("a100x8", "8xa100-80gb"),
    ("8x H100 SXM", "8xh100-80gb"), ("8xh100", "8xh100-80gb"), ("rtx4090", "1xrtx4090"),
    ("1x4090", "1xrtx4090"), ("nvidia-a100-80gb", "1xa100-80gb"), ("v5e-64", None),
    ("v5e:8x8", None), ("v4-32", None), ("8xv100", None)])
def test_gpu_target_spellings(spelling, name):
  assert gpu_targets.canonical_name(spelling) == name


def test_compile_for_gpu_names_and_missing_plugin_name_the_fix(monkeypatch):
  """``compile_for --topology``: a GPU count no target has names the targets; an unknown name
  names the TPU forms and the GPU targets; without the plugin the error is its pip command."""
  from contrastive_jax import compile_for  # pylint: disable=g-import-not-at-top
  with pytest.raises(ConfigError, match="GPU targets are 8xa100-80gb"):
    compile_for.target_devices("4xa100")
  with pytest.raises(ConfigError, match="v5litepod-64.*8xa100-80gb, 8xh100-80gb"):
    compile_for.target_devices("8xv100")
  monkeypatch.setattr(gpu_targets, "plugin_available", lambda: False)
  with pytest.raises(ConfigError, match=r"pip install jax-cuda12-pjrt==0\.10\.2"):
    compile_for.target_devices("8xA100")
  chip = gpu_targets.chip_spec("1xrtx4090")
  assert (chip.kind, chip.link, chip.hbm_bytes, chip.host(1)) == ("gpu", "PCIe", 24 * 2**30,
                                                                   (1, 0))


# The optimised HLO of XLA:GPU (abridged): a cuBLAS GEMM in a 3-trip loop, a cuDNN
# backward-filter convolution and an all-reduce over one axis of a named 4 x 2 mesh.
_GPU_HLO = """HloModule gpu_snippet

%body (p: (s32[], bf16[8,64], bf16[64,64])) -> (s32[], bf16[8,64], bf16[64,64]) {
  %p = (s32[], bf16[8,64]{1,0}, bf16[64,64]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = bf16[8,64]{1,0} get-tuple-element(%p), index=1
  %w = bf16[64,64]{1,0} get-tuple-element(%p), index=2
  %gemm = (bf16[8,64]{1,0}, s8[1024]{0}) custom-call(%x, %w), custom_call_target="__cublas$lt$matmul", backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]}}}
  %y = bf16[8,64]{1,0} get-tuple-element(%gemm), index=0
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %t = (s32[], bf16[8,64]{1,0}, bf16[64,64]{1,0}) tuple(%next, %y, %w)
}

%cond (q: (s32[], bf16[8,64], bf16[64,64])) -> pred[] {
  %q = (s32[], bf16[8,64]{1,0}, bf16[64,64]{1,0}) parameter(0)
  %j = s32[] get-tuple-element(%q), index=0
  %n = s32[] constant(3)
  ROOT %lt = pred[] compare(%j, %n), direction=LT
}

ENTRY %main (a: bf16[8,64], b: bf16[64,64], c: bf16[2,8,8,4], d: bf16[2,8,8,16]) -> bf16[16,3,3,4] {
  %a = bf16[8,64]{1,0} parameter(0)
  %b = bf16[64,64]{1,0} parameter(1)
  %zero = s32[] constant(0)
  %init = (s32[], bf16[8,64]{1,0}, bf16[64,64]{1,0}) tuple(%zero, %a, %b)
  %loop = (s32[], bf16[8,64]{1,0}, bf16[64,64]{1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %c = bf16[2,8,8,4]{3,2,1,0} parameter(2)
  %d = bf16[2,8,8,16]{3,2,1,0} parameter(3)
  %dw = (bf16[16,3,3,4]{3,2,1,0}, u8[0]{0}) custom-call(%c, %d), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_o01i->b01f, custom_call_target="__cudnn$convBackwardFilter"
  %g = bf16[16,3,3,4]{3,2,1,0} get-tuple-element(%dw), index=0
  ROOT %ar = bf16[16,3,3,4]{3,2,1,0} all-reduce(%g), replica_groups=mesh['data'=4,'model'=2] {'data'}, to_apply=%add
}
"""


def test_hlo_stats_reads_xla_gpu_library_calls():
  """cuBLAS GEMMs and cuDNN convolutions are the FLOPs of an XLA:GPU program (it has no cost
  model): 3 x 2*8*64*64 for the looped GEMM, 2 x (2*8*8*16 output gradients) x (3*3*4) for the
  filter gradient; the all-reduce's group is the 4 devices of the 'data' axis."""
  from contrastive_jax import hlo_stats  # pylint: disable=g-import-not-at-top
  module = hlo_stats.parse(_GPU_HLO)
  gemm, conv = 2 * 8 * 64 * 64, 2 * (2 * 8 * 8 * 16) * (3 * 3 * 4)
  assert [(x.trip_count) for x in hlo_stats.loops(module)] == [3]
  assert hlo_stats.loop_flops(module, True) == 3 * gemm + conv
  assert hlo_stats.loop_flops(module, False) == gemm + conv
  moved = hlo_stats.collective_bytes(module, 8)["all-reduce"]
  assert moved == {"count": 1.0, "bytes": 2 * 3 / 4 * 16 * 3 * 3 * 4 * 2}

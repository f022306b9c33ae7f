"""One accelerator, measured: flagship train steps and the contrastive loss at very large batches.

Needs no TensorFlow (the input pipeline is not involved: batches are synthetic), so it runs on a
GPU host that has only jax, flax, optax and ml_collections. It prints three tables:

1. A dense ``[n, n] @ [n, n]`` matmul in bf16: the device's practical ceiling.
2. Train steps with bf16 compute and float32 parameters, from the project's models, losses and
   optimizers (the same modules the trainer's methods use): CLIP ViT-B/16 (symmetric InfoNCE,
   AdamW) and SimCLR ResNet-50 (NT-Xent over both views, LARS). Step time is the median of the
   timed steps after a warm-up; FLOPs come from the compiled program (``cost_analysis``).
3. The CLIP loss's value and gradients alone at global batches of 64k to 1M pairs (D = 512): the
   all-gather form (``losses.clip_loss``, an ``[N, N]`` logit matrix) next to the tiled ring
   (``losses.ring.clip_loss`` with ``tile``: ``[tile, tile]`` pieces, online log-sum-exp), with
   the compiled program's temporary memory and the measured time.

  python benchmarks/gpu_check.py                 # about 3-5 minutes on one H100/H200
  python benchmarks/gpu_check.py --quick         # tiny sizes: checks the script on a CPU
"""

from __future__ import annotations

import argparse
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from contrastive_jax import distributed, losses, models, optim
from contrastive_jax.configs import common


def _median_time(fn, args, steps: int) -> float:
  out = fn(*args)
  jax.block_until_ready(out)
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    out = fn(*args)
    jax.block_until_ready(out)
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float((cost or {}).get("flops", float("nan")))


def matmul_ceiling(n: int) -> float:
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
  return 2.0 * n ** 3 / _median_time(jax.jit(jnp.dot), (a, b), 10)


def _train_step(apply_loss, tx):
  """``(params, opt_state, batch) -> (params, opt_state, loss)``, donated."""
  def step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(apply_loss)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss
  return jax.jit(step, donate_argnums=(0, 1))


def clip_step(batch: int, image_size: int, quick: bool):
  """CLIP ViT-B/16: both towers, the clipped learned scale, symmetric InfoNCE, AdamW."""
  kw = dict(dtype=jnp.bfloat16, remat=False)
  if quick:
    model = models.build_clip("vit", image_kwargs=dict(patch_size=16, width=64, depth=2,
                                                       num_heads=2),
                              text_kwargs=dict(vocab_size=1000, context_length=16, width=64,
                                               depth=2, num_heads=2), embed_dim=64, **kw)
    context = 16
  else:
    model = models.build_clip_preset("clip_vit_b16", **kw)
    context = 77
  images = jnp.asarray(np.random.default_rng(0).random((batch, image_size, image_size, 3)),
                       jnp.float32)
  tokens = jnp.asarray(np.random.default_rng(1).integers(3, 1000, (batch, context)), jnp.int32)
  params = model.init(jax.random.key(0), images[:2], tokens[:2], train=False)["params"]
  tx, _ = optim.build_optimizer(
      common.optim_config("adamw", base_lr=5e-4, lr_scaling="none", b2=0.98, eps=1e-6,
                          weight_decay=0.2, warmup_steps=10), global_batch=batch,
      total_steps=1000)

  def apply_loss(p, b):
    out = model.apply({"params": p}, b["image"], b["tokens"], train=True)
    scale = jnp.exp(jnp.minimum(p["logit_scale"].astype(jnp.float32), np.log(100.0)))
    return losses.clip_loss(out["zimg"], out["ztxt"], scale)

  return _train_step(apply_loss, tx), params, tx.init(params), {"image": images,
                                                                "tokens": tokens}


class EncoderHead(nn.Module):
  """Encoder then projection head: ``[B, H, W, 3] -> [B, E]``."""
  encoder: nn.Module
  head: nn.Module

  def __call__(self, x, train: bool = True):
    return self.head(self.encoder(x, train=train), train=train)


def simclr_step(batch: int, image_size: int, quick: bool):
  """SimCLR ResNet-50: both views in one pass (BN over 2B), 3-layer head, NT-Xent, LARS."""
  encoder = models.build_model("convnet" if quick else "resnet50", dtype=jnp.bfloat16)
  head = models.simclr_head(version=2, hidden_dim=64 if quick else 2048, out_dim=128,
                            dtype=jnp.bfloat16)

  net = EncoderHead(encoder=encoder, head=head)
  rng = np.random.default_rng(2)
  views = jnp.asarray(rng.random((2 * batch, image_size, image_size, 3)), jnp.float32)
  variables = net.init(jax.random.key(0), views[:4], train=False)
  params, stats = variables["params"], variables["batch_stats"]
  tx, _ = optim.build_optimizer(
      common.optim_config("lars", base_lr=0.3, weight_decay=1e-6, warmup_steps=10),
      global_batch=batch, total_steps=1000)

  def apply_loss(p, b):
    z, _ = net.apply({"params": p, "batch_stats": stats}, b["views"], train=True,
                     mutable=["batch_stats"])
    return losses.nt_xent(z[:batch], z[batch:], 0.1)

  return _train_step(apply_loss, tx), params, tx.init(params), {"views": views}


def step_rows(quick: bool, steps: int, ceiling: float):
  size = 32 if quick else 224
  cases = [("CLIP ViT-B/16", clip_step, 8 if quick else 256, "pairs"),
           ("SimCLR ResNet-50", simclr_step, 8 if quick else 256, "images (x2 views)")]
  rows = []
  for name, build, batch, unit in cases:
    step, params, opt_state, data = build(batch, size, quick)
    t0 = time.perf_counter()
    compiled = step.lower(params, opt_state, data).compile()
    compile_s = time.perf_counter() - t0
    flops = _flops(compiled)
    mem = compiled.memory_analysis()
    temp = getattr(mem, "temp_size_in_bytes", float("nan")) / 2**30

    # Donation: thread the state through the timed steps.
    state = [params, opt_state]
    times = []
    for i in range(steps + 1):
      t = time.perf_counter()
      state[0], state[1], loss = compiled(state[0], state[1], data)
      jax.block_until_ready(loss)
      if i:
        times.append(time.perf_counter() - t)
    sec = statistics.median(times)
    rows.append((name, batch, unit, compile_s, temp, sec, batch / sec, flops / sec / 1e12,
                 flops / sec / ceiling, float(loss)))
  return rows


def loss_rows(quick: bool, steps: int, tile: int):
  mesh = distributed.make_mesh(1)
  dim = 32 if quick else 512
  sizes = (1024, 4096) if quick else (65_536, 262_144, 1_048_576)
  rows = []
  for n in sizes:
    rng = np.random.default_rng(n)
    a = jnp.asarray(rng.normal(size=(n, dim)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(n, dim)), jnp.float32)
    a, b = losses.l2_normalize(a), losses.l2_normalize(b)
    for impl, fn in (("all-gather", losses.sharded(losses.clip_loss, mesh)),
                     ("tiled ring", losses.sharded(
                         losses.get_loss("clip", "ring", tile=tile), mesh))):
      grad = jax.jit(jax.value_and_grad(lambda x, y, fn=fn: fn(x, y, 20.0), argnums=(0, 1)))
      try:
        compiled = grad.lower(a, b).compile()
        temp = compiled.memory_analysis().temp_size_in_bytes / 2**30
      except Exception as e:  # noqa: BLE001 -- too large to compile: report it
        rows.append((n, impl, float("nan"), float("nan"), f"{type(e).__name__}"))
        continue
      try:
        sec = _median_time(compiled, (a, b), steps)
        value = float(compiled(a, b)[0])
        rows.append((n, impl, temp, sec, f"{value:.6f}"))
      except Exception as e:  # noqa: BLE001 -- out of memory at run time
        rows.append((n, impl, temp, float("nan"), f"{type(e).__name__}"))
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="tiny sizes, to check on a CPU")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--tile", type=int, default=4096)
  parser.add_argument("--matmul-size", type=int, default=8192)
  args = parser.parse_args()
  jax.config.update("jax_threefry_partitionable", True)
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, {jax.devices()[0]}")

  n = 512 if args.quick else args.matmul_size
  ceiling = matmul_ceiling(n)
  print(f"\nbf16 [{n}, {n}] @ [{n}, {n}]: {ceiling / 1e12:.1f} TFLOP/s (the ceiling below)\n")

  print("| train step (bf16 compute, f32 params) | batch | compile (s) | temp (GiB) | step (ms) "
        "| examples/s | TFLOP/s | of ceiling | loss |")
  print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
  for name, batch, unit, comp, temp, sec, rate, tflops, frac, loss in step_rows(
      args.quick, args.steps, ceiling):
    print(f"| {name} | {batch} {unit} | {comp:.0f} | {temp:.2f} | {sec * 1e3:.1f} | "
          f"{rate:,.0f} | {tflops:.0f} | {frac:.0%} | {loss:.4f} |")

  print(f"\n| CLIP loss value+grad, D = {32 if args.quick else 512} | implementation | temp (GiB) "
        "| time (ms) | loss |")
  print("|---:|---|---:|---:|---:|")
  for n, impl, temp, sec, value in loss_rows(args.quick, max(2, args.steps // 3), args.tile):
    print(f"| {n:,} | {impl} | {temp:.2f} | {sec * 1e3:.1f} | {value} |")


if __name__ == "__main__":
  main()

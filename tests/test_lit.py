"""LiT from a converted file through ``config.init_from``: the locked image tower and projection
are bit-identical after training, have no optimizer state, and the text tower trains."""

from __future__ import annotations

import jax
import numpy as np
import pytest

pytest.importorskip("regex")
pytest.importorskip("ftfy")
from contrastive_jax.data import clip_bpe  # noqa: E402

if not clip_bpe.default_vocab_path():
  pytest.skip("needs the CLIP BPE vocabulary (an installed open_clip)", allow_module_level=True)

from contrastive_jax import distributed, methods, train  # noqa: E402
from contrastive_jax.configs import lit_vit_b32  # noqa: E402
from contrastive_jax.convert import core, init as init_lib  # noqa: E402


def test_lit_locks_the_pretrained_image_tower(tmp_path):
  c = lit_vit_b32.get_config("quick")
  c.checkpoint.async_save = False
  c.data.shuffle_buffer = 64
  # A "pretrained" CLIP of the same architecture (another seed), saved as a converted file.
  method = methods.build_method(c, distributed.make_mesh(c.num_devices))
  variables = method.model.init(jax.random.key(123), *method.example_inputs(), train=False)
  pretrained = {k: np.asarray(v) for k, v in core.flatten(dict(variables)).items()}
  c.init_from.path = str(tmp_path / "pretrained.safetensors")
  core.save_converted(c.init_from.path, {"kind": "clip"}, pretrained)

  train.train_and_evaluate(c, str(tmp_path / "run"))
  source = init_lib.open_source(str(tmp_path / "run"))  # newest checkpoint: step 3
  final = dict(init_lib.read_host(source, sorted(source.tensors)))
  locked = [k for k in pretrained if any(p in k for p in lit_vit_b32.LOCKED)]
  assert locked
  for k in locked:
    np.testing.assert_array_equal(final[k], pretrained[k], err_msg=k)
  text = [k for k in pretrained if "text_encoder" in k and k.endswith("kernel")]
  assert any(not np.array_equal(final[k], pretrained[k]) for k in text)  # random init + steps

  import orbax.checkpoint as ocp
  state = ocp.StandardCheckpointer().restore(tmp_path / "run" / "checkpoints" / "3" / "state")
  opt_paths = list(core.flatten(state["opt_state"]) if isinstance(state["opt_state"], dict)
                   else [])
  assert opt_paths and not any("image_encoder" in p or "image_proj" in p for p in opt_paths)


def test_init_from_names_bad_tensors(tmp_path):
  with pytest.raises(ValueError, match="select nothing"):
    init_lib.select({"params/a/kernel": np.zeros(2)}, ("image_encoder",), "")


@pytest.mark.parametrize("lock", [True, False])
def test_locked_image_tower_gets_no_gradient(lock):
  """With ``clip.lock_image`` every image-tower and projection gradient is exactly zero (so no
  compute is wasted on them by the optimizer either); unlocked, they are not."""
  import jax.numpy as jnp
  import optax
  c = lit_vit_b32.get_config("quick")
  c.clip.lock_image = lock
  method = methods.build_method(c, distributed.make_mesh(1))
  state = method.init_state(jax.random.key(0), optax.sgd(0.1))
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.normal(size=(8, 28, 28, 3)), jnp.float32),
           "tokens": jnp.asarray(rng.integers(1, 49_000, size=(8, 77)), jnp.int32)}
  grads = jax.jit(jax.grad(lambda p: method.loss_fn(p, state, batch, jax.random.key(1))[0]))(
      state.params)
  flat = core.flatten(dict(grads))
  image = [k for k in flat if any(p in k for p in lit_vit_b32.LOCKED)]
  text = [k for k in flat if "text_encoder" in k]
  assert image and text
  assert all(bool(jnp.all(flat[k] == 0)) for k in image) == lock
  assert all(bool(jnp.any(flat[k] != 0)) for k in text if k.endswith("kernel"))


def test_init_from_prefix_places_an_encoder_in_a_tower():
  """A converted image encoder (timm/torchvision paths) goes into a CLIP image tower."""
  src = {"params/patch_embed/kernel": np.ones(2), "batch_stats/stem/bn/mean": np.zeros(2)}
  out = init_lib.select(src, (), "image_encoder/")
  assert set(out) == {"params/image_encoder/patch_embed/kernel",
                      "batch_stats/image_encoder/stem/bn/mean"}

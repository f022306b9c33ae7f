"""Parity of converted weights with the peers' own forward, per architecture family: a table.

For each family of the converter's table (``contrastive_jax.convert.mappings.MODELS``): the
peer's model (open_clip ``CLIP`` / timm ``VisionTransformer``) at its real head width, MLP ratio,
activation and norm placement, reduced to 2 layers of 4 heads (text: 2 of 64, 16 positions, 512
ids), values moved off their defaults (the same models as tests/test_convert.py), imported, and
the embeddings compared:
max |ours - peer| / max |peer| (image and text; L2-normalised for CLIP, features for timm).

  PYTHONPATH=.:tests python benchmarks/convert_parity.py
"""

from __future__ import annotations

import numpy as np
import torch

import test_convert as t  # tests/: the reduced peer models and the comparison helpers
from contrastive_jax import convert
from contrastive_jax.convert import core


def main() -> None:
  print(f"{'family':42s} {'image rel. err':>15s} {'text rel. err':>15s}")
  for name in t.OPEN_CLIP_FAMILIES:
    model, spec = t._small_openclip(name, heads=4)
    spec, flat = convert.import_state_dict(t._sd(model), spec=spec)
    images, tokens = t._images(4, spec["image_size"]), t._small_texts(4)
    peer_img, peer_txt = t._peer_clip(model, images, tokens)
    img, txt = t._ours_clip(spec, flat, images, tokens)
    print(f"open_clip {name:32s} {t._rel_err(img, peer_img):15.2e} "
          f"{t._rel_err(txt, peer_txt):15.2e}")
  import timm.models.vision_transformer as vit_mod  # pylint: disable=g-import-not-at-top
  for name in t.TIMM_FAMILIES:
    args = t._timm_args(name)
    head_width = args["embed_dim"] // args["num_heads"]
    args.update(depth=2, num_heads=4, embed_dim=4 * head_width, img_size=2 * args["patch_size"])
    torch.manual_seed(0)
    model = t._perturb(vit_mod.VisionTransformer(**args, num_classes=0))
    spec, flat = convert.import_state_dict(t._sd(model), spec=t._reduced_spec(name, 4))
    images = t._images(4, spec["image_size"])
    with torch.no_grad():
      peer = model(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
    ours = np.asarray(core.build_from_spec(spec).apply(core.unflatten(flat), images))
    print(f"timm {name:37s} {t._rel_err(ours, peer):15.2e} {'-':>15s}")


if __name__ == "__main__":
  main()

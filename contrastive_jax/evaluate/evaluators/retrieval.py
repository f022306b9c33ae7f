"""``type="retrieval"``: image-text retrieval recall@K both ways (the COCO / Flickr30k protocol
of Karpathy & Fei-Fei 2015, as CLIP reports it), for methods with a text tower.

The image and caption embeddings ([N_img, E] and [N_txt, E]: 5k x 512 and 25k x 512 float32
for COCO, 61 MB) are gathered to every host, never the images. COCO from tfds
``coco_captions``, or COCO / Flickr30k from Karpathy's split files
(``data.source="karpathy_json"``, ``sources.karpathy_json_source``). With one caption per
example, identical captions are one text (class captions). The array math is
``evaluate/retrieval.py``.
"""

from __future__ import annotations

import numpy as np

from contrastive_jax.errors import ConfigError
from contrastive_jax.evaluate import retrieval as retrieval_lib
from contrastive_jax.evaluate import streaming

SETTINGS = dict(ks=(1, 5, 10))  # the K of the recalls R@K
NEEDS_TEXT = True


def check(where: str, spec: dict) -> None:
  ks = tuple(spec["ks"])
  if not ks or min(int(k) for k in ks) < 1:
    raise ConfigError(f"{where}.ks={ks} must be positive integers, e.g. (1, 5, 10)")


def programs(spec: dict, data) -> list:
  b, k = spec["batch_size"], int(data.captions_per_image or 0)
  length = int(data.context_length)
  tokens = ("tokens", (b, k, length) if k else (b, length), "int32")
  return [("image_embedding", streaming.image_program(spec, data)),
          ("text_embedding", tokens)]


def run(ctx: streaming.Context, state, spec: dict):
  data = ctx.data(spec)
  local = streaming.encode_split(ctx.encoders, state, ctx.mesh, data, data.eval_split,
                                 spec["batch_size"], [("img", "image_embedding", "image"),
                                                      ("txt", "text_embedding", "tokens")])
  g = {k: streaming.allgather_rows(v) for k, v in local.items()}
  tokens = g["tokens"]
  if tokens.ndim == 3:  # [N, captions per image, L]: every caption its own text (COCO)
    per = tokens.shape[1]
    text_emb = g["txt"].reshape(-1, g["txt"].shape[-1])
    text_to_image = np.repeat(np.arange(len(tokens)), per)
    groups = None
  else:  # one caption per example; identical captions are one text (class captions)
    text_emb, text_to_image = g["txt"], np.arange(len(tokens))
    groups = np.unique(tokens, axis=0, return_inverse=True)[1].reshape(-1)
  res = retrieval_lib.retrieval_recall(g["img"], text_emb, text_to_image,
                                       ks=tuple(spec["ks"]), text_groups=groups)
  return {k: v for k, v in res.items() if "R@" in k}, None

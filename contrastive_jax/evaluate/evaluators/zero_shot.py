"""``type="zero_shot"``: zero-shot classification from class prompts (Radford et al. 2021,
CLIP, Sec. 3.1.4), top-1 and top-5, for methods with a text tower.

The class prompts are split over the hosts (each encodes 1/P of the C x T prompts; the
embeddings are gathered once, [C x T, E], and ensembled per class); each host scores its own
images and only the hit counts are summed over hosts. Memory per host: a batch and [C, E].
ImageNet and its variants share one set of class embeddings per evaluation. The array math is
``evaluate/zero_shot.py``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from contrastive_jax.data import pipeline
from contrastive_jax.errors import ConfigError
from contrastive_jax.evaluate import class_names as class_names_lib
from contrastive_jax.evaluate import features as feature_lib
from contrastive_jax.evaluate import streaming
from contrastive_jax.evaluate import zero_shot as zero_shot_lib

# classes: "source" (the dataset's class names) or "imagenet" (CLIP's 1,000 names); templates:
# "source" (the dataset's held-out caption templates), "clip" (the 80) or format strings with
# "{}"; wnids: score only these ImageNet classes ("imagenet_r", "imagenet_a" or WordNet ids).
SETTINGS = dict(classes="source", templates="source", wnids=())
NEEDS_TEXT = True


def check(where: str, spec: dict) -> None:
  if spec["wnids"]:
    if spec["classes"] != "imagenet":
      raise ConfigError(f"{where}.wnids needs classes='imagenet' (a subset of the 1,000 "
                        "ImageNet classes)")
    try:
      class_names_lib.wnid_subset(spec["wnids"])
    except ValueError as error:
      raise ConfigError(f"{where}.wnids: {error}") from None


def programs(spec: dict, data) -> list:
  tokens = ("tokens", (spec["batch_size"], int(data.context_length)), "int32")
  return [("image_embedding", streaming.image_program(spec, data)),
          ("text_embedding", tokens)]


def prompts(data_cfg, spec: dict) -> tuple[list[str], list[list[str]]]:
  """``(class names [C], prompts [C][T])`` of a zero-shot spec.

  ``classes="source"``: the dataset's class names with its held-out caption templates
  (``templates="source"``); ``classes="imagenet"``: the 1,000 names of CLIP's ImageNet
  evaluation in tfds ``imagenet2012`` label order (also the label space of tfds
  ``imagenet_v2``, ``imagenet_sketch``, ``imagenet_r`` and ``imagenet_a``), with
  ``templates="clip"`` (the 80 templates) or a tuple of format strings such as
  ``("a photo of a {}.",)``. ``wnids``: score only these classes, labels mapped into the
  subset: ``"imagenet_r"`` / ``"imagenet_a"`` (the 200 classes of each, shipped in
  ``data/imagenet_subsets.json``) or a tuple of WordNet ids.
  """
  classes, templates = spec["classes"], spec["templates"]
  if classes == "source":
    if templates == "source":
      p = pipeline.class_prompts(data_cfg, templates="eval")
      return p["class_names"], p["prompts"]
    names = pipeline.class_prompts(data_cfg, templates="eval")["class_names"]
  elif classes == "imagenet":
    names = class_names_lib.imagenet_class_names()
    if spec.get("wnids"):
      names = class_names_lib.wnid_subset(spec["wnids"])[0]
  else:
    raise ConfigError(f"zero-shot classes={classes!r} is unknown; use 'source' or 'imagenet'")
  if templates == "clip":
    templates = class_names_lib.imagenet_templates()
  elif isinstance(templates, str):
    raise ConfigError(f"zero-shot templates={templates!r} is unknown; use 'source' (with "
                      "classes='source'), 'clip' or a tuple of strings with '{}'")
  for t in templates:
    if "{}" not in t:
      raise ConfigError(f"zero-shot template {t!r} has no '{{}}' for the class name")
  return list(names), [[t.format(n) for t in templates] for n in names]


def class_embeddings(encoders: streaming.Encoders, state, mesh: Mesh, tokenizer,
                     prompts: Sequence[Sequence[str]], batch_size: int) -> np.ndarray:
  """``[C, E]`` prompt-ensembled class embeddings; the ``C x T`` prompts split over hosts.

  Each process tokenizes and encodes its contiguous part of the flattened prompts (global
  batches over all devices), the embeddings are gathered once, and
  ``zero_shot.ensemble_class_embeddings`` averages the normalised template embeddings.
  """
  num_classes, num_templates = len(prompts), len(prompts[0])
  flat = [p for row in prompts for p in row]
  mine = np.array_split(np.arange(len(flat)), jax.process_count())[jax.process_index()]
  tokens = np.asarray(tokenizer.encode([flat[i] for i in mine]), np.int32)
  if tokens.shape[0] == 0:  # more processes than prompts: encode one dummy row, drop it
    tokens = np.zeros((1, tokenizer.encode(["x"]).shape[1]), np.int32)
  fn = encoders.get("text_embedding", mesh)
  emb = feature_lib.extract_features(lambda s, t: fn(s, t), tokens, mesh=mesh,
                                     batch_size=batch_size, variables=state)[:len(mine)]
  emb = streaming.allgather_rows(emb)
  return zero_shot_lib.ensemble_class_embeddings(emb.reshape(num_classes, num_templates, -1))


def run(ctx: streaming.Context, state, spec: dict):
  data = ctx.data(spec)
  names, class_prompts = prompts(data, spec)
  tokenizer = pipeline.make_tokenizer(data)
  key = ("classes", json.dumps(class_prompts), data.tokenizer, data.spm_model,
         int(data.context_length), spec["batch_size"])
  if key not in ctx.cache:
    ctx.cache[key] = class_embeddings(ctx.encoders, state, ctx.mesh, tokenizer, class_prompts,
                                      spec["batch_size"])
  classes = ctx.cache[key]
  local = streaming.encode_split(ctx.encoders, state, ctx.mesh, data, data.eval_split,
                                 spec["batch_size"], [("emb", "image_embedding", "image")])
  labels = local["label"]
  if spec["wnids"]:  # a class subset (ImageNet-R/-A): labels into the subset's indices
    _, label_map = class_names_lib.wnid_subset(spec["wnids"])
    labels = label_map[labels]
    if (labels < 0).any():
      raise ValueError(f"{int((labels < 0).sum())} images of {data.name}/{data.eval_split} "
                       "have labels outside the zero-shot wnids subset")
  ks = (1, 5) if len(names) > 5 else (1,)
  hits = np.zeros((len(ks),), np.int64)
  if len(labels):
    h = zero_shot_lib.zero_shot_hits(local["emb"], classes, labels, ks=ks)
    hits = h.sum(axis=0).astype(np.int64)
  total = streaming.sum_over_processes(np.concatenate([hits, [len(labels)]]))
  return {f"top{k}": total[i] / total[-1] for i, k in enumerate(ks)}, None

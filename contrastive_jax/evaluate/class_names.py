"""ImageNet class names and prompt templates for zero-shot evaluation as CLIP reports it.

Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision",
Sec. 3.1.4 and Appendix: zero-shot ImageNet accuracy uses 1,000 curated, human-readable class
names (not the WordNet synset names) and an ensemble of 80 prompt templates. Both are data,
kept in ``data/imagenet_clip_prompts.json``: transcribed from the prompt-engineering notebook
OpenAI released with CLIP (MIT licence, Copyright (c) 2021 OpenAI), as packaged in open_clip's
``zero_shot_metadata.py`` (MIT licence). The file also holds the WordNet ids of tfds
``imagenet2012`` (its ``labels.txt``, which ``imagenet_v2``, ``imagenet_r``, ``imagenet_a`` and
``imagenet_sketch`` share): ``class_names[i]`` names label ``i``.

The released list names two pairs of synsets identically ("missile" for n03773504 and
n04008634, "sunglasses" for n04355933 and n04356056), so it has 998 distinct strings; it is
kept as released, since that is the list the reported numbers were computed with.

ImageNet-R (Hendrycks et al. 2021, "The Many Faces of Robustness") and ImageNet-A (Hendrycks
et al. 2021, "Natural Adversarial Examples") cover 200 of the 1,000 classes each; tfds labels
them in the 1,000-class space (their ``label`` is a ``ClassLabel`` over imagenet2012's
``labels.txt``). Their papers (and open_clip) score only those 200 classes. The two lists of
WordNet ids are data, in ``data/imagenet_subsets.json``: transcribed from the authors' eval
scripts (github.com/hendrycks/imagenet-r and github.com/hendrycks/natural-adv-examples,
``eval.py``; each list matched against a second form in the same script, the 1k indices),
in ImageNet label order. ``subset_wnids("imagenet_r")`` returns one; ``wnid_subset`` selects
the names of a subset and ``label_map`` maps 1,000-class labels onto it.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence

import numpy as np
from etils import epath

_FILE = epath.resource_path("contrastive_jax") / "evaluate" / "data" / "imagenet_clip_prompts.json"


_SUBSETS_FILE = _FILE.parent / "imagenet_subsets.json"
SUBSETS = ("imagenet_r", "imagenet_a")


@functools.lru_cache(maxsize=None)
def _load() -> dict:
  return json.loads(_FILE.read_text())


@functools.lru_cache(maxsize=None)
def _load_subsets() -> dict:
  return json.loads(_SUBSETS_FILE.read_text())


def subset_wnids(wnids: str | Sequence[str]) -> tuple[str, ...]:
  """The WordNet ids of a named subset (``"imagenet_r"``, ``"imagenet_a"``: 200 each, in
  ImageNet label order), or ``wnids`` itself when it is a sequence of ids."""
  if isinstance(wnids, str):
    if wnids not in SUBSETS:
      raise ValueError(f"wnids={wnids!r} is not a known subset; use one of {SUBSETS} or a "
                       "tuple of WordNet ids")
    return tuple(_load_subsets()[wnids])
  return tuple(wnids)


def imagenet_class_names() -> list[str]:
  """The 1,000 class names of CLIP's ImageNet evaluation, in tfds ``imagenet2012`` label order."""
  return list(_load()["class_names"])


def imagenet_templates() -> list[str]:
  """CLIP's 80 ImageNet prompt templates, ``"{}"`` standing for the class name."""
  return list(_load()["templates"])


def imagenet_wnids() -> list[str]:
  """The WordNet ids of the 1,000 classes in tfds label order (``n01440764``, ...)."""
  return list(_load()["wnids"])


def wnid_subset(wnids: str | Sequence[str]) -> tuple[list[str], np.ndarray]:
  """``(names [S], label_map [1000] int)`` for a class subset given by WordNet ids or a subset
  name (``subset_wnids``): ``label_map[label]`` is the subset index of a 1,000-class label, -1
  outside the subset."""
  wnids = subset_wnids(wnids)
  if len(set(wnids)) != len(wnids):
    raise ValueError(f"wnids has repeated ids: {sorted({w for w in wnids if wnids.count(w) > 1})}")
  all_ids = imagenet_wnids()
  where = {w: i for i, w in enumerate(all_ids)}
  missing = [w for w in wnids if w not in where]
  if missing:
    raise ValueError(f"wnids {missing[:5]} are not ImageNet-1k classes")
  names = imagenet_class_names()
  label_map = np.full((len(all_ids),), -1, np.int64)
  label_map[[where[w] for w in wnids]] = np.arange(len(wnids))
  return [names[where[w]] for w in wnids], label_map

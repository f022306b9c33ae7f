"""A real (not mocked) tfds dataset of random 8x8 RGB images for the streaming tests.

``tfds.testing.mock_data`` makes up fresh examples for every sub-split it is asked for and
writes no files, so it cannot show which examples two processes read, nor a seek into files.
"""

from __future__ import annotations

import types

import numpy as np


def digits_builder_cls(class_name: str, num_examples: int, num_classes: int):
  """A tfds builder class named ``class_name`` (tfds name: its snake_case) with one ``train``
  split of ``num_examples`` distinct images, label ``i % num_classes``."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  def body(ns):
    ns["VERSION"] = tfds.core.Version("1.0.0")
    ns["__doc__"] = f"{num_examples} random 8x8 PNG images, {num_classes} classes."

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(8, 8, 3)),
          "label": tfds.features.ClassLabel(num_classes=num_classes)}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      rng = np.random.default_rng(0)
      for i in range(num_examples):
        yield i, {"image": rng.integers(0, 256, (8, 8, 3), dtype=np.uint8),
                  "label": i % num_classes}

    ns.update(_info=_info, _split_generators=_split_generators,
              _generate_examples=_generate_examples)

  return types.new_class(class_name, (tfds.core.GeneratorBasedBuilder,),
                         {"skip_registration": True}, body)

"""SentencePiece for real: a model trained here by the ``sentencepiece`` trainer, and the
tokenizer's numpy and tf.data paths checked against the package's own encoder."""

from __future__ import annotations

import io

import numpy as np
import pytest
import sentencepiece as spm
import tensorflow as tf

from contrastive_jax.data import tokenizer as T

CORPUS = [
    "a photo of a dog", "a photo of a cat", "a blurry photo of the number seven",
    "two dogs playing in the snow", "a close-up photo of a red car on the street",
    "an origami crane", "a sketch of a bicycle", "the number three, written by hand",
    "Une photo d'un chat noir", "ein Foto von einem Hund", "猫の写真", "a photo of a café",
] * 20
CAPTIONS = [
    "a photo of a dog", "", "   leading and trailing spaces   ", "UPPER case and MiXeD",
    "punctuation!?,.;:'\"()[]{}", "unicode: café, naïve, 猫の写真, emoji 🐶",
    "numbers 1234567890 and symbols @#$%^&*", "tabs\tand\nnewlines",
    "a very long caption " * 30,  # truncated: SOT + 14 pieces + EOT
]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_writer=buf,
                                 vocab_size=48, model_type="unigram", character_coverage=1.0,
                                 minloglevel=2)
  path = tmp_path_factory.mktemp("spm") / "tiny.model"
  path.write_bytes(buf.getvalue())
  return str(path)


def _expected(proc, text, length):
  """The package's own ids, framed: SOT, ids + 3 truncated to L - 2, EOT, zero padding."""
  ids = [i + T.NUM_SPECIAL for i in proc.encode(text)][:length - 2]
  row = [T.SOT_ID, *ids, T.EOT_ID]
  return np.asarray(row + [T.PAD_ID] * (length - len(row)), np.int32)


@pytest.mark.parametrize("length", [16, 77])
def test_sentencepiece_ids_equal_the_package_encoder(model_path, length):
  proc = spm.SentencePieceProcessor(model_file=model_path)
  tok = T.make_tokenizer("sentencepiece", length, model_path)
  assert tok.vocab_size == proc.get_piece_size() + T.NUM_SPECIAL == 48 + 3
  expected = np.stack([_expected(proc, c, length) for c in CAPTIONS])
  assert (expected[-1] != T.PAD_ID).all() or length == 77  # the long caption is truncated
  np.testing.assert_array_equal(tok.encode(CAPTIONS), expected)
  # Inside tf.data, as the image-text pipeline maps it (parallel calls, batched).
  ds = tf.data.Dataset.from_tensor_slices(CAPTIONS).map(
      tok.tf_encode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).batch(4)
  got = np.concatenate([b.numpy() for b in ds])
  np.testing.assert_array_equal(got, expected)
  assert got.dtype == np.int32
  assert tok.decode(tok.encode("a photo of a dog")) == "a photo of a dog"


def test_sentencepiece_errors_name_the_fix(tmp_path):
  with pytest.raises(ValueError, match="spm_model"):
    T.make_tokenizer("sentencepiece", 16, str(tmp_path / "missing.model"))
  with pytest.raises(ValueError, match="spm_model"):
    T.make_tokenizer("sentencepiece", 16, "")
  bad = tmp_path / "bad.model"
  bad.write_bytes(b"not a model")
  with pytest.raises(Exception):
    T.make_tokenizer("sentencepiece", 16, str(bad)).encode("hello")

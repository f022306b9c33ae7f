"""Offline text tokenizers for the CLIP text tower (Radford et al. 2021, Sec. 2.4).

CLIP feeds a fixed-length sequence ``[SOT] tokens... [EOT] pad...`` and pools the text
transformer at the EOT position. We keep that contract with two vocabularies, both usable
without network access:

* ``ByteTokenizer`` (default): UTF-8 bytes. Ids: 0 = pad, 1 = SOT, 2 = EOT, byte ``b`` -> ``b + 3``;
  vocabulary 259. No merges, so it needs no vocabulary file and round-trips any text.
* ``SentencePieceTokenizer``: a user-supplied SentencePiece model (Kudo & Richardson 2018); piece
  ids are shifted by 3 so that 0/1/2 keep the same meaning (vocabulary = pieces + 3). Both the
  numpy and the tf.data side run the ``sentencepiece`` package's own encoder (pinned in
  requirements.txt); inside tf.data it is called through ``tf.numpy_function``, so the ids are
  exactly the package's. (``tensorflow_text`` would need the full ``tensorflow`` package,
  which this project does not install beside ``tensorflow-cpu``.)

Truncation keeps SOT and EOT: at most ``context_length - 2`` content tokens, so the EOT marker
(where the text tower pools) is always present. Each tokenizer has ``encode`` (numpy,
``[B, L] int32``), ``decode`` and ``tf_encode`` (graph ops, one scalar string -> ``[L] int32``,
for ``tf.data.Dataset.map``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tensorflow as tf

PAD_ID, SOT_ID, EOT_ID = 0, 1, 2
NUM_SPECIAL = 3


def _check_length(context_length: int) -> int:
  if int(context_length) < 2:
    raise ValueError(f"data.context_length={context_length} must be >= 2 (SOT and EOT)")
  return int(context_length)


def _frame(content: np.ndarray, context_length: int) -> np.ndarray:
  """SOT + content (truncated to L - 2) + EOT, padded with 0 to L."""
  out = np.zeros([context_length], np.int32)
  content = content[:context_length - 2]
  out[0] = SOT_ID
  out[1:1 + len(content)] = content
  out[1 + len(content)] = EOT_ID
  return out


def _tf_frame(content: tf.Tensor, context_length: int) -> tf.Tensor:
  content = tf.cast(content[:context_length - 2], tf.int32)
  seq = tf.concat([[SOT_ID], content, [EOT_ID]], axis=0)
  seq = tf.pad(seq, [[0, context_length - tf.shape(seq)[0]]])
  return tf.ensure_shape(seq, [context_length])


def _content(ids: np.ndarray) -> np.ndarray:
  """Ids between SOT and the first EOT (or pad), specials removed."""
  ids = np.asarray(ids).tolist()
  if ids and ids[0] == SOT_ID:
    ids = ids[1:]
  out = []
  for t in ids:
    if t in (EOT_ID, PAD_ID):
      break
    out.append(t)
  return np.asarray(out, np.int64)


class ByteTokenizer:
  """UTF-8 byte tokenizer: 0 pad, 1 SOT, 2 EOT, bytes 3..258; ``vocab_size`` 259."""

  vocab_size = 256 + NUM_SPECIAL

  def __init__(self, context_length: int = 77):
    self.context_length = _check_length(context_length)

  def encode(self, texts: str | Sequence[str]) -> np.ndarray:
    """``str`` -> ``[L] int32``; a list of strings -> ``[B, L] int32``."""
    single = isinstance(texts, (str, bytes))
    batch = [texts] if single else list(texts)
    out = np.stack([
        _frame(np.frombuffer(t if isinstance(t, bytes) else t.encode("utf-8"), np.uint8)
               .astype(np.int32) + NUM_SPECIAL, self.context_length)
        for t in batch]) if batch else np.zeros([0, self.context_length], np.int32)
    return out[0] if single else out

  def decode(self, ids) -> str | list[str]:
    ids = np.asarray(ids)
    if ids.ndim == 2:
      return [self.decode(row) for row in ids]
    content = _content(ids) - NUM_SPECIAL
    return bytes(content.astype(np.uint8).tolist()).decode("utf-8", errors="replace")

  def tf_encode(self, text: tf.Tensor) -> tf.Tensor:
    """Scalar ``tf.string`` -> ``[L] int32`` (graph ops, for tf.data)."""
    content = tf.cast(tf.io.decode_raw(text, tf.uint8), tf.int32) + NUM_SPECIAL
    return _tf_frame(content, self.context_length)


class SentencePieceTokenizer:
  """A user's SentencePiece model, ids shifted by 3 (0 pad, 1 SOT, 2 EOT reserved)."""

  def __init__(self, model_path: str, context_length: int = 77):
    self.context_length = _check_length(context_length)
    if not model_path:
      raise ValueError("data.tokenizer='sentencepiece' needs data.spm_model=<path to a "
                       ".model file>")
    if not tf.io.gfile.exists(model_path):
      raise ValueError(f"data.spm_model={model_path!r} does not exist; point it at a "
                       "SentencePiece .model file")
    with tf.io.gfile.GFile(model_path, "rb") as f:
      self._proto = f.read()
    self._np = None

  def _np_model(self):
    if self._np is None:
      try:
        import sentencepiece  # pylint: disable=g-import-not-at-top
      except ImportError as e:
        raise ImportError(
            "data.tokenizer='sentencepiece' needs the 'sentencepiece' package (pinned in "
            "requirements.txt: pip install -r requirements.txt), or use "
            "data.tokenizer='bytes'") from e
      self._np = sentencepiece.SentencePieceProcessor(model_proto=self._proto)
    return self._np

  @property
  def vocab_size(self) -> int:
    return int(self._np_model().get_piece_size()) + NUM_SPECIAL

  def encode(self, texts: str | Sequence[str]) -> np.ndarray:
    single = isinstance(texts, str)
    batch = [texts] if single else list(texts)
    out = np.stack([self._encode_one(t) for t in batch]) if batch else \
        np.zeros([0, self.context_length], np.int32)
    return out[0] if single else out

  def _encode_one(self, text: str | bytes) -> np.ndarray:
    """One text -> ``[L] int32``: SOT, pieces + 3 (truncated to L - 2), EOT, pad."""
    if isinstance(text, bytes):
      text = text.decode("utf-8", errors="replace")
    pieces = np.asarray(self._np_model().encode(text), np.int32) + NUM_SPECIAL
    return _frame(pieces, self.context_length)

  def decode(self, ids) -> str | list[str]:
    ids = np.asarray(ids)
    if ids.ndim == 2:
      return [self.decode(row) for row in ids]
    return self._np_model().decode((_content(ids) - NUM_SPECIAL).tolist())

  def tf_encode(self, text: tf.Tensor) -> tf.Tensor:
    """Scalar ``tf.string`` -> ``[L] int32``, by the same encoder as ``encode``."""
    self._np_model()  # fail here, when the pipeline is built, if the package is missing
    ids = tf.numpy_function(self._encode_one, [text], tf.int32, stateful=False)
    return tf.ensure_shape(ids, [self.context_length])


def make_tokenizer(kind: str = "bytes", context_length: int = 77,
                   spm_model: str | None = None, bpe_vocab: str | None = None):
  """Tokenizer from the data config's ``tokenizer``/``context_length``/``spm_model``/
  ``bpe_vocab`` (``clip_bpe``: OpenAI CLIP's BPE, ``data/clip_bpe.py``)."""
  if kind == "bytes":
    return ByteTokenizer(context_length)
  if kind == "sentencepiece":
    return SentencePieceTokenizer(spm_model, context_length)
  if kind == "clip_bpe":
    from contrastive_jax.data import clip_bpe  # pylint: disable=g-import-not-at-top
    return clip_bpe.ClipBPETokenizer(bpe_vocab or "", context_length)
  raise ValueError(f"data.tokenizer={kind!r} is unknown; use 'bytes', 'sentencepiece' or "
                   "'clip_bpe'")

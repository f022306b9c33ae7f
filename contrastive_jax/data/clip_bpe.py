"""OpenAI CLIP's byte-level BPE tokenizer (Radford et al. 2021, Sec. 2.4; Sennrich et al. 2016).

The same ids as open_clip's ``SimpleTokenizer`` for the same vocabulary file
(``bpe_simple_vocab_16e6.txt.gz``: a header line, then merges; the first 48,894 merges are
used), so that converted CLIP text towers see the tokens they were trained on:

1. clean-up: ``ftfy.fix_text``, HTML entities unescaped (twice), runs of whitespace collapsed to
   one space, stripped, lower-cased;
2. pre-tokenisation by the regular expression ``'s|'t|'re|'ve|'m|'ll|'d|\\p{L}+|\\p{N}|
   [^\\s\\p{L}\\p{N}]+`` (case-insensitive; the ``regex`` package, for the Unicode classes);
3. each piece's UTF-8 bytes mapped to printable characters (GPT-2's byte-to-unicode table),
   ``</w>`` appended to the last character, and pairs merged by rank until none is left;
4. ``<start_of_text>`` (49406), the ids, ``<end_of_text>`` (49407), zero padding to
   ``context_length``; a longer text keeps its first ``context_length - 2`` ids (open_clip
   truncates to 77 and overwrites the last with ``<end_of_text>``: the same ids).

The literal strings ``<start_of_text>`` and ``<end_of_text>`` in a text are the special tokens
(49406, 49407), not the characters ``<``, ``start``, ...: open_clip's pre-tokeniser matches them
first and its BPE cache is seeded with them, so a caption that contains them gets those ids.

EOT is the largest id, so the text tower's argmax pooling (``eot_id=None``) and pooling at the
first ``eot_id=49407`` agree. The vocabulary is read from the file the user gives
(``data.bpe_vocab``), or, when that is empty, from an installed ``open_clip`` package, which
ships it; it is not part of this repository. ``ftfy`` and ``regex`` are needed only for this
tokenizer (``pip install ftfy regex``).
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.util
import os
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

NUM_MERGES = 49152 - 256 - 2  # the merges open_clip reads (lines 1..48894 of the file)
SOT_TOKEN, EOT_TOKEN = "<start_of_text>", "<end_of_text>"


@functools.lru_cache(None)
def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's reversible map from the 256 bytes to printable unicode characters: printable
  Latin-1 bytes map to themselves, the others to 256, 257, ... in byte order."""
  keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
  chars, n = list(keep), 0
  for b in range(256):
    if b not in keep:
      keep.append(b)
      chars.append(256 + n)
      n += 1
  return dict(zip(keep, map(chr, chars)))


def default_vocab_path() -> str:
  """The vocabulary file shipped inside an installed open_clip package, or ''."""
  spec = importlib.util.find_spec("open_clip")
  if spec is None or not spec.submodule_search_locations:
    return ""
  path = os.path.join(list(spec.submodule_search_locations)[0], "bpe_simple_vocab_16e6.txt.gz")
  return path if os.path.exists(path) else ""


def _deps():
  try:
    import ftfy  # pylint: disable=g-import-not-at-top
    import regex  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("data.tokenizer='clip_bpe' needs the 'ftfy' and 'regex' packages "
                      "(pip install ftfy regex), for open_clip's text clean-up and Unicode "
                      "pre-tokenisation") from e
  return ftfy, regex


class ClipBPETokenizer:
  """``encode(texts) -> [B, L] int32`` (or ``[L]`` for one string), ``decode``, ``tf_encode``."""

  def __init__(self, vocab_path: str = "", context_length: int = 77):
    if int(context_length) < 2:
      raise ValueError(f"data.context_length={context_length} must be >= 2 (SOT and EOT)")
    self.context_length = int(context_length)
    path = vocab_path or default_vocab_path()
    if not path:
      raise ValueError("data.tokenizer='clip_bpe' needs data.bpe_vocab=<path to "
                       "bpe_simple_vocab_16e6.txt.gz> (or an installed open_clip package, "
                       "which ships it)")
    if not tf.io.gfile.exists(path):
      raise ValueError(f"data.bpe_vocab={path!r} does not exist")
    with tf.io.gfile.GFile(path, "rb") as f:
      raw = f.read()
    text = gzip.decompress(raw).decode("utf-8") if path.endswith(".gz") else raw.decode("utf-8")
    merges = [tuple(line.split()) for line in text.split("\n")[1:NUM_MERGES + 1]]
    byte_chars = list(bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    vocab += [SOT_TOKEN, EOT_TOKEN]
    self.encoder = {t: i for i, t in enumerate(vocab)}
    self.decoder = {i: t for t, i in self.encoder.items()}
    self.byte_decoder = {c: b for b, c in bytes_to_unicode().items()}
    self.ranks = {m: i for i, m in enumerate(merges)}
    self.sot_id, self.eot_id = self.encoder[SOT_TOKEN], self.encoder[EOT_TOKEN]
    self.pad_id = 0
    self.vocab_size = len(vocab)
    # Seeded as open_clip seeds its cache: a special token is one symbol, never merged from
    # its characters (its pre-token is already ASCII, so byte mapping leaves it unchanged).
    self._cache: dict[str, str] = {SOT_TOKEN: SOT_TOKEN, EOT_TOKEN: EOT_TOKEN}
    ftfy, regex = _deps()
    self._ftfy = ftfy
    self._pattern = regex.compile(
        r"""<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
        r"""[^\s\p{L}\p{N}]+""", regex.IGNORECASE)
    self._regex = regex

  def clean(self, text: str) -> str:
    text = self._ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return self._regex.sub(r"\s+", " ", text).strip().lower()

  def bpe(self, token: str) -> str:
    """Space-separated merged symbols of one pre-token (already byte-mapped)."""
    if token in self._cache:
      return self._cache[token]
    word = list(token[:-1]) + [token[-1] + "</w>"]
    while len(word) > 1:
      pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
      best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
      if best not in self.ranks:
        break
      merged, i = [], 0
      while i < len(word):
        if i < len(word) - 1 and (word[i], word[i + 1]) == best:
          merged.append(word[i] + word[i + 1])
          i += 2
        else:
          merged.append(word[i])
          i += 1
      word = merged
    out = " ".join(word)
    self._cache[token] = out
    return out

  def ids(self, text: str) -> list[int]:
    """The content ids of ``text`` (no SOT/EOT, no truncation)."""
    table = bytes_to_unicode()
    out: list[int] = []
    for piece in self._pattern.findall(self.clean(text)):
      piece = "".join(table[b] for b in piece.encode("utf-8"))
      out.extend(self.encoder[s] for s in self.bpe(piece).split(" "))
    return out

  def _encode_one(self, text: str | bytes) -> np.ndarray:
    if isinstance(text, bytes):
      text = text.decode("utf-8", errors="replace")
    content = self.ids(text)[:self.context_length - 2]
    out = np.zeros([self.context_length], np.int32)
    out[0], out[1:1 + len(content)], out[1 + len(content)] = self.sot_id, content, self.eot_id
    return out

  def encode(self, texts: str | Sequence[str]) -> np.ndarray:
    single = isinstance(texts, (str, bytes))
    batch = [texts] if single else list(texts)
    out = (np.stack([self._encode_one(t) for t in batch]) if batch
           else np.zeros([0, self.context_length], np.int32))
    return out[0] if single else out

  def decode(self, ids) -> str | list[str]:
    ids = np.asarray(ids)
    if ids.ndim == 2:
      return [self.decode(row) for row in ids]
    toks = []
    for i in ids.tolist()[1 if ids.size and ids[0] == self.sot_id else 0:]:
      if i == self.eot_id:
        break
      toks.append(self.decoder[i])
    text = "".join(toks)
    raw = bytearray(self.byte_decoder[c] for c in text)
    return raw.decode("utf-8", errors="replace").replace("</w>", " ").strip()

  def tf_encode(self, text: tf.Tensor) -> tf.Tensor:
    """Scalar ``tf.string`` -> ``[L] int32`` by the same Python encoder (``tf.numpy_function``)."""
    ids = tf.numpy_function(self._encode_one, [text], tf.int32, stateful=False)
    return tf.ensure_shape(ids, [self.context_length])

"""CLIP BPE tokenizer: the same ids as open_clip's ``SimpleTokenizer`` (the peer's own code) on
the vocabulary file open_clip ships; skipped when open_clip (and ftfy/regex) are absent."""

from __future__ import annotations

import numpy as np
import pytest

open_clip = pytest.importorskip("open_clip")
pytest.importorskip("ftfy")
pytest.importorskip("regex")

import tensorflow as tf  # noqa: E402

from contrastive_jax.data import clip_bpe, tokenizer as tok_lib  # noqa: E402

CAPTIONS = [
    "a photo of a cat.",
    "A Photo   of  a\tDOG!!\n",
    "",
    "Café déjà-vu: naïve façade, Straße & résumé — 東京タワー の 夜景 🌃🚀",
    "It's what they've said; we'll see, I'd think you're right & I'm sure.",
    "numbers 1234 and 3.14159, ½ and ², x=y+z*(w/2) #hashtag @user http://ex.com/a?b=c",
    "&amp;lt;b&amp;gt;html entities&lt;/b&gt; &quot;quoted&quot; âœ” mojibake",
    "supercalifragilisticexpialidocious antidisestablishmentarianism " * 3,
    " ".join(f"word{i}" for i in range(120)),  # longer than 77 tokens: truncated
    "Ελληνικά, русский текст, العربية, עברית, हिन्दी, 한국어",
]


# Special tokens written in the text, HTML entities, fullwidth forms, combining accents (NFC vs
# NFD) and truncation at the special tokens' boundary: where a re-implementation can drift.
SPECIAL_CAPTIONS = [
    "<start_of_text> literal special tokens <end_of_text>",
    "<START_OF_TEXT>Upper-case specials<End_Of_Text> and a <end_of_text><end_of_text> pair",
    "half <start_of_text without its bracket, <end_of_text>> one too many, <<start_of_text>",
    "tom &amp; jerry &lt;3 &#x1F431; &eacute;t&eacute; &nbsp;non-breaking&nbsp;space &bogus;",
    "ＦＵＬＬＷＩＤＴＨ　ｔｅｘｔ，ｗｉｔｈ　ｄｉｇｉｔｓ　１２３　ａｎｄ　ｐｕｎｃｔｕａｔｉｏｎ！",
    "cafe\u0301 vs caf\u00e9, n\u0303 vs \u00f1, a\u030a vs \u00e5, e\u0301\u0300 stacked",
    "<end_of_text> " * 80,  # special ids up to the end: truncated, the last overwritten by EOT
    "<start_of_text>" + " long caption" * 60,
]


@pytest.fixture(scope="module")
def tokenizers():
  ours = clip_bpe.ClipBPETokenizer(clip_bpe.default_vocab_path(), context_length=77)
  theirs = open_clip.tokenizer.SimpleTokenizer()
  return ours, theirs


def test_same_ids_as_open_clip(tokenizers):
  ours, theirs = tokenizers
  expected = theirs(CAPTIONS, context_length=77).numpy()
  got = ours.encode(CAPTIONS)
  assert got.dtype == np.int32 and got.shape == (len(CAPTIONS), 77)
  for caption, e, g in zip(CAPTIONS, expected, got):
    np.testing.assert_array_equal(g, e, err_msg=repr(caption))
  assert got[-2, -1] == ours.eot_id == 49407 and got[0, 0] == ours.sot_id == 49406
  assert ours.vocab_size == 49408
  assert ours.decode(got[0]) == "a photo of a cat ."


def test_special_tokens_and_hard_text_as_open_clip(tokenizers):
  ours, theirs = tokenizers
  got = ours.encode(SPECIAL_CAPTIONS)
  expected = theirs(SPECIAL_CAPTIONS, context_length=77).numpy()
  for caption, e, g in zip(SPECIAL_CAPTIONS, expected, got):
    np.testing.assert_array_equal(g, e, err_msg=repr(caption))
  # The example, spelled out: the literal tokens are the special ids.
  np.testing.assert_array_equal(got[0][:2], [49406, 49406])
  assert got[0][np.flatnonzero(got[0])[-2]] == 49407


def test_tf_data_and_make_tokenizer(tokenizers):
  ours, _ = tokenizers
  via_config = tok_lib.make_tokenizer("clip_bpe", 77, bpe_vocab=clip_bpe.default_vocab_path())
  ds = tf.data.Dataset.from_tensor_slices(CAPTIONS[:4]).map(via_config.tf_encode).batch(4)
  got = next(iter(ds.as_numpy_iterator()))
  np.testing.assert_array_equal(got, ours.encode(CAPTIONS[:4]))


def test_missing_vocab_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match="data.bpe_vocab"):
    clip_bpe.ClipBPETokenizer(str(tmp_path / "nope.txt.gz"))

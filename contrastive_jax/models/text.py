"""CLIP text transformer (Radford et al., 2021, Sec. 2.4; GPT-2-style, Radford et al., 2019).

Token embedding + learned positional embedding, pre-LN residual blocks with a causal attention
mask (position t attends to positions <= t only), final LayerNorm, and the features of the
end-of-text (EOT) token as the sequence representation ``[B, width]``.

EOT pooling. OpenAI CLIP takes the position of the largest token id, because its BPE vocabulary
gives EOT the largest id. Our tokenizer need not, so:
* ``eot_id`` given: the position of the FIRST occurrence of ``eot_id`` in each row (the last
  position when a row has none, i.e. a sequence truncated without EOT);
* ``eot_id=None``: ``argmax`` of the token ids (CLIP's rule; correct only when EOT has the
  largest id in the vocabulary).
Because of the causal mask, padding after EOT never influences the pooled features, so no
padding mask is needed.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from contrastive_jax.models.layers import LayerNormF32, Transformer, shard_batch

Dtype = Any


class TextTransformer(nn.Module):
  """``tokens [B, L] int -> [B, width]`` in ``dtype`` (``L <= context_length``).

  Attributes:
    vocab_size, context_length: size of the token and position tables.
    width, depth, num_heads: transformer size; ``mlp_dim`` defaults to ``4 * width``.
    eot_id: end-of-text id used for pooling (see the module docstring).
    ln_eps: LayerNorm epsilon (1e-5 in CLIP).
    activation: MLP nonlinearity (``quick_gelu`` reproduces OpenAI CLIP).
    dropout_rate, attention_dropout_rate, remat, scan, dtype, param_dtype: as for ``ViT``.
  Methods: ``__call__(tokens, train)`` (pooled) and ``token_features(tokens, train)``
  (``[B, L, width]`` per-position hidden states after the final LayerNorm).
  """
  vocab_size: int = 49_408
  context_length: int = 77
  width: int = 512
  depth: int = 12
  num_heads: int = 8
  mlp_dim: int | None = None
  eot_id: int | None = None
  ln_eps: float = 1e-5
  activation: str = "gelu"
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  remat: bool = False
  scan: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def feature_dim(self) -> int:
    return self.width

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.token_embed = nn.Embed(self.vocab_size, self.width,
                                embedding_init=nn.initializers.normal(0.02), **kw)
    self.pos_embedding = self.param("pos_embedding", nn.initializers.normal(0.01),
                                    (self.context_length, self.width), self.param_dtype)
    self.transformer = Transformer(self.depth, self.num_heads, self.mlp_dim or 4 * self.width,
                                   causal=True, activation=self.activation, ln_eps=self.ln_eps,
                                   dropout_rate=self.dropout_rate,
                                   attention_dropout_rate=self.attention_dropout_rate,
                                   remat=self.remat, scan=self.scan, **kw)
    self.ln_final = LayerNormF32(self.ln_eps, **kw)
    self.embed_dropout = nn.Dropout(self.dropout_rate)

  def token_features(self, tokens: jax.Array, train: bool = False) -> jax.Array:
    """``[B, L] int -> [B, L, width]``: hidden state of every position after ``ln_final``."""
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be [B, L] integer ids, got shape {tokens.shape}")
    length = tokens.shape[1]
    if length > self.context_length:
      raise ValueError(f"token length {length} exceeds context_length={self.context_length}; "
                       "tokenize with a shorter length or raise context_length")
    x = shard_batch(self.token_embed(tokens) + self.pos_embedding[:length].astype(self.dtype))
    x = self.embed_dropout(x, deterministic=not train)
    return self.ln_final(self.transformer(x, train))

  def eot_positions(self, tokens: jax.Array) -> jax.Array:
    """``[B, L] int -> [B] int32``: the pooled position of each row (module docstring)."""
    if self.eot_id is None:
      return jnp.argmax(tokens, axis=-1).astype(jnp.int32)
    is_eot = tokens == self.eot_id
    first = jnp.argmax(is_eot, axis=-1)
    return jnp.where(is_eot.any(-1), first, tokens.shape[1] - 1).astype(jnp.int32)

  def __call__(self, tokens: jax.Array, train: bool = False) -> jax.Array:
    x = self.token_features(tokens, train)
    idx = self.eot_positions(tokens)
    return shard_batch(jnp.take_along_axis(x, idx[:, None, None], axis=1)[:, 0])

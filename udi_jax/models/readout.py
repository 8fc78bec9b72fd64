"""The SRS read-out: one attention layer that pools a patch representation at a sampled point.

docs/method.md §2.4. For the patch tokens P (N, D) of one view and a weight row w over the N tokens:

    X = LN_pre(P);  Q, K, V = split(X W_qkv + b_qkv)
    q = sum_n w_n Q_n;   x = sum_n w_n X_n                     (the query and the residual)
    z = LN_post(x + proj(concat_h softmax(q_h K_h^T / sqrt(Dh)) V_h))

Rows are given sparsely, as J token indices and J weights per row: J=1 with weight 1 for the student
(one-hot at its own sampled token), J=4 bilinear neighbours for the teacher. A row of zero weights gives
q = 0, i.e. uniform attention, and x = 0: exactly the official value of an invalid row, whose attention
logits are filled with a constant. Parameter names follow the official keys `backbone.norm1.*` (pre-LN)
and `backbone.attn.{qkv, proj, norm}.*`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from udi_jax.models.vit import attend, attention_probabilities_and_output, dense, layer_norm


def gather_rows(tokens: jax.Array, idx: jax.Array, weights: jax.Array) -> jax.Array:
  """sum_j weights[r,s,j] * tokens[r, idx[r,s,j]]: tokens (R,N,C), idx/weights (R,S,J) -> (R,S,C)."""
  picked = jax.vmap(lambda t, i: t[i])(tokens, idx)   # (R,S,J,C)
  return jnp.einsum('rsjc,rsj->rsc', picked, weights.astype(tokens.dtype),
                    precision=jax.lax.Precision.HIGHEST)


class AttnReadout(nn.Module):
  """Attention part of the read-out; holds `qkv`, `proj` and the post-LN `norm` (torch `backbone.attn`)."""
  num_heads: int
  dtype: Any = jnp.float32
  kernel: str = 'auto'      # vit.ATTENTION_KERNELS

  @nn.compact
  def __call__(self, normed: jax.Array, idx: jax.Array, weights: jax.Array,
               return_attention: bool = False):
    rows, num_tokens, width = normed.shape
    head_dim = width // self.num_heads
    qkv = dense(3 * width, 'qkv', self.dtype)(normed).reshape(rows, num_tokens, 3, width)
    q_all, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    q = gather_rows(q_all, idx, weights).reshape(rows, -1, self.num_heads, head_dim)
    k = k.reshape(rows, num_tokens, self.num_heads, head_dim)
    v = v.reshape(rows, num_tokens, self.num_heads, head_dim)
    if return_attention:
      attn, out = attention_probabilities_and_output(q, k, v)
    else:
      attn, out = None, attend(q, k, v, self.kernel)
    out = out.reshape(rows, -1, width)
    residual = gather_rows(normed, idx, weights)
    readout = layer_norm('norm', self.dtype)(residual + dense(width, 'proj', self.dtype)(out))
    return (readout, attn) if return_attention else readout


class SRSReadout(nn.Module):
  """patch tokens (R, N, D) before the ViT's final norm, idx/weights (R, S, J) -> read-outs (R, S, D),
  and with `return_attention` also the attention (R, H, S, N) of each read-out point."""
  num_heads: int
  dtype: Any = jnp.float32
  kernel: str = 'auto'      # vit.ATTENTION_KERNELS

  @nn.compact
  def __call__(self, patch_tokens: jax.Array, idx: jax.Array, weights: jax.Array,
               return_attention: bool = False):
    normed = layer_norm('norm1', self.dtype)(patch_tokens.astype(self.dtype))
    return AttnReadout(self.num_heads, self.dtype, self.kernel, name='attn')(normed, idx, weights, return_attention)

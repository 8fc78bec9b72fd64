"""The DINO projection head shared by z_cls, z_cls+ and the read-outs (docs/method.md §2.5).

    u = normalize(fc4(gelu(fc2(gelu(fc0(x))))))                 bottleneck, L2-normalised (eps 1e-12)
    logits = W u,   W_k = g_k v_k / ||v_k||                     weight-normed, bias-free

The last layer is linear and bias-free, which is what lets the objective blend targets in the bottleneck
space (docs/method.md §8.6); `embed` and `project` expose the two halves. Parameters: `mlp_0`, `mlp_2`, `mlp_4`
(torch `mlp.0/2/4`) and `last_layer/{weight_v (bottleneck, K), weight_g (1, K)}`. With
`norm_last_layer=True`, g is fixed at 1 and is not a parameter (torch sets requires_grad=False).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from udi_jax.models.vit import dense

L2_EPS = 1e-12


def l2_normalize(x: jax.Array) -> jax.Array:
  """torch.nn.functional.normalize: x / max(||x||, eps)."""
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
  return x / jnp.maximum(norm, L2_EPS)


class WeightNormLinear(nn.Module):
  """Bias-free Linear(bottleneck -> K) under torch `weight_norm` (dim 0), kept in float32."""
  out_dim: int
  norm_last_layer: bool

  @nn.compact
  def __call__(self, u: jax.Array) -> jax.Array:
    in_dim = u.shape[-1]
    bound = 1.0 / np.sqrt(in_dim)   # torch's default Linear init, applied after DINO's custom init
    v = self.param('weight_v', lambda k, s: jax.random.uniform(k, s, jnp.float32, -bound, bound),
                   (in_dim, self.out_dim))
    weight = v / jnp.sqrt(jnp.sum(jnp.square(v), axis=0, keepdims=True))
    if not self.norm_last_layer:
      weight = weight * self.param('weight_g', nn.initializers.ones, (1, self.out_dim))
    return jnp.dot(u.astype(jnp.float32), weight, precision=jax.lax.Precision.HIGHEST)


class DINOHead(nn.Module):
  out_dim: int = 65536
  hidden_dim: int = 2048
  bottleneck_dim: int = 256
  norm_last_layer: bool = False
  dtype: Any = jnp.float32

  def setup(self):
    self.mlp_0 = dense(self.hidden_dim, 'mlp_0', self.dtype)
    self.mlp_2 = dense(self.hidden_dim, 'mlp_2', self.dtype)
    self.mlp_4 = dense(self.bottleneck_dim, 'mlp_4', self.dtype)
    self.last_layer = WeightNormLinear(self.out_dim, self.norm_last_layer)

  def embed(self, x: jax.Array) -> jax.Array:
    """(..., D) -> (..., bottleneck) L2-normalised, float32."""
    h = nn.gelu(self.mlp_0(x.astype(self.dtype)), approximate=False)
    h = nn.gelu(self.mlp_2(h), approximate=False)
    return l2_normalize(self.mlp_4(h).astype(jnp.float32))

  def project(self, u: jax.Array) -> jax.Array:
    """(..., bottleneck) -> (..., K) logits, float32."""
    return self.last_layer(u)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.project(self.embed(x))

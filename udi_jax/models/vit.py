"""Vision Transformer with several class tokens, named after the PyTorch (DINO/UDI/timm) keys.

docs/method.md §2.1–2.3. The sequence is `[cls_0 .. cls_{T-1}, patch_0 .. patch_{N-1}]`, positional rows for the
class tokens first, pre-norm blocks, LayerNorm eps 1e-6, exact GELU, fused qkv with bias.

Parameter tree (one tensor per PyTorch tensor, so that per-tensor clipping and export line up):
`cls_token (1,T,D)`, `pos_embed (1,T+N,D)`, `patch_embed/proj/{kernel (p,p,3,D), bias}`,
`blocks_{i}/{norm1, attn/{qkv, proj}, norm2, mlp/{fc1, fc2}}`, `norm`.

Drop path (stochastic depth) draws its per-sample masks from per-row PRNG keys handed in by the caller
(docs/design.md, contract 2), so a row's mask does not depend on the device that computes it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# Width, depth and heads of the standard sizes (patch 16, MLP ratio 4).
ARCHS = {
    'vit_tiny': dict(embed_dim=192, depth=12, num_heads=3),
    'vit_small': dict(embed_dim=384, depth=12, num_heads=6),
    'vit_base': dict(embed_dim=768, depth=12, num_heads=12),
    'vit_large': dict(embed_dim=1024, depth=24, num_heads=16),
}

LN_EPS = 1e-6
DType = Any

# trunc_normal_(std=.02) in DINO cuts at +-2 absolute, i.e. never: a plain normal.
_normal_init = nn.initializers.normal(stddev=0.02)


class LayerNorm(nn.Module):
  """LayerNorm over the last axis with the two-pass variance, as torch computes it (the one-pass
  E[x²]-E[x]² form drifts by ~1e-6): statistics and normalisation in float32, the output in `dtype`.
  The same parameters (`scale`, `bias`) and values as `nn.LayerNorm(use_fast_variance=False)` (tested),
  written out because XLA's CPU backend runs flax's form of it about 1.4x slower in the ViT's
  forward and backward pass (the backbone at ViT-S/16 shapes: 5.5 s against 3.9 s, `benchmarks/RESULTS.md`).
  Scale the inverse deviation before the centred input, as here: the other order compiles 4x slower in
  some programs."""
  epsilon: float = LN_EPS
  dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (width,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (width,), jnp.float32)
    x = x.astype(jnp.float32)
    centred = x - jnp.mean(x, -1, keepdims=True)
    variance = jnp.mean(jnp.square(centred), -1, keepdims=True)
    multiplier = jax.lax.rsqrt(variance + self.epsilon) * scale
    return (centred * multiplier + bias).astype(self.dtype)


def layer_norm(name: str, dtype: DType) -> LayerNorm:
  return LayerNorm(dtype=dtype, name=name)


def dense(features: int, name: str, dtype: DType, use_bias: bool = True) -> nn.Dense:
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, kernel_init=_normal_init,
                  bias_init=nn.initializers.zeros, name=name)


@functools.lru_cache(maxsize=None)
def torch_bicubic_matrix(in_size: int, out_tokens: int) -> np.ndarray:
  """(out_tokens, in_size) matrix of torch `interpolate(bicubic, scale_factor=(out+0.1)/in)`.

  docs/method.md §2.2: the source coordinate uses the scale factor, not the size ratio; cubic kernel A=-0.75;
  taps clamped to the border (weights of duplicates accumulate); no antialias. Computed in float32 as
  torch's CPU kernel does.
  """
  scale_factor = (out_tokens + 0.1) / in_size            # a Python double, as in the official call
  out_size = int(np.floor(in_size * scale_factor))
  assert out_size == out_tokens, (in_size, out_tokens)
  inv_scale = np.float32(1.0 / scale_factor)
  a = np.float32(-0.75)

  def near(x):   # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):    # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  matrix = np.zeros((out_tokens, in_size), np.float64)
  for d in range(out_tokens):
    src = inv_scale * (np.float32(d) + np.float32(0.5)) - np.float32(0.5)
    x0 = int(np.floor(src))
    t = np.float32(src - np.float32(x0))
    one = np.float32(1.0)
    coeffs = (far(t + one), near(t), near(one - t), far(one - t + one))
    for tap, w in enumerate(coeffs):
      matrix[d, min(max(x0 - 1 + tap, 0), in_size - 1)] += float(w)
  return matrix.astype(np.float32)


def resize_pos_embed(pos_embed: jax.Array, num_cls_tokens: int, grid_hw: tuple[int, int]) -> jax.Array:
  """Positional table (1, T+N0, D) for a grid of `grid_hw` tokens, with the official bicubic."""
  n0 = pos_embed.shape[1] - num_cls_tokens
  side = int(round(np.sqrt(n0)))
  assert side * side == n0, 'the positional table must hold a square grid'
  if grid_hw == (side, side):
    return pos_embed
  cls_rows, patch_rows = pos_embed[:, :num_cls_tokens], pos_embed[:, num_cls_tokens:]
  grid = patch_rows.reshape(side, side, -1).astype(jnp.float32)
  rows = jnp.asarray(torch_bicubic_matrix(side, grid_hw[0]))
  cols = jnp.asarray(torch_bicubic_matrix(side, grid_hw[1]))
  hi = jax.lax.Precision.HIGHEST
  resized = jnp.einsum('ha,abd,wb->hwd', rows, grid, cols, precision=hi)
  resized = resized.reshape(1, grid_hw[0] * grid_hw[1], -1).astype(pos_embed.dtype)
  return jnp.concatenate([cls_rows, resized], axis=1)


def drop_path(x: jax.Array, rate: float, row_keys: Optional[jax.Array], salt: int) -> jax.Array:
  """Per-sample stochastic depth: keep a row with prob 1-rate and scale it by 1/(1-rate)."""
  if row_keys is None or rate == 0.0:
    return x
  keep_prob = 1.0 - rate
  keep = jax.vmap(lambda k: jax.random.bernoulli(jax.random.fold_in(k, salt), keep_prob))(row_keys)
  scale = jnp.where(keep, 1.0 / keep_prob, 0.0).astype(x.dtype)
  return x * scale.reshape((-1,) + (1,) * (x.ndim - 1))


# Attention kernels (config.model.attention). 'einsum' is the straightforward form, and the one that can
# return the probabilities; 'xla' is jax.nn.dot_product_attention's XLA form (softmax in float32, logits
# accumulated in float32 for bf16); 'cudnn' is cuDNN's flash attention (NVIDIA GPUs, bf16/fp16, head dim
# a multiple of 8 up to 128); 'auto' takes cuDNN where it applies and XLA elsewhere.
ATTENTION_KERNELS = ('auto', 'xla', 'cudnn', 'einsum')


def cudnn_unfit_reason(dtype: DType, head_dim: int) -> Optional[str]:
  """Why cuDNN flash attention cannot run here with this compute dtype and head width, or None."""
  if jax.default_backend() != 'gpu':
    return f'the backend is {jax.default_backend()}, not an NVIDIA GPU'
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return f'the compute dtype is {jnp.dtype(dtype).name}, and cuDNN flash attention takes bfloat16 or float16'
  if head_dim % 8 or head_dim > 128:
    return f'the head width is {head_dim}, and cuDNN flash attention takes multiples of 8 up to 128'
  return None


def attend(q: jax.Array, k: jax.Array, v: jax.Array, kernel: str) -> jax.Array:
  """softmax(q k^T / sqrt(Dh)) v per head: q (B,T,H,Dh), k and v (B,S,H,Dh) -> (B,T,H,Dh)."""
  if kernel not in ATTENTION_KERNELS:
    raise ValueError(f'config.model.attention={kernel!r} is not a kernel; use one of {ATTENTION_KERNELS}.')
  if kernel == 'einsum':
    return attention_probabilities_and_output(q, k, v)[1]
  if kernel == 'xla':
    return jax.nn.dot_product_attention(q, k, v, implementation='xla')
  reason = cudnn_unfit_reason(q.dtype, q.shape[-1])
  if reason is None:
    try:
      return jax.nn.dot_product_attention(q, k, v, implementation='cudnn')
    except (NotImplementedError, RuntimeError) as e:   # a cuDNN too old for these shapes, or none found
      reason = f'cuDNN refused: {e}'
  if kernel == 'cudnn':
    raise ValueError(f"config.model.attention='cudnn' cannot be used: {reason}; use 'auto' (cuDNN where it "
                     "applies, XLA elsewhere) or 'xla'.")
  return jax.nn.dot_product_attention(q, k, v, implementation='xla')


def attention_probabilities_and_output(q: jax.Array, k: jax.Array, v: jax.Array):
  """The straightforward form: probabilities (B,H,T,S) in float32 and the output (B,T,H,Dh)."""
  logits = jnp.einsum('bqhd,bkhd->bhqk', q, k) * (q.shape[-1] ** -0.5)
  attn = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  return attn, jnp.einsum('bhqk,bkhd->bqhd', attn.astype(v.dtype), v)


class Attention(nn.Module):
  """Multi-head self-attention with a fused qkv projection (output layout [q | k | v], heads contiguous).

  Returns the output and, with `return_attention`, the probabilities (through the einsum form)."""
  num_heads: int
  dtype: DType = jnp.float32
  kernel: str = 'auto'
  return_attention: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, Optional[jax.Array]]:
    rows, length, width = x.shape
    head_dim = width // self.num_heads
    qkv = dense(3 * width, 'qkv', self.dtype)(x).reshape(rows, length, 3, self.num_heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if self.return_attention:
      attn, out = attention_probabilities_and_output(q, k, v)
    else:
      attn, out = None, attend(q, k, v, self.kernel)
    return dense(width, 'proj', self.dtype)(out.reshape(rows, length, width)), attn


class Mlp(nn.Module):
  hidden: int
  dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = nn.gelu(dense(self.hidden, 'fc1', self.dtype)(x), approximate=False)
    return dense(x.shape[-1], 'fc2', self.dtype)(h)


class Block(nn.Module):
  num_heads: int
  mlp_ratio: float
  drop_path_rate: float
  dtype: DType = jnp.float32
  attention: str = 'auto'
  return_attention: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, row_keys: Optional[jax.Array]) -> tuple[jax.Array, Optional[jax.Array]]:
    y, attn = Attention(self.num_heads, self.dtype, self.attention, self.return_attention,
                        name='attn')(layer_norm('norm1', self.dtype)(x))
    x = x + drop_path(y, self.drop_path_rate, row_keys, salt=0)
    y = Mlp(int(x.shape[-1] * self.mlp_ratio), self.dtype, name='mlp')(layer_norm('norm2', self.dtype)(x))
    x = x + drop_path(y, self.drop_path_rate, row_keys, salt=1)
    return x, attn


class PatchEmbed(nn.Module):
  patch_size: int
  embed_dim: int
  dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    # torch's Conv2d default init (kaiming-uniform, a=sqrt(5)) is U(+-1/sqrt(fan_in)), as is its bias.
    fan_in = 3 * self.patch_size ** 2
    bound = 1.0 / np.sqrt(fan_in)
    uniform = lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)
    tokens = nn.Conv(self.embed_dim, (self.patch_size, self.patch_size), strides=self.patch_size,
                     padding='VALID', dtype=self.dtype, kernel_init=uniform, bias_init=uniform,
                     name='proj')(images)
    return tokens.reshape(tokens.shape[0], -1, self.embed_dim)   # row-major: token a*F + c


@dataclasses.dataclass(frozen=True)
class ViTOutput:
  """What one backbone call returns. Shapes for R input rows, T class tokens, N patch tokens."""
  cls: jax.Array                          # (R, T, D) class tokens after the final norm
  patch: jax.Array                        # (R, N, D) last-block patch tokens BEFORE the final norm
  cls_blocks: Optional[jax.Array] = None  # (R, k, T, D) class tokens of the last k blocks, each normed
  attention: Optional[jax.Array] = None   # (R, H, T+N, T+N) last block's attention probabilities
  patch_blocks: Optional[jax.Array] = None  # (R, k, N, D) patch tokens of the last k blocks, each normed


jax.tree_util.register_dataclass(ViTOutput, data_fields=['cls', 'patch', 'cls_blocks', 'attention',
                                                         'patch_blocks'], meta_fields=[])


class VisionTransformer(nn.Module):
  """ViT backbone. `img_size` fixes the positional table; other input sizes are interpolated."""
  embed_dim: int = 384
  depth: int = 12
  num_heads: int = 6
  patch_size: int = 16
  mlp_ratio: float = 4.0
  num_cls_tokens: int = 2
  img_size: int = 224
  drop_path_rate: float = 0.0
  dtype: DType = jnp.float32
  remat: bool = False     # recompute each block's activations in the backward pass
  attention: str = 'auto'  # the kernel: one of ATTENTION_KERNELS

  @nn.compact
  def __call__(self, images: jax.Array, *, drop_path_keys: Optional[jax.Array] = None,
               return_last_blocks: int = 0, return_attention: bool = False,
               return_patch_blocks: int = 0) -> ViTOutput:
    """images (R, H, W, 3) normalised floats; drop_path_keys (R,) keys, or None for no drop path."""
    rows, height, width, _ = images.shape
    if height % self.patch_size or width % self.patch_size:
      raise ValueError(f'Image size {height}x{width} is not a multiple of the patch size '
                       f'{self.patch_size}; resize the crops to a multiple of it.')
    grid_hw = (height // self.patch_size, width // self.patch_size)
    side = self.img_size // self.patch_size
    cls_token = self.param('cls_token', _normal_init, (1, self.num_cls_tokens, self.embed_dim))
    pos_embed = self.param('pos_embed', _normal_init,
                           (1, self.num_cls_tokens + side * side, self.embed_dim))

    x = PatchEmbed(self.patch_size, self.embed_dim, self.dtype, name='patch_embed')(
        images.astype(self.dtype))
    x = jnp.concatenate([jnp.broadcast_to(cls_token, (rows,) + cls_token.shape[1:]).astype(x.dtype), x],
                        axis=1)
    x = x + resize_pos_embed(pos_embed, self.num_cls_tokens, grid_hw).astype(x.dtype)

    norm = layer_norm('norm', self.dtype)
    rates = np.linspace(0.0, self.drop_path_rate, self.depth) if self.depth > 1 else [0.0]
    block_keys = lambda i: (None if drop_path_keys is None
                            else jax.vmap(jax.random.fold_in, (0, None))(drop_path_keys, i))
    cls_blocks, patch_blocks = [], []
    attn = None
    block = nn.remat(Block) if self.remat else Block
    for i in range(self.depth):
      x, attn = block(self.num_heads, self.mlp_ratio, float(rates[i]), self.dtype, self.attention,
                      return_attention and i == self.depth - 1, name=f'blocks_{i}')(x, block_keys(i))
      if self.depth - i <= return_last_blocks:
        cls_blocks.append(norm(x[:, :self.num_cls_tokens]))
      if self.depth - i <= return_patch_blocks:
        patch_blocks.append(norm(x[:, self.num_cls_tokens:]))
    t = self.num_cls_tokens
    return ViTOutput(
        cls=norm(x[:, :t]),
        patch=x[:, t:],
        cls_blocks=jnp.stack(cls_blocks, axis=1) if return_last_blocks else None,
        attention=attn,
        patch_blocks=jnp.stack(patch_blocks, axis=1) if return_patch_blocks else None)


def vit(arch: str, **overrides) -> VisionTransformer:
  """A ViT of a named size ('vit_tiny' ... 'vit_large'); `overrides` set any field (tiny test models)."""
  if arch not in ARCHS:
    raise ValueError(f'Unknown ViT architecture {arch!r}; choose one of {sorted(ARCHS)}.')
  return VisionTransformer(**{**ARCHS[arch], **overrides})

"""The three networks of a UDI model (backbone, read-out, head) built from a config, and their params.

Params are a plain dict: `{'backbone': ..., 'readout': ..., 'head': ...}`; with `shared_head=False` the
head is replaced by `'heads': {level: ...}`, one per active level (docs/design.md, contract 5). Student and teacher
have the same structure. The read-out is absent without the patch branch (`include_patch=False`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from udi_jax.models.head import DINOHead
from udi_jax.models.readout import SRSReadout
from udi_jax.models.vit import ATTENTION_KERNELS, VisionTransformer, vit

LEVELS = ('cls', 'cls_plus', 'patch')      # docs/design.md, contract 5; also the official order of heads and centres
CLS, CLS_PLUS, PATCH = LEVELS
TOKEN_LEVELS = (CLS, CLS_PLUS)             # the level class token t is trained at: TOKEN_LEVELS[t]
Params = dict[str, Any]

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class Networks:
  backbone: VisionTransformer
  readout: Optional[SRSReadout]
  head: DINOHead
  shared_head: bool = True

  @property
  def levels(self) -> tuple[str, ...]:
    """Active levels: cls always; patch with the read-out; cls_plus with it and a second class token."""
    levels = [CLS]
    if self.readout is not None:
      if self.backbone.num_cls_tokens >= 2:
        levels.append(CLS_PLUS)
      levels.append(PATCH)
    return tuple(levels)

  def init(self, rng: jax.Array) -> Params:
    """Fresh params (float32). Use under `jax.eval_shape` for shapes without allocation."""
    k_backbone, k_readout, k_head = jax.random.split(rng, 3)
    size = self.backbone.img_size
    images = jnp.zeros((1, size, size, 3), jnp.float32)
    params = {'backbone': self.backbone.init(k_backbone, images)['params']}
    tokens = jnp.zeros((1, (size // self.backbone.patch_size) ** 2, self.backbone.embed_dim))
    if self.readout is not None:
      idx = jnp.zeros((1, 1, 1), jnp.int32)
      params['readout'] = self.readout.init(k_readout, tokens, idx, jnp.ones((1, 1, 1)))['params']
    init_head = lambda key: self.head.init(key, tokens[:, 0])['params']
    if self.shared_head:
      params['head'] = init_head(k_head)
    else:
      keys = jax.random.split(k_head, len(self.levels))
      params['heads'] = {level: init_head(k) for level, k in zip(self.levels, keys)}
    return params

  def head_params(self, params: Params, level: str) -> Params:
    return params['head'] if self.shared_head else params['heads'][level]

  def embed(self, params: Params, level: str, x: jax.Array) -> jax.Array:
    """Head bottleneck (L2-normalised, float32) of the level's head."""
    return self.head.apply({'params': self.head_params(params, level)}, x, method=DINOHead.embed)

  def _grouped(self, params: Params, inputs: dict, fn: Callable, dtype) -> dict:
    """fn(params, level, x) of several inputs {key: (level, x (..., C))}. Inputs of levels that share a
    head go through it in one call, their rows concatenated: fewer, larger matmuls and a smaller program."""
    groups = {}
    for key, (level, x) in inputs.items():
      groups.setdefault('shared' if self.shared_head else level, []).append((key, level, x))
    out = {}
    for members in groups.values():
      flat = [x.reshape(-1, x.shape[-1]).astype(dtype) for _, _, x in members]
      y = fn(params, members[0][1], jnp.concatenate(flat) if len(flat) > 1 else flat[0])
      ends = np.cumsum([f.shape[0] for f in flat])
      starts = np.concatenate([[0], ends[:-1]])
      for (key, _, x), start, end in zip(members, starts, ends):
        out[key] = y[start:end].reshape(x.shape[:-1] + y.shape[-1:])
    return out

  def embed_heads(self, params: Params, inputs: dict) -> dict:
    """Bottleneck vectors of {key: (level, x (..., D))}, through each level's head (shared: one call)."""
    return self._grouped(params, inputs, self.embed, self.head.dtype)

  def project_heads(self, params: Params, inputs: dict) -> dict:
    """Logits of {key: (level, u (..., Db))}, through each level's last layer (shared: one call)."""
    return self._grouped(params, inputs, self.project, jnp.float32)

  def apply_heads(self, params: Params, inputs: dict) -> dict:
    """Logits of {key: (level, x (..., D))}: embed, then project, one call per head."""
    return self._grouped(params, inputs, lambda p, level, x: self.project(p, level, self.embed(p, level, x)),
                         self.head.dtype)

  def project(self, params: Params, level: str, u: jax.Array) -> jax.Array:
    """Logits of the level's head from bottleneck vectors."""
    return self.head.apply({'params': self.head_params(params, level)}, u, method=DINOHead.project)


def build_networks(config) -> Networks:
  """Networks from `config.model`, `config.udi.include_patch` and the crop sizes of `config.data`."""
  model = config.model
  include_patch = config.udi.include_patch
  if model.dtype not in _DTYPES:
    raise ValueError(f'config.model.dtype={model.dtype!r} is not supported; use one of {sorted(_DTYPES)}.')
  if not include_patch and model.num_cls_tokens != 1:
    raise ValueError('config.udi.include_patch=False trains plain DINO, which has one class token; '
                     'set config.model.num_cls_tokens=1.')
  if model.num_cls_tokens not in (1, 2):
    raise ValueError(f'config.model.num_cls_tokens={model.num_cls_tokens} is not supported; use 1 or 2.')
  for name in ('global_size', 'local_size'):
    size = config.data[name]
    if size <= 0 or size % model.patch_size:
      raise ValueError(f'config.data.{name}={size} is not a multiple of config.model.patch_size='
                       f'{model.patch_size}; choose a multiple of it.')
  if model.attention not in ATTENTION_KERNELS:
    raise ValueError(f'config.model.attention={model.attention!r} is not supported; use one of '
                     f'{ATTENTION_KERNELS}.')
  dtype = _DTYPES[model.dtype]
  sizes = {k: model.get(k) for k in ('embed_dim', 'depth', 'num_heads') if model.get(k) is not None}
  backbone = vit(model.arch, patch_size=model.patch_size, num_cls_tokens=model.num_cls_tokens,
                 img_size=config.data.global_size, drop_path_rate=model.drop_path_rate, dtype=dtype,
                 remat=model.remat, attention=model.attention, **sizes)
  readout = None
  if include_patch:
    heads = model.srs_num_heads or backbone.num_heads
    if backbone.embed_dim % heads:
      raise ValueError(f'config.model.srs_num_heads={heads} does not divide the width '
                       f'{backbone.embed_dim}; choose a divisor of it (0 uses the backbone heads).')
    readout = SRSReadout(num_heads=heads, dtype=dtype, kernel=model.attention)
  head = DINOHead(out_dim=model.out_dim, hidden_dim=model.head_hidden_dim,
                  bottleneck_dim=model.head_bottleneck_dim, norm_last_layer=model.norm_last_layer,
                  dtype=dtype)
  return Networks(backbone, readout, head, shared_head=model.shared_head)

"""Pictures: last-layer attention of each class token, and read-out attention at sampled points.

Written as PNG files under `workdir/pictures/`:
- `attention_cls.png`: per image, the image and the last block's attention of token 0 (z_cls) to the
  patches, one panel per head; `attention_cls_plus.png` the same for token 1 (z_cls+);
- `readout_attention.png`: per image, a few stratified sample points (marked) and the SRS read-out's
  attention from each point over the patches (mean over heads).
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from udi_jax.data.photometric import preprocess
from udi_jax.method.sampling import stratified_cells
from udi_jax.models.networks import TOKEN_LEVELS


def _pyplot():
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  return plt


def class_token_attention(nets, backbone_params, images: np.ndarray) -> np.ndarray:
  """uint8 (B, S, S, 3) -> (B, T, heads, F, F): the last block's attention of each class token."""
  out = jax.jit(lambda p, x: nets.backbone.apply({'params': p}, preprocess(x), return_attention=True))(
      backbone_params, jnp.asarray(images))
  t = nets.backbone.num_cls_tokens
  grid = images.shape[1] // nets.backbone.patch_size
  attn = out.attention[:, :, :t, t:]                                   # (B, heads, T, N)
  return np.asarray(attn.transpose(0, 2, 1, 3).reshape(attn.shape[0], t, attn.shape[1], grid, grid))


def readout_attention(nets, params, images: np.ndarray, points: np.ndarray) -> np.ndarray:
  """Read-out attention (B, P, F, F) (mean over heads) from token indices `points` (B, P)."""
  def attention(params, images, idx):
    out = nets.backbone.apply({'params': params['backbone']}, preprocess(images))
    return nets.readout.apply({'params': params['readout']}, out.patch, idx, jnp.ones(idx.shape),
                              return_attention=True)[1]                 # (B, heads, P, N)

  attn = jax.jit(attention)(params, jnp.asarray(images), jnp.asarray(points, jnp.int32)[..., None])
  grid = images.shape[1] // nets.backbone.patch_size
  attn = attn.mean(1)
  return np.asarray(attn.reshape(attn.shape[0], attn.shape[1], grid, grid))


def _overlay_grid(plt, images, panels, titles, path):
  rows, cols = len(images), 1 + panels.shape[1]
  fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.6 * rows), squeeze=False)
  for r in range(rows):
    axes[r, 0].imshow(images[r])
    for c in range(panels.shape[1]):
      axes[r, c + 1].imshow(panels[r, c], cmap='inferno')
    for c in range(cols):
      axes[r, c].axis('off')
      if r == 0:
        axes[r, c].set_title(titles[c], fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def draw_attention(nets, params, images: np.ndarray, directory: pathlib.Path, seed: int = 0,
                   window: int = 3, points_per_image: int = 4) -> list[pathlib.Path]:
  """Attention pictures of `params` (one network: backbone, readout) on uint8 images (B, S, S, 3)."""
  plt = _pyplot()
  directory.mkdir(parents=True, exist_ok=True)
  written = []
  maps = class_token_attention(nets, params['backbone'], images)
  heads = maps.shape[2]
  for t in range(maps.shape[1]):
    path = directory / f'attention_{TOKEN_LEVELS[t]}.png'
    _overlay_grid(plt, images, maps[:, t], ['image'] + [f'{TOKEN_LEVELS[t]} head {h}' for h in range(heads)], path)
    written.append(path)
  if nets.readout is not None:
    grid = images.shape[1] // nets.backbone.patch_size
    keys = jax.random.split(jax.random.key(seed), len(images))
    cells = np.asarray(jax.jit(jax.vmap(lambda k: stratified_cells(k, grid, min(window, grid))))(keys))
    cells = cells[:, :points_per_image]
    attn = readout_attention(nets, params, images, cells)
    path = directory / 'readout_attention.png'
    patch = nets.backbone.patch_size
    marked = images.copy()
    for b, row in enumerate(cells):
      for cell in row:
        a, c = divmod(int(cell), grid)
        marked[b, a * patch:(a + 1) * patch, c * patch:(c + 1) * patch] = (255, 0, 0)
    _overlay_grid(plt, marked, attn, ['sampled points'] + [f'point {p}' for p in range(attn.shape[1])], path)
    written.append(path)
  return written

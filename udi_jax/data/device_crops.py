"""The crop geometry on the accelerator: the host decodes, the step cuts and resizes the crops.

Host (`config.data.crops_on` resolves to the device): each image is decoded (a large JPEG in the decoder's
draft mode), fitted into an S x S uint8 canvas (S = `config.data.canvas_size`; placed top-left, zero
padded; reduced only when its longer side exceeds S) and its crops are planned exactly as for host crops
(`crops.plan_crops`: the same generator, boxes and flips, docs/design.md, contract 2). The batch carries the
canvases and each crop's window in canvas pixels, `(top, left, height, width, flip)`: the box scaled by
the canvas reduction, which also records the image's valid extent.

Device (`cut`): each crop is resampled as the official code does on the host, the crop cut out and then
resized by PIL (bicubic, a = -0.5, the filter widened by the scale when reducing, taps outside the crop left
out and the rest renormalised), flipped if asked. One resize is two matrix products with per-crop weight
matrices (out x S), the horizontal pass first and rounded to uint8 between the passes, as PIL stores it.
The result is uint8, so the photometric ops that follow see what they see with host crops.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from udi_jax.data.crops import CropSettings, plan_crops

BICUBIC_A = -0.5       # PIL's (and torchvision's) bicubic
BICUBIC_SUPPORT = 2.0
# The resampling products carry 8-bit pixels with weights: TF32 on GPUs and 3-pass bf16 on TPUs keep them
# within a rounding step; one bf16 pass would not.
PRECISION = jax.lax.Precision.HIGH


def canvas_crops(image: Image.Image, rng: np.random.Generator, settings: CropSettings,
                 full_size: tuple[int, int] | None = None,
                 extent: tuple[float, float] | None = None) -> dict[str, np.ndarray]:
  """The host half of device crops for one image: {'pixels' (h,w,3) uint8: the image fitted to the canvas,
  'windows' (2+n_l, 5) in its pixels, 'boxes'}. When `image` was reduced before (a draft): `full_size`,
  the (width, height) to draw the boxes on, and `extent`, that full image's size in `image`'s pixels
  (`sources.Drafted`); by default both are `image`'s own size."""
  width, height = full_size or image.size
  extent_w, extent_h = extent or image.size
  if max(image.size) > settings.canvas_size:
    ratio = settings.canvas_size / max(image.size)
    fitted = image.resize((max(round(image.width * ratio), 1), max(round(image.height * ratio), 1)),
                          Image.Resampling.BICUBIC)     # PIL maps the whole image onto the whole result
    extent_w, extent_h = extent_w * fitted.width / image.width, extent_h * fitted.height / image.height
    image = fitted
  plan = plan_crops(rng, height, width, settings)
  scale_h, scale_w = extent_h / height, extent_w / width
  windows = np.asarray([(i * scale_h, j * scale_w, h * scale_h, w * scale_w, float(flip))
                        for (i, j, h, w), flip in zip(plan.windows, plan.flips)], np.float32)
  return {'pixels': np.asarray(image, np.uint8), 'windows': windows, 'boxes': plan.boxes}


def to_canvases(pixels: list[np.ndarray], canvas_size: int) -> np.ndarray:
  """(B, S, S, 3) uint8: each image top-left on a zero canvas (one allocation for the batch)."""
  canvases = np.zeros((len(pixels), canvas_size, canvas_size, 3), np.uint8)
  for canvas, image in zip(canvases, pixels):
    canvas[:image.shape[0], :image.shape[1]] = image
  return canvases


def _bicubic(x: jax.Array) -> jax.Array:
  x = jnp.abs(x)
  a = BICUBIC_A
  return jnp.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                   jnp.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))


def resize_weights(start: jax.Array, length: jax.Array, out_size: int, canvas_size: int) -> jax.Array:
  """(out_size, canvas_size) weights of PIL's bicubic resize of pixels [start, start + length) along one
  axis (PIL's `precompute_coeffs` on the cropped image, written in canvas coordinates)."""
  scale = length / out_size
  widen = jnp.maximum(scale, 1.0)
  support = BICUBIC_SUPPORT * widen
  centre = start + (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * scale
  x = jnp.arange(canvas_size, dtype=jnp.float32)
  first = jnp.maximum(jnp.floor(centre - support + 0.5), jnp.floor(start))
  last = jnp.minimum(jnp.floor(centre + support + 0.5), jnp.ceil(start + length - 1e-3))
  taps = (x[None, :] >= first[:, None]) & (x[None, :] < last[:, None])
  weights = jnp.where(taps, _bicubic((x[None, :] - centre[:, None] + 0.5) / widen), 0.0)
  total = jnp.sum(weights, axis=1, keepdims=True)
  return weights / jnp.where(total == 0, 1.0, total)


def _round_pixels(x: jax.Array) -> jax.Array:
  return jnp.clip(jnp.floor(x + 0.5), 0.0, 255.0)     # PIL: round half up, clip to 8 bits


def cut(canvas: jax.Array, windows: jax.Array, out_size: int) -> jax.Array:
  """uint8 (S, S, 3) canvas and (V, 5) windows -> uint8 (V, out, out, 3) crops."""
  size = canvas.shape[0]
  rows = jax.vmap(lambda w: resize_weights(w[0], w[2], out_size, size))(windows)        # (V, o, S)
  cols = jax.vmap(lambda w: resize_weights(w[1], w[3], out_size, size))(windows)
  pixels = canvas.astype(jnp.float32)
  wide = _round_pixels(jnp.einsum('hwc,vow->vhoc', pixels, cols, precision=PRECISION))
  out = _round_pixels(jnp.einsum('vph,vhoc->vpoc', rows, wide, precision=PRECISION)).astype(jnp.uint8)
  # The flip mirrors the finished crop, as the official transforms do (resize, then flip).
  return jnp.where(windows[:, 4, None, None, None] > 0.5, out[:, :, ::-1], out)


def cut_batch(canvas: jax.Array, windows: jax.Array, global_size: int, local_size: int
              ) -> tuple[jax.Array, jax.Array]:
  """(B,S,S,3) canvases and (B, 2+n_l, 5) windows -> uint8 global (B,2,g,g,3) and local (B,n_l,l,l,3)."""
  global_crops = jax.vmap(lambda c, w: cut(c, w[:2], global_size))(canvas, windows)
  local_crops = jax.vmap(lambda c, w: cut(c, w[2:], local_size))(canvas, windows)
  return global_crops, local_crops

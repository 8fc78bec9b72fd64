"""Photometric augmentation on the accelerator, inside the jitted step (docs/method.md §5.1).

Per crop, identical for every crop (no per-view asymmetry, unlike DINO):
1. with p 0.8 colour jitter: brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1, in random order;
2. grayscale with p 0.2 (3 channels kept);
3. with p 1/2 branch A: Gaussian blur with p 1/2 or 1 (chosen 50/50); else branch B: blur with p 0.1,
   then solarize (threshold 128) with p 0.2. The blur radius is U(0.1, 2), with PIL's radius semantics;
4. ImageNet mean/std normalisation.

Images travel as uint8 and are worked on as float32 in [0, 1] (no intermediate rounding). The ops follow
torchvision/PIL: greyscale is ITU-R 601 luma (0.299, 0.587, 0.114); contrast blends with the image's mean
luma; hue rotates in HSV; the blur is PIL's: three passes of an "extended box" whose fractional radius
gives a Gaussian of standard deviation `radius`, composed here into one separable kernel, edges
replicated. Every draw comes from the crop's own key (docs/design.md, contract 2).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LUMA = (0.299, 0.587, 0.114)
BLUR_PASSES = 3
_MAX_BOX_RADIUS = 2      # integer part of the box radius stays <= 1 for radius <= 2, plus the fraction


@dataclasses.dataclass(frozen=True)
class PhotometricSettings:
  jitter_prob: float = 0.8
  brightness: float = 0.4
  contrast: float = 0.4
  saturation: float = 0.2
  hue: float = 0.1
  grayscale_prob: float = 0.2
  blur_radius: tuple[float, float] = (0.1, 2.0)
  solarize_threshold: int = 128

  def __post_init__(self):
    if not 0 <= self.blur_radius[0] <= self.blur_radius[1] <= 2.0:
      raise ValueError(f'config.data.blur_radius={tuple(self.blur_radius)} is not supported; keep '
                       '0 <= min <= max <= 2 (the official range is (0.1, 2)).')

  @classmethod
  def from_config(cls, config) -> 'PhotometricSettings':
    return cls(blur_radius=tuple(config.data.blur_radius))


def luma(x: jax.Array) -> jax.Array:
  """(..., 3) -> (..., 1)."""
  return jnp.sum(x * jnp.asarray(LUMA, x.dtype), axis=-1, keepdims=True)


def brightness(x: jax.Array, factor) -> jax.Array:
  return jnp.clip(x * factor, 0.0, 1.0)


def contrast(x: jax.Array, factor) -> jax.Array:
  mean = jnp.mean(luma(x))
  return jnp.clip(factor * x + (1.0 - factor) * mean, 0.0, 1.0)


def saturation(x: jax.Array, factor) -> jax.Array:
  return jnp.clip(factor * x + (1.0 - factor) * luma(x), 0.0, 1.0)


def grayscale(x: jax.Array) -> jax.Array:
  return jnp.broadcast_to(luma(x), x.shape)


def _rgb_to_hsv(x):
  r, g, b = x[..., 0], x[..., 1], x[..., 2]
  maxc, minc = x.max(-1), x.min(-1)
  delta = maxc - minc
  safe_delta = jnp.where(delta > 0, delta, 1.0)
  s = jnp.where(maxc > 0, delta / jnp.where(maxc > 0, maxc, 1.0), 0.0)
  rc, gc, bc = (maxc - r) / safe_delta, (maxc - g) / safe_delta, (maxc - b) / safe_delta
  h = jnp.where(maxc == r, bc - gc, jnp.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
  h = jnp.where(delta > 0, jnp.mod(h / 6.0, 1.0), 0.0)
  return h, s, maxc


def _hsv_to_rgb(h, s, v):
  i = jnp.floor(h * 6.0)
  f = h * 6.0 - i
  i = jnp.mod(i, 6).astype(jnp.int32)
  p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
  choose = lambda *c: jnp.select([i == k for k in range(6)], c)
  return jnp.stack([choose(v, q, p, p, t, v), choose(t, v, v, q, p, p), choose(p, p, t, v, v, q)], -1)


def hue(x: jax.Array, shift) -> jax.Array:
  """Rotate the hue by `shift` turns (in [-0.5, 0.5])."""
  h, s, v = _rgb_to_hsv(x)
  return jnp.clip(_hsv_to_rgb(jnp.mod(h + shift, 1.0), s, v), 0.0, 1.0)


def solarize(x: jax.Array, threshold: int = 128) -> jax.Array:
  """PIL ImageOps.solarize: invert the values >= threshold (given on the 0..255 scale)."""
  return jnp.where(x * 255.0 >= threshold - 1e-3, 1.0 - x, x)


def pil_blur_kernel(radius) -> jax.Array:
  """1-D kernel of PIL's GaussianBlur(radius): 3 extended-box passes, composed. Length 6*R+1 (R = 2)."""
  sigma2 = radius * radius / BLUR_PASSES
  box_len = jnp.sqrt(12.0 * sigma2 + 1.0)
  whole = jnp.floor((box_len - 1.0) / 2.0)
  frac = (2 * whole + 1) * (whole * (whole + 1) - 3 * sigma2) / (6 * (sigma2 - (whole + 1) ** 2))
  offsets = jnp.arange(-_MAX_BOX_RADIUS, _MAX_BOX_RADIUS + 1)
  box = jnp.where(jnp.abs(offsets) <= whole, 1.0, jnp.where(jnp.abs(offsets) == whole + 1, frac, 0.0))
  box = box / (2 * (whole + frac) + 1)
  kernel = box
  for _ in range(BLUR_PASSES - 1):
    kernel = jnp.convolve(kernel, box, precision=jax.lax.Precision.HIGHEST)
  return kernel


def gaussian_blur(x: jax.Array, radius) -> jax.Array:
  """PIL GaussianBlur on one image (H, W, C), separable, edges replicated."""
  kernel = pil_blur_kernel(radius)
  half = (kernel.shape[0] - 1) // 2

  def along(img, axis):
    size = img.shape[axis]
    padded = jnp.pad(img, [(half, half) if a == axis else (0, 0) for a in range(img.ndim)], mode='edge')
    taps = [jax.lax.slice_in_dim(padded, k, k + size, axis=axis) for k in range(kernel.shape[0])]
    return sum(w * t for w, t in zip(kernel, taps))

  return along(along(x, 0), 1)


def draw_params(key: jax.Array, s: PhotometricSettings) -> dict[str, jax.Array]:
  """The random choices of one crop."""
  keys = jax.random.split(key, 10)
  u = lambda k, lo, hi: jax.random.uniform(k, (), jnp.float32, lo, hi)
  branch_a = jax.random.bernoulli(keys[6], 0.5)
  blur_prob = jnp.where(branch_a, jnp.where(jax.random.bernoulli(keys[7], 0.5), 0.5, 1.0), 0.1)
  return {
      'jitter': jax.random.bernoulli(keys[0], s.jitter_prob),
      'order': jax.random.permutation(keys[1], 4),
      'factors': jnp.stack([u(keys[2], 1 - s.brightness, 1 + s.brightness),
                            u(keys[3], 1 - s.contrast, 1 + s.contrast),
                            u(keys[4], 1 - s.saturation, 1 + s.saturation),
                            u(keys[5], -s.hue, s.hue)]),
      'grayscale': jax.random.bernoulli(keys[8], s.grayscale_prob),
      'blur': jax.random.uniform(jax.random.fold_in(keys[9], 0)) < blur_prob,
      'radius': u(jax.random.fold_in(keys[9], 1), *s.blur_radius),
      'solarize': jnp.logical_and(~branch_a, jax.random.bernoulli(jax.random.fold_in(keys[9], 2), 0.2)),
  }


def apply_params(image: jax.Array, p: dict[str, jax.Array], s: PhotometricSettings) -> jax.Array:
  """uint8 (H, W, 3) and the crop's choices -> float32 in [0, 1]."""
  x = image.astype(jnp.float32) / 255.0
  ops = (brightness, contrast, saturation, hue)

  def jitter_slot(slot, current):       # the op that `order` puts in this slot (a loop: compiled once)
    which = p['order'][slot]
    candidates = [op(current, p['factors'][k]) for k, op in enumerate(ops)]
    return jnp.select([which == k for k in range(4)], candidates)

  jittered = jax.lax.fori_loop(0, len(ops), jitter_slot, x)
  x = jnp.where(p['jitter'], jittered, x)
  x = jnp.where(p['grayscale'], grayscale(x), x)
  x = jnp.where(p['blur'], gaussian_blur(x, p['radius']), x)
  return jnp.where(p['solarize'], solarize(x, s.solarize_threshold), x)


def normalise(x: jax.Array) -> jax.Array:
  return (x - jnp.asarray(IMAGENET_MEAN, x.dtype)) / jnp.asarray(IMAGENET_STD, x.dtype)


def augment(images: jax.Array, keys: jax.Array, settings: PhotometricSettings | None = None) -> jax.Array:
  """uint8 crops (R, H, W, 3), keys (R,) -> augmented, normalised float32 crops."""
  settings = settings or PhotometricSettings()
  one = lambda image, key: normalise(apply_params(image, draw_params(key, settings), settings))
  return jax.vmap(one)(images, keys)


def preprocess(images: jax.Array) -> jax.Array:
  """uint8 -> normalised float32 without augmentation (evaluation)."""
  return normalise(images.astype(jnp.float32) / 255.0)

"""Small rotations and shifts of each crop on the accelerator, before the photometric ops (docs/method.md §5.1).

Not part of the released recipe (both ranges default to 0, and then the step skips this file's work):
they are for data where a flip changes the meaning but a small turn or shift does not, such as digits.
Each crop is turned by U(-d, d) degrees about its centre (positive: counter-clockwise, as PIL's
`Image.rotate`) and shifted by U(-t, t) of its side along each axis, sampled bilinearly; what comes from
outside the crop is black. The crop's box, and so its patch correspondences with the other views, stays
the unrotated one: for the small ranges meant here a token moves by less than a patch (docs/method.md §5.1).
Every draw comes from the crop's own key (docs/design.md, contract 2).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class GeometricSettings:
  rotation_degrees: float = 0.0     # each crop turned by U(-d, d) degrees
  translate_fraction: float = 0.0   # and shifted by U(-t, t) of its side, per axis

  def __post_init__(self):
    if not 0 <= self.rotation_degrees <= 180:
      raise ValueError(f'config.data.rotation_degrees={self.rotation_degrees} must lie in [0, 180] '
                       '(0 turns nothing, the released recipe).')
    if not 0 <= self.translate_fraction < 0.5:
      raise ValueError(f'config.data.translate_fraction={self.translate_fraction} must lie in [0, 0.5) '
                       '(a fraction of the crop side; 0 shifts nothing, the released recipe).')

  @property
  def active(self) -> bool:
    return self.rotation_degrees > 0 or self.translate_fraction > 0

  @classmethod
  def from_config(cls, config) -> 'GeometricSettings':
    return cls(rotation_degrees=float(config.data.rotation_degrees),
               translate_fraction=float(config.data.translate_fraction))


def draw_params(key: jax.Array, s: GeometricSettings) -> tuple[jax.Array, jax.Array]:
  """One crop's (angle in degrees, (dx, dy) as fractions of its side)."""
  k_angle, k_shift = jax.random.split(key)
  angle = jax.random.uniform(k_angle, (), jnp.float32, -s.rotation_degrees, s.rotation_degrees)
  shift = jax.random.uniform(k_shift, (2,), jnp.float32, -s.translate_fraction, s.translate_fraction)
  return angle, shift


def warp(image: jax.Array, angle: jax.Array, shift: jax.Array) -> jax.Array:
  """uint8 (H, W, C) turned by `angle` degrees about its centre, then moved by `shift` * (W, H) pixels.

  Each output pixel centre is mapped back into the input (the inverse transform) and read bilinearly;
  points outside the input read 0. The result is rounded back to uint8.
  """
  height, width = image.shape[:2]
  theta = jnp.deg2rad(angle)
  cos, sin = jnp.cos(theta), jnp.sin(theta)
  # Pixel centres, relative to the image centre, in (x right, y down) coordinates.
  y, x = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32) + 0.5 - height / 2,
                      jnp.arange(width, dtype=jnp.float32) + 0.5 - width / 2, indexing='ij')
  x, y = x - shift[0] * width, y - shift[1] * height
  # A counter-clockwise turn on screen (y down): the source of (x, y) is (x, y) turned clockwise.
  source_x = cos * x - sin * y + width / 2 - 0.5
  source_y = sin * x + cos * y + height / 2 - 0.5
  channels = [jax.scipy.ndimage.map_coordinates(image[..., c].astype(jnp.float32), [source_y, source_x],
                                                order=1, mode='constant', cval=0.0)
              for c in range(image.shape[-1])]
  return jnp.clip(jnp.round(jnp.stack(channels, axis=-1)), 0, 255).astype(jnp.uint8)


def augment(images: jax.Array, keys: jax.Array, settings: GeometricSettings) -> jax.Array:
  """uint8 crops (R, H, W, C), keys (R,) -> the crops turned and shifted, uint8."""
  return jax.vmap(lambda image, key: warp(image, *draw_params(key, settings)))(images, keys)


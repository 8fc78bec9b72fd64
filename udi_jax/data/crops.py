"""Multi-crop geometry on the host: crop boxes, flips, resize (docs/method.md §5.2, `RandomCropCoord`).

Crop 0 is a random-resized crop (scale (0.25, 1)); crop 1 is drawn relative to it and shifted toward it
so that the two overlap by about half the smaller extent per axis; the local crops use the same rule with
scale (0.05, 0.25) and, as reference, the official `_crop_intersection` of the two stored global boxes
(element-wise min of the top-left corners and max of the bottom-right ones). Each crop is flipped
horizontally with probability 1/2 and resized (bicubic, antialiased, as PIL) to its output size.

A box is `[i0, j0, i1, j1]` = [top/(H-1), left/(W-1), (top+h-1)/(H-1), (left+w-1)/(W-1)] in float32,
with j0 and j1 swapped for a flipped crop. All randomness comes from the NumPy generator handed in
(seeded per example by the pipeline, docs/design.md, contract 2).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image

RATIO = (3.0 / 4.0, 4.0 / 3.0)


@dataclasses.dataclass(frozen=True)
class CropSettings:
  global_size: int = 224
  local_size: int = 96
  num_local: int = 10
  global_scale: tuple[float, float] = (0.25, 1.0)
  local_scale: tuple[float, float] = (0.05, 0.25)
  flip_prob: float = 0.5
  fix_crop_width_bug: bool = True   # False reproduces udi_augmentation.py:264 (docs/method.md §8.5)
  canvas_size: int = 0              # > 0: the host only fits images in a canvas, the device cuts the crops

  def __post_init__(self):
    if self.num_local < 0:
      raise ValueError(f'config.data.num_local={self.num_local} must be 0 or more.')
    for name in ('global_scale', 'local_scale'):
      lo, hi = getattr(self, name)
      if not 0 < lo <= hi <= 1:
        raise ValueError(f'config.data.{name}={tuple(getattr(self, name))} must satisfy 0 < min <= max <= 1.')
    if not 0 <= self.flip_prob <= 1:
      raise ValueError(f'config.data.flip_prob={self.flip_prob} must lie in [0, 1].')
    if self.canvas_size < 0 or 0 < self.canvas_size < 2:
      raise ValueError(f'config.data.canvas_size={self.canvas_size} must be at least 2 pixels (the longest '
                       'image side to keep unreduced, e.g. 512 for ImageNet).')

  @classmethod
  def from_config(cls, config) -> 'CropSettings':
    data = config.data
    return cls(global_size=data.global_size, local_size=data.local_size, num_local=data.num_local,
               global_scale=tuple(data.global_scale), local_scale=tuple(data.local_scale),
               flip_prob=data.flip_prob, fix_crop_width_bug=data.fix_crop_width_bug,
               canvas_size=data.canvas_size if crops_on_device(config) else 0)


CROPS_ON = ('auto', 'host', 'device')


def crops_on_device(config) -> bool:
  """Whether `config.data.crops_on` puts the crop geometry on the accelerator: `auto` does on a GPU or
  TPU (the host then only decodes) and not on a CPU, where the "device" is the same cores (measured in
  docs/data.md)."""
  where = config.data.crops_on
  if where not in CROPS_ON:
    raise ValueError(f'config.data.crops_on={where!r} is not known; use one of {CROPS_ON}.')
  if where == 'auto':
    import jax
    return jax.default_backend() != 'cpu'
  return where == 'device'


def random_resized_box(rng: np.random.Generator, height: int, width: int,
                       scale: tuple[float, float]) -> tuple[int, int, int, int]:
  """(i, j, h, w) of torchvision's RandomResizedCrop: 10 tries, then a centre crop."""
  area = height * width
  log_ratio = (math.log(RATIO[0]), math.log(RATIO[1]))
  for _ in range(10):
    target_area = rng.uniform(*scale) * area
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
  in_ratio = width / height
  if in_ratio < min(RATIO):
    w, h = width, int(round(width / min(RATIO)))
  elif in_ratio > max(RATIO):
    h, w = height, int(round(height * max(RATIO)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def _shift(extent: int, size: int, ref_extent: int) -> float:
  """How far to move a crop of `size` toward a reference of `ref_extent`; `extent` = their union."""
  shift = extent - size - ref_extent if extent > size + ref_extent else 0
  smaller = min(ref_extent, size)
  if extent >= size + ref_extent - 0.5 * smaller:
    shift += 0.5 * smaller
  return shift


def box_relative_to(rng: np.random.Generator, height: int, width: int, scale: tuple[float, float],
                    ref_box: np.ndarray, fix_crop_width_bug: bool = True) -> tuple[int, int, int, int]:
  """(i, j, h, w) of a random crop moved toward `ref_box` (official `get_params_ref`)."""
  ri, rj, r_i1, r_j1 = (float(x) for x in np.asarray(ref_box, np.float32))
  ri, r_i1 = min(ri, r_i1), max(ri, r_i1)               # unflip
  rj, r_j1 = min(rj, r_j1), max(rj, r_j1)
  ri, rj = round(ri * (height - 1)), round(rj * (width - 1))
  r_i1, r_j1 = round(r_i1 * (height - 1)), round(r_j1 * (width - 1))
  rh, rw = r_i1 - ri, r_j1 - rj
  ri_c, rj_c = (r_i1 + ri) / 2, (r_j1 + rj) / 2

  i, j, h, w = random_resized_box(rng, height, width, scale)
  i1, j1 = i + h - 1, j + w - 1
  i_c, j_c = (i + i1) / 2, (j + j1) / 2
  union_h = max(i1, r_i1) - min(i, ri)
  # The official line uses the top row i where the left column j is meant.
  union_w = max(j1, r_j1) - (min(j, rj) if fix_crop_width_bug else min(i, rj))
  i += round((ri_c - i_c) / (abs(ri_c - i_c) + 1e-5) * _shift(union_h, h, rh))
  j += round((rj_c - j_c) / (abs(rj_c - j_c) + 1e-5) * _shift(union_w, w, rw))
  i = max(min(i, height - h), 0)
  j = max(min(j, width - w), 0)
  return i, j, h, w


def normalised_box(i: int, j: int, h: int, w: int, height: int, width: int, flip: bool) -> np.ndarray:
  box = np.asarray([i / (height - 1), j / (width - 1), (i + h - 1) / (height - 1), (j + w - 1) / (width - 1)],
                   np.float32)
  return box[[0, 3, 2, 1]] if flip else box


def union_reference(box_a: np.ndarray, box_b: np.ndarray) -> np.ndarray:
  """Official `_crop_intersection`: min of the stored top-left corners, max of the bottom-right ones."""
  return np.concatenate([np.minimum(box_a[:2], box_b[:2]), np.maximum(box_a[2:], box_b[2:])])


def cut(image: Image.Image, i: int, j: int, h: int, w: int, size: int, flip: bool) -> np.ndarray:
  """The crop's pixels resized to size x size (PIL bicubic, antialiased), flipped if asked: uint8.

  Cropped first, then resized, as torchvision's `resized_crop` in the official code: resizing the whole
  image over a `box` would let the filter read pixels beyond the crop's border (up to 96/255 apart on
  MNIST crops)."""
  out = image.crop((j, i, j + w, i + h)).resize((size, size), Image.Resampling.BICUBIC)
  if flip:
    out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  return np.asarray(out, np.uint8)


@dataclasses.dataclass(frozen=True)
class CropPlan:
  """Where the crops of one image lie: 2 global, then the local ones."""
  windows: list[tuple[int, int, int, int]]    # (i, j, h, w) in the image's pixels
  flips: list[bool]
  boxes: np.ndarray                           # (2 + n_l, 4) normalised boxes, as above


def plan_crops(rng: np.random.Generator, height: int, width: int, settings: CropSettings) -> CropPlan:
  """Draws every crop's box and flip from `rng` (the order of draws is part of docs/design.md, contract 2)."""
  s = settings
  windows, flips, boxes = [], [], []

  def add(ijhw):
    flips.append(bool(rng.random() < s.flip_prob))
    windows.append(ijhw)
    boxes.append(normalised_box(*ijhw, height, width, flips[-1]))

  add(random_resized_box(rng, height, width, s.global_scale))
  add(box_relative_to(rng, height, width, s.global_scale, boxes[0], s.fix_crop_width_bug))
  reference = union_reference(boxes[0], boxes[1])
  for _ in range(s.num_local):
    add(box_relative_to(rng, height, width, s.local_scale, reference, s.fix_crop_width_bug))
  return CropPlan(windows, flips, np.stack(boxes))


def multi_crop(image: Image.Image, rng: np.random.Generator, settings: CropSettings) -> dict[str, np.ndarray]:
  """2 global + n_l local crops of one RGB image: {'global' (2,Hg,Wg,3), 'local' (n_l,Hl,Wl,3), 'boxes'}."""
  width, height = image.size
  s = settings
  plan = plan_crops(rng, height, width, s)
  crops = [cut(image, *ijhw, s.global_size if v < 2 else s.local_size, flip)
           for v, (ijhw, flip) in enumerate(zip(plan.windows, plan.flips))]
  local = (np.stack(crops[2:]) if s.num_local
           else np.zeros((0, s.local_size, s.local_size, 3), np.uint8))
  return {'global': np.stack(crops[:2]), 'local': local, 'boxes': plan.boxes}

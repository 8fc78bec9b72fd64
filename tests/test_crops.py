"""Multi-crop geometry on the host (docs/method.md §5.2)."""

import numpy as np
import pytest
from PIL import Image

from udi_jax.data.crops import (
  CropSettings,
  box_relative_to,
  cut,
  multi_crop,
  normalised_box,
  random_resized_box,
  union_reference,
)


def pixel_extent(box, height, width):
  """[top, left, bottom, right) in pixels of a stored (possibly flipped) box."""
  i0, i1 = sorted((box[0], box[2]))
  j0, j1 = sorted((box[1], box[3]))
  return np.array([i0 * (height - 1), j0 * (width - 1), i1 * (height - 1) + 1, j1 * (width - 1) + 1])


def overlap_fraction(a, b):
  """Per axis: overlap / the smaller of the two extents."""
  over = np.minimum(a[2:], b[2:]) - np.maximum(a[:2], b[:2])
  return over / np.minimum(a[2:] - a[:2], b[2:] - b[:2])


def simulate(fix_bug, n=6000, seed=0):
  rng = np.random.default_rng(seed)
  global_overlap, local_overlap, extends_past = [], [], []
  for _ in range(n):
    height, width = (int(x) for x in rng.integers(150, 700, 2))
    b0 = normalised_box(*random_resized_box(rng, height, width, (0.25, 1)), height, width, rng.random() < .5)
    b1 = normalised_box(*box_relative_to(rng, height, width, (0.25, 1), b0, fix_bug), height, width,
                        rng.random() < .5)
    for box in (b0, b1):
      assert np.all((box >= 0) & (box <= 1))
    global_overlap.append(overlap_fraction(pixel_extent(b0, height, width), pixel_extent(b1, height, width)))
    reference = pixel_extent(union_reference(b0, b1), height, width)
    local = normalised_box(*box_relative_to(rng, height, width, (0.05, 0.25), union_reference(b0, b1),
                                            fix_bug), height, width, rng.random() < .5)
    extent = pixel_extent(local, height, width)
    local_overlap.append(overlap_fraction(extent, reference))
    extends_past.append(np.any(extent[:2] < reference[:2]) or np.any(extent[2:] > reference[2:]))
  return np.array(global_overlap), np.array(local_overlap), np.mean(extends_past)


def test_second_global_and_local_crops_overlap_by_half_the_smaller_extent():
  """With the width bug fixed, both axes overlap by >= ~1/2 of the smaller extent (rounding: 0.45)."""
  global_overlap, local_overlap, extends_past = simulate(fix_bug=True)
  print('worst overlap (rows, cols): global', global_overlap.min(0), 'local', local_overlap.min(0),
        'local crops extending past the reference:', extends_past)
  assert global_overlap.min() >= 0.45 and local_overlap.min() >= 0.45
  assert 0.2 < extends_past < 0.9            # local crops are not confined to the reference box


def test_official_width_bug_is_reproduced_on_request():
  """fix_crop_width_bug=False: rows unchanged, columns lose the guarantee (docs/method.md §8.5)."""
  global_overlap, _, _ = simulate(fix_bug=False)
  assert global_overlap[:, 0].min() >= 0.45
  assert global_overlap[:, 1].min() < 0.3


def test_boxes_and_flips():
  image = Image.fromarray(np.zeros((120, 90, 3), np.uint8))
  for flip_prob, flipped in ((0.0, False), (1.0, True)):
    settings = CropSettings(global_size=32, local_size=16, num_local=3, flip_prob=flip_prob)
    out = multi_crop(image, np.random.default_rng(3), settings)
    boxes = out['boxes']
    assert out['global'].shape == (2, 32, 32, 3) and out['local'].shape == (3, 16, 16, 3)
    assert boxes.shape == (5, 4) and boxes.dtype == np.float32
    assert np.all(boxes[:, 0] < boxes[:, 2])                       # rows never flipped
    assert np.all((boxes[:, 1] > boxes[:, 3]) == flipped)           # a flip swaps j0 and j1


def test_crop_pixels_are_the_image_resampled_over_the_box():
  """A linear-gradient image: every interior output pixel equals the gradient at its source point."""
  height, width = 300, 410
  yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
  grad = np.stack([20 + 200 * yy / (height - 1), 20 + 200 * xx / (width - 1), np.full_like(yy, 128)], -1)
  image = Image.fromarray(np.round(grad).astype(np.uint8))
  worst = 0.0
  for seed in range(6):
    settings = CropSettings(global_size=64, local_size=24, num_local=2, flip_prob=0.5)
    out = multi_crop(image, np.random.default_rng(seed), settings)
    crops = list(out['global']) + list(out['local'])
    for crop, box in zip(crops, out['boxes']):
      size = crop.shape[0]
      top, bottom = box[0] * (height - 1), box[2] * (height - 1)
      left, right = box[1] * (width - 1), box[3] * (width - 1)      # right < left when flipped
      centres = (np.arange(size) + 0.5) / size
      ys = top - 0.5 + centres * (bottom - top + 1)
      step = (right - left) + np.sign(right - left)                  # pixel extent, with direction
      xs = left - 0.5 * np.sign(right - left) + centres * step
      expect_r = 20 + 200 * ys / (height - 1)
      expect_g = 20 + 200 * xs / (width - 1)
      inner = slice(3, size - 3)
      err_r = np.abs(crop[inner, inner, 0] - expect_r[inner, None]).max()
      err_g = np.abs(crop[inner, inner, 1] - expect_g[None, inner]).max()
      worst = max(worst, err_r, err_g)
  print('worst interior difference (0..255 units):', worst)
  assert worst <= 1.5


def test_crops_are_cut_then_resized_as_torchvision_does_in_the_official_code():
  """Bitwise torchvision's `resized_crop` (PIL: crop, then bicubic resize) on MNIST digits; resizing the
  whole image over the box instead, as this project once did, reads pixels beyond the crop's border."""
  import torchvision.transforms.functional as tvf

  from udi_jax.data.sources import bundled, decode_image
  digits = bundled('mnist5k')
  rng = np.random.default_rng(0)
  differs_from_box_resize = 0
  for index in range(20):
    image = decode_image(digits[index]['image'])
    for size, scale in ((28, (0.25, 1.0)), (14, (0.05, 0.25))):
      i, j, h, w = random_resized_box(rng, 28, 28, scale)
      ours = cut(image, i, j, h, w, size, flip=False)
      official = np.asarray(tvf.resized_crop(image, i, j, h, w, [size, size],
                                             tvf.InterpolationMode.BICUBIC))
      np.testing.assert_array_equal(ours, official)
      box_resized = np.asarray(image.resize((size, size), Image.Resampling.BICUBIC, box=(j, i, j + w, i + h)))
      differs_from_box_resize += int(np.any(box_resized != ours))
  assert differs_from_box_resize > 10


@pytest.mark.parametrize('size', [(1, 1), (3, 5), (7, 2)])
def test_images_smaller_than_a_crop_work(size):
  from udi_jax.data.sources import decode_image
  image = decode_image(np.full(size + (3,), 200, np.uint8))
  out = multi_crop(image, np.random.default_rng(0), CropSettings(global_size=32, local_size=16, num_local=2))
  assert out['global'].shape == (2, 32, 32, 3)
  assert np.all(out['global'] == 200) and np.all((out['boxes'] >= 0) & (out['boxes'] <= 1))

"""Crops cut on the device from a canvas (data/device_crops.py) against the official crop-then-resize."""

import io

import jax
import numpy as np
import pytest
from PIL import Image

from udi_jax.data import crops, device_crops
from udi_jax.data.sources import bundled, decode_drafted, decode_image

cut_batch = jax.jit(device_crops.cut_batch, static_argnums=(2, 3))


def differences(images, settings, full_sizes=None):
  """|device - host| (0..255) over every pixel of the global and the local crops of `images`, the device
  crops cut from canvases (of `images`, drafted or not) and the host crops from `full_sizes` images."""
  diffs = {'global': [], 'local': []}
  for k, image in enumerate(images):
    full = full_sizes[k] if full_sizes else image
    host = crops.multi_crop(full, np.random.default_rng([0, 0, k]), settings)
    ours = device_crops.canvas_crops(image, np.random.default_rng([0, 0, k]), settings, full.size)
    np.testing.assert_array_equal(ours['boxes'], host['boxes'])      # the same plan (contract 2)
    canvas = device_crops.to_canvases([ours['pixels']], settings.canvas_size)
    cut = cut_batch(canvas, ours['windows'][None], settings.global_size, settings.local_size)
    for kind, crop in zip(('global', 'local'), cut):
      diffs[kind].append(np.abs(np.asarray(crop[0], int) - host[kind]).ravel())
  return {kind: np.concatenate(d) for kind, d in diffs.items()}


def assert_faithful(diffs, name, mean=1.0, p99=8.0):
  for kind, d in diffs.items():
    print(f'{name} {kind} crops: mean |diff| {d.mean():.3f}, 99th percentile {np.percentile(d, 99):.0f}, '
          f'max {d.max()} (0..255)')
    assert d.mean() <= mean and np.percentile(d, 99) <= p99


@pytest.fixture(scope='module')
def photos():
  from skimage import data
  return [Image.fromarray(p) for p in (data.astronaut(), data.chelsea(), data.coffee(), data.rocket())]


def test_photographs_match_the_official_crops(photos):
  """2x224 + 10x96 crops of four photographs (640 x 427 to 451 x 300 px) on a 640 canvas, so that none is
  reduced; the issue's bound is a mean of 1.0 and a 99th percentile of 8 (0..255)."""
  assert_faithful(differences(photos, crops.CropSettings(canvas_size=640)), 'photographs')


def test_digits_match_the_official_crops():
  """The demo's geometry: 28-px digits, 2x28 + 4x14 crops (upsampling and downsampling), canvas 28."""
  digits = bundled('mnist5k')
  images = [decode_image(digits[i]['image']) for i in range(24)]
  settings = crops.CropSettings(global_size=28, local_size=14, num_local=4, canvas_size=28)
  assert_faithful(differences(images, settings), 'digits')


def test_a_large_jpeg_is_drafted_and_its_boxes_drawn_at_full_size(photos):
  """A 2048 x 1536 JPEG on a 512 canvas: decoded at 1/4 size, its crops planned on the full image;
  the crops stay close to the host's from the full-size image (the reduction removes only detail that the
  224- and 96-px crops of a 2048-px image do not keep)."""
  big = photos[0].resize((2048, 1536), Image.Resampling.BICUBIC)
  encoded = io.BytesIO()
  big.save(encoded, format='JPEG', quality=95)
  drafted, full_size = decode_drafted(encoded.getvalue(), 512)
  assert full_size == (2048, 1536) and drafted.size == (512, 384)
  full = decode_image(encoded.getvalue())
  diffs = differences([drafted], crops.CropSettings(canvas_size=512), [full])
  assert_faithful(diffs, 'drafted 2048 px JPEG', mean=2.0, p99=16.0)
  ours = device_crops.canvas_crops(drafted, np.random.default_rng(0), crops.CropSettings(canvas_size=512),
                                   full_size)
  canvas = device_crops.to_canvases([ours['pixels']], 512)[0]
  assert ours['pixels'].shape == (384, 512, 3) and np.all(canvas[384:] == 0)
  np.testing.assert_array_equal(canvas[:384], ours['pixels'])
  assert ours['windows'][:, [0, 2]].max() <= 384 and ours['windows'][:, [1, 3]].max() <= 512


def test_flips_mirror_the_crop():
  image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 30, 3), np.uint8))
  settings = crops.CropSettings(global_size=16, local_size=8, num_local=2, canvas_size=40)
  ours = device_crops.canvas_crops(image, np.random.default_rng(1), settings)
  canvas = device_crops.to_canvases([ours['pixels']], 40)
  windows = ours['windows'].copy()
  windows[:, 4] = 0
  plain = cut_batch(canvas, windows[None], 16, 8)
  windows[:, 4] = 1
  mirrored = cut_batch(canvas, windows[None], 16, 8)
  for a, b in zip(plain, mirrored):
    np.testing.assert_array_equal(np.asarray(a)[..., ::-1, :], np.asarray(b))


def test_bad_settings_are_refused():
  import ml_collections
  with pytest.raises(ValueError, match='canvas_size=1 must be at least 2'):
    crops.CropSettings(canvas_size=1)
  config = ml_collections.ConfigDict({'data': {'crops_on': 'gpu'}})
  with pytest.raises(ValueError, match="crops_on='gpu' is not known"):
    crops.crops_on_device(config)

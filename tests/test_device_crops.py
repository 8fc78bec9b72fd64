"""Crops cut on the device from a canvas (data/device_crops.py) against the official crop-then-resize."""

import io

import jax
import numpy as np
import pytest
from PIL import Image

from udi_jax.data import crops, device_crops
from udi_jax.data.sources import bundled, decode_drafted, decode_image

cut_batch = jax.jit(device_crops.cut_batch, static_argnums=(2, 3))


def horizontal_first(image, rng, settings):
  """The host crops resized by PIL with the horizontal pass first, always (as before Pillow 13, which may
  run the vertical pass first): one single-axis resize per pass, rounded to 8 bits in between, as in PIL's
  two-pass resize. This is what the device crops compute."""
  plan = crops.plan_crops(rng, image.height, image.width, settings)
  out = []
  for v, ((i, j, h, w), flip) in enumerate(zip(plan.windows, plan.flips)):
    size = settings.global_size if v < 2 else settings.local_size
    crop = image.crop((j, i, j + w, i + h)).resize((size, h), Image.Resampling.BICUBIC)
    crop = crop.resize((size, size), Image.Resampling.BICUBIC)
    out.append(np.asarray(crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else crop, np.uint8))
  return {'global': np.stack(out[:2]), 'local': np.stack(out[2:]), 'boxes': plan.boxes}


def differences(images, settings, full_sizes=None, reference=crops.multi_crop, cutter=cut_batch):
  """|device - host| (0..255) over every pixel of the global and the local crops of `images`, the device
  crops cut from canvases (of `images`, drafted or not) and the host crops (`reference`) from `full_sizes`
  images."""
  diffs = {'global': [], 'local': []}
  for k, image in enumerate(images):
    full = full_sizes[k] if full_sizes else image
    host = reference(full, np.random.default_rng([0, 0, k]), settings)
    ours = device_crops.canvas_crops(image, np.random.default_rng([0, 0, k]), settings, full.size)
    np.testing.assert_array_equal(ours['boxes'], host['boxes'])      # the same plan (contract 2)
    canvas = device_crops.to_canvases([ours['pixels']], settings.canvas_size)
    cut = cutter(canvas, ours['windows'][None], settings.global_size, settings.local_size)
    for kind, crop in zip(('global', 'local'), cut):
      diffs[kind].append(np.abs(np.asarray(crop[0], int) - host[kind]).ravel())
  return {kind: np.concatenate(d) for kind, d in diffs.items()}


def assert_faithful(diffs, name, mean, p99, most=255):
  for kind, d in diffs.items():
    print(f'{name} {kind} crops: mean |diff| {d.mean():.3f}, 99th percentile {np.percentile(d, 99):.0f}, '
          f'max {d.max()} (0..255)')
    assert d.mean() <= mean and np.percentile(d, 99) <= p99 and d.max() <= most


@pytest.fixture(scope='module')
def photos():
  from skimage import data
  return [Image.fromarray(p) for p in (data.astronaut(), data.chelsea(), data.coffee(), data.rocket())]


def test_photographs_match_the_official_crops(photos, monkeypatch):
  """2x224 + 10x96 crops of four photographs (640 x 427 to 451 x 300 px) on a 640 canvas, so that none is
  reduced. Against PIL with the horizontal pass first (what the device computes) every pixel is within
  one rounding step; against the installed Pillow's own order (the host crops), nearly every pixel. A
  kernel slightly off (a = -0.75, OpenCV's bicubic) breaks the first bound."""
  settings = crops.CropSettings(canvas_size=640)
  assert_faithful(differences(photos, settings, reference=horizontal_first), 'photographs (horizontal first)',
                  mean=0.05, p99=1, most=1)
  assert_faithful(differences(photos, settings), 'photographs (host crops)', mean=0.05, p99=1)
  monkeypatch.setattr(device_crops, 'BICUBIC_A', -0.75)
  retraced = jax.jit(lambda *args: device_crops.cut_batch(*args), static_argnums=(2, 3))
  wrong = differences(photos[:1], settings, reference=horizontal_first, cutter=retraced)
  assert max(d.max() for d in wrong.values()) > 1


def test_digits_match_the_official_crops():
  """The demo's geometry: 28-px digits, 2x28 + 4x14 crops (upsampling and downsampling), canvas 28. The
  host crops differ where Pillow 13 runs the vertical pass first (a few pixels, up to 14 apart)."""
  digits = bundled('mnist5k')
  images = [decode_image(digits[i]['image']) for i in range(24)]
  settings = crops.CropSettings(global_size=28, local_size=14, num_local=4, canvas_size=28)
  assert_faithful(differences(images, settings, reference=horizontal_first), 'digits (horizontal first)',
                  mean=0.01, p99=0, most=1)
  assert_faithful(differences(images, settings), 'digits (host crops)', mean=0.05, p99=1)


def test_a_large_jpeg_is_drafted_and_its_boxes_drawn_at_full_size(photos):
  """A 2048 x 1536 JPEG on a 512 canvas: decoded at 1/4 size, its crops planned on the full image;
  the crops stay close to the host's from the full-size image (the reduction removes only detail that the
  224- and 96-px crops of a 2048-px image do not keep)."""
  big = photos[0].resize((2048, 1536), Image.Resampling.BICUBIC)
  encoded = io.BytesIO()
  big.save(encoded, format='JPEG', quality=95)
  drafted, full_size, extent = decode_drafted(encoded.getvalue(), 512)
  assert full_size == (2048, 1536) and drafted.size == (512, 384) and extent == (512, 384)
  full = decode_image(encoded.getvalue())
  diffs = differences([drafted], crops.CropSettings(canvas_size=512), [full])
  assert_faithful(diffs, 'drafted 2048 px JPEG', mean=1.0, p99=6)
  ours = device_crops.canvas_crops(drafted, np.random.default_rng(0), crops.CropSettings(canvas_size=512),
                                   full_size)
  canvas = device_crops.to_canvases([ours['pixels']], 512)[0]
  assert ours['pixels'].shape == (384, 512, 3) and np.all(canvas[384:] == 0)
  np.testing.assert_array_equal(canvas[:384], ours['pixels'])
  assert ours['windows'][:, [0, 2]].max() <= 384 and ours['windows'][:, [1, 3]].max() <= 512


def test_a_draft_that_is_not_a_whole_reduction_scales_the_windows_exactly():
  """A 4001 x 3001 JPEG drafted at 1/4 is 1001 x 751 pixels, of which the image fills 1000.25 x 750.25
  (Pillow's draft box): the windows are the boxes at exactly 1/4, not 1001/4001 and 751/3001."""
  image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (3001, 4001, 3), np.uint8))
  encoded = io.BytesIO()
  image.save(encoded, format='JPEG', quality=50)
  drafted = decode_drafted(encoded.getvalue(), 999)
  assert drafted.image.size == (1001, 751) and drafted.full_size == (4001, 3001)
  assert drafted.extent == (1000.25, 750.25)
  settings = crops.CropSettings(canvas_size=1001)
  ours = device_crops.canvas_crops(drafted.image, np.random.default_rng(0), settings, drafted.full_size,
                                   drafted.extent)
  plan = crops.plan_crops(np.random.default_rng(0), 3001, 4001, settings)
  np.testing.assert_allclose(ours['windows'][:, :4], np.asarray(plan.windows, np.float64) / 4, rtol=1e-6)
  fitted = device_crops.canvas_crops(drafted.image, np.random.default_rng(0), crops.CropSettings(canvas_size=500),
                                     drafted.full_size, drafted.extent)     # then fitted to 500 x 375
  assert fitted['pixels'].shape == (375, 500, 3)
  np.testing.assert_allclose(fitted['windows'][:, [1, 3]], np.asarray(plan.windows)[:, [1, 3]] * 1000.25 / 4001
                             * 500 / 1001, rtol=1e-6)


def test_flips_mirror_the_crop():
  """A flipped window gives the unflipped crop mirrored, exactly. (Each call gets its own windows array:
  JAX may read a NumPy argument after the call returns, so changing the array in place between two calls
  could change what the first one computes.)"""
  image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 30, 3), np.uint8))
  settings = crops.CropSettings(global_size=16, local_size=8, num_local=2, canvas_size=40)
  ours = device_crops.canvas_crops(image, np.random.default_rng(1), settings)
  canvas = device_crops.to_canvases([ours['pixels']], 40)
  unflipped, flipped = ours['windows'].copy(), ours['windows'].copy()
  unflipped[:, 4], flipped[:, 4] = 0, 1
  plain = cut_batch(canvas, unflipped[None], 16, 8)
  mirrored = cut_batch(canvas, flipped[None], 16, 8)
  for a, b in zip(plain, mirrored):
    np.testing.assert_array_equal(np.asarray(a)[..., ::-1, :], np.asarray(b))
    assert np.abs(np.asarray(a, int) - np.asarray(b, int)).max() > 1    # not symmetric: the check can fail


def test_bad_settings_are_refused():
  import ml_collections
  with pytest.raises(ValueError, match='canvas_size=1 must be at least 2'):
    crops.CropSettings(canvas_size=1)
  config = ml_collections.ConfigDict({'data': {'crops_on': 'gpu'}})
  with pytest.raises(ValueError, match="crops_on='gpu' is not known"):
    crops.crops_on_device(config)

"""On-device photometric ops against torchvision and PIL on uint8 photos, and their probabilities."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageFilter, ImageOps

from udi_jax.data import photometric as ph

torch = pytest.importorskip('torch', reason='torch/torchvision are in requirements-dev.txt')
TF = pytest.importorskip('torchvision.transforms.functional')


@pytest.fixture(scope='module')
def photos():
  from skimage import data
  return [np.asarray(Image.fromarray(p).resize((150, 120), Image.Resampling.BICUBIC))
          for p in (data.astronaut(), data.chelsea(), data.coffee())]


def ours(op, image, *args):
  return np.asarray(jax.jit(op)(jnp.asarray(image, jnp.float32) / 255.0, *args), np.float64) * 255.0


def torchvision_pil(fn, image, *args):
  return np.asarray(fn(Image.fromarray(image), *args), np.float64)


def torchvision_tensor(fn, image, *args):
  return fn(torch.from_numpy(image.copy()).permute(2, 0, 1), *args).permute(1, 2, 0).numpy().astype(np.float64)


OPS = [('brightness', ph.brightness, TF.adjust_brightness, (0.65, 1.3)),
       ('contrast', ph.contrast, TF.adjust_contrast, (0.62, 1.35)),
       ('saturation', ph.saturation, TF.adjust_saturation, (0.8, 1.2)),
       ('hue', ph.hue, TF.adjust_hue, (-0.07, 0.08))]


@pytest.mark.parametrize('name,op,reference,factors', OPS, ids=[o[0] for o in OPS])
def test_colour_jitter_ops_match_torchvision(photos, name, op, reference, factors):
  """Mean absolute difference <= 1/255 against torchvision's tensor ops (and its PIL ops, hue aside:
  PIL quantises hue to 256 steps)."""
  worst = {'tensor': 0.0, 'pil': 0.0}
  for image in photos:
    for factor in factors:
      got = ours(op, image, factor)
      worst['tensor'] = max(worst['tensor'], np.abs(got - torchvision_tensor(reference, image, factor)).mean())
      worst['pil'] = max(worst['pil'], np.abs(got - torchvision_pil(reference, image, factor)).mean())
  print(f'{name}: worst mean |diff| (0..255) vs torchvision tensor {worst["tensor"]:.3f}, '
        f'vs PIL {worst["pil"]:.3f}')
  assert worst['tensor'] <= 1.0
  if name != 'hue':
    assert worst['pil'] <= 1.0


def test_grayscale_matches_torchvision(photos):
  worst = max(np.abs(ours(ph.grayscale, im) - torchvision_pil(TF.rgb_to_grayscale, im, 3)).mean()
              for im in photos)
  print(f'grayscale: worst mean |diff| {worst:.3f}')
  assert worst <= 1.0


def test_solarize_is_exact(photos):
  for image in photos:
    got = np.round(ours(ph.solarize, image)).astype(np.uint8)
    np.testing.assert_array_equal(got, np.asarray(ImageOps.solarize(Image.fromarray(image), 128)))


def test_blur_matches_pil_gaussian_blur(photos):
  worst = 0.0
  for image in photos:
    for radius in (0.1, 0.5, 1.0, 1.5, 2.0):
      ref = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius)), np.float64)
      worst = max(worst, np.abs(ours(ph.gaussian_blur, image, radius) - ref).mean())
  print(f'blur: worst mean |diff| vs PIL GaussianBlur {worst:.3f} (0..255)')
  assert worst <= 2.0


def test_random_choices_have_the_recipe_probabilities():
  """docs/method.md §5.1: jitter 0.8, grayscale 0.2, blur 0.425, solarize 0.1; random order; factor ranges.
  Bound: 5 standard errors of a proportion over 40 000 draws."""
  n = 40000
  settings = ph.PhotometricSettings()
  params = jax.jit(jax.vmap(lambda k: ph.draw_params(k, settings)))(jax.random.split(jax.random.key(0), n))
  for key, p in (('jitter', 0.8), ('grayscale', 0.2), ('blur', 0.425), ('solarize', 0.1)):
    rate = float(params[key].mean())
    assert abs(rate - p) < 5 * np.sqrt(p * (1 - p) / n), (key, rate)
  first = np.bincount(np.asarray(params['order'][:, 0]), minlength=4) / n
  assert np.all(np.abs(first - 0.25) < 5 * np.sqrt(0.25 * 0.75 / n))
  assert np.all(np.sort(np.asarray(params['order']), 1) == np.arange(4))
  factors = np.asarray(params['factors'])
  for k, (lo, hi) in enumerate(((0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1))):
    assert factors[:, k].min() >= lo and factors[:, k].max() <= hi
  radius = np.asarray(params['radius'])
  assert radius.min() >= 0.1 and radius.max() <= 2.0
  # Solarize only in branch B, where blur has p 0.1: P(blur | solarize) = 0.1.
  both = float((params['blur'] & params['solarize']).mean())
  assert abs(both - 0.01) < 5 * np.sqrt(0.01 * 0.99 / n)


def test_augment_is_per_crop_and_normalised(photos):
  images = jnp.asarray(np.stack([photos[0][:96, :96]] * 4))
  keys = jax.random.split(jax.random.key(1), 4)
  out = jax.jit(ph.augment)(images, keys)
  assert out.shape == (4, 96, 96, 3) and out.dtype == jnp.float32
  again = jax.jit(ph.augment)(images[2:], keys[2:])
  np.testing.assert_allclose(out[2:], again, atol=1e-6)        # a crop depends on its own key only
  assert not np.allclose(out[0], out[1])
  plain = ph.preprocess(images[:1])
  np.testing.assert_allclose(plain[0, 0, 0], (images[0, 0, 0] / 255.0 - np.array(ph.IMAGENET_MEAN))
                             / np.array(ph.IMAGENET_STD), rtol=1e-5)

"""Small turns and shifts of the crops (`data/geometric.py`) against a pixel loop and PIL's `Image.rotate`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from udi_jax.data import geometric


def reference_warp(image: np.ndarray, angle: float, shift: tuple[float, float]) -> np.ndarray:
  """The straightforward form: for each output pixel centre, its source point, read bilinearly (0 outside)."""
  height, width = image.shape[:2]
  theta = np.deg2rad(angle)
  out = np.zeros(image.shape, np.float64)
  for i in range(height):
    for j in range(width):
      x = j + 0.5 - width / 2 - shift[0] * width
      y = i + 0.5 - height / 2 - shift[1] * height
      sx = np.cos(theta) * x - np.sin(theta) * y + width / 2 - 0.5
      sy = np.sin(theta) * x + np.cos(theta) * y + height / 2 - 0.5
      x0, y0 = int(np.floor(sx)), int(np.floor(sy))
      for dy, wy in ((0, 1 - (sy - y0)), (1, sy - y0)):
        for dx, wx in ((0, 1 - (sx - x0)), (1, sx - x0)):
          if 0 <= y0 + dy < height and 0 <= x0 + dx < width:
            out[i, j] += wy * wx * image[y0 + dy, x0 + dx]
  return np.clip(np.round(out), 0, 255).astype(np.uint8)


@pytest.fixture(scope='module')
def digit():
  """A 28-px MNIST-like crop: a bright stroke on black, 3 channels (as the pipeline carries it)."""
  from sklearn.datasets import load_digits
  eight = load_digits().images[8] * (255 / 16)
  big = np.asarray(Image.fromarray(eight.astype(np.uint8)).resize((28, 28), Image.Resampling.BILINEAR))
  return np.repeat(big[..., None], 3, axis=-1)


warp = jax.jit(geometric.warp)


@pytest.mark.parametrize('angle,shift', [(0.0, (0.0, 0.0)), (12.5, (0.0, 0.0)), (-30.0, (0.1, -0.05)),
                                         (90.0, (0.0, 0.0)), (7.0, (-0.2, 0.15))])
def test_warp_matches_the_pixel_loop(digit, angle, shift):
  got = np.asarray(warp(jnp.asarray(digit), jnp.float32(angle), jnp.asarray(shift, jnp.float32)))
  want = reference_warp(digit, angle, shift)
  # Rounding of values within float32 error of .5 may differ by one level.
  assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
  assert np.mean(got != want) < 0.01
  if angle == 0 and shift == (0.0, 0.0):
    np.testing.assert_array_equal(got, digit)


@pytest.mark.parametrize('angle,translate', [(15.0, (0, 0)), (-20.0, (3, -2))])
def test_turn_and_shift_follow_pil(angle, translate):
  """Positive angles turn counter-clockwise and shifts move right/down, as `Image.rotate(angle, translate=)`."""
  yy, xx = np.mgrid[0:40, 0:40]
  smooth = (127 + 60 * np.sin(xx / 5.0) + 50 * np.cos(yy / 4.0)).astype(np.uint8)   # no edges inside
  image = np.repeat(smooth[..., None], 3, axis=-1)
  pil = np.asarray(Image.fromarray(image).rotate(angle, resample=Image.Resampling.BILINEAR,
                                                 translate=translate))
  shift = (translate[0] / 40, translate[1] / 40)
  got = np.asarray(warp(jnp.asarray(image), jnp.float32(angle), jnp.asarray(shift, jnp.float32)))
  inner = (slice(10, 30), slice(10, 30))    # away from the corners that come from outside the image
  assert np.abs(got[inner].astype(int) - pil[inner].astype(int)).max() <= 1
  turned_the_other_way = np.asarray(warp(jnp.asarray(image), jnp.float32(-angle), jnp.asarray(shift, jnp.float32)))
  assert np.abs(turned_the_other_way[inner].astype(int) - pil[inner].astype(int)).max() > 10


def test_each_crop_draws_its_own_turn_within_range(digit):
  settings = geometric.GeometricSettings(rotation_degrees=10.0, translate_fraction=0.1)
  keys = jax.random.split(jax.random.key(0), 64)
  angles, shifts = jax.vmap(lambda k: geometric.draw_params(k, settings))(keys)
  assert np.all(np.abs(np.asarray(angles)) <= 10) and np.all(np.abs(np.asarray(shifts)) <= 0.1)
  assert np.std(np.asarray(angles)) > 3 and np.std(np.asarray(shifts)) > 0.03
  crops = jnp.asarray(np.stack([digit] * 4))
  out = np.asarray(jax.jit(lambda c, k: geometric.augment(c, k, settings))(crops, keys[:4]))
  assert out.dtype == np.uint8 and out.shape == crops.shape
  assert len({o.tobytes() for o in out}) == 4                 # per crop
  again = np.asarray(jax.jit(lambda c, k: geometric.augment(c, k, settings))(crops, keys[:4]))
  np.testing.assert_array_equal(out, again)                   # from the keys alone


def test_off_by_default_and_bad_ranges_refused():
  assert not geometric.GeometricSettings().active
  with pytest.raises(ValueError, match=r'config.data.translate_fraction=0.6 must lie in \[0, 0.5\)'):
    geometric.GeometricSettings(translate_fraction=0.6)
  with pytest.raises(ValueError, match=r'config.data.rotation_degrees=200.0 must lie in \[0, 180\]'):
    geometric.GeometricSettings(rotation_degrees=200.0)


def test_the_step_turns_the_crops_only_when_asked(digit):
  """The training step's augmentation: unchanged by default; with a range, the turned crops go on to the
  same photometric draws (their keys come from other streams)."""
  from tests import tiny_train_config
  from udi_jax.data import photometric
  from udi_jax.train import step
  config = tiny_train_config.get_config()
  config.data.augment = False
  released = step.Trainer.from_config(config, steps_per_epoch=4)
  config.data.rotation_degrees, config.data.translate_fraction = 20.0, 0.1
  turning = step.Trainer.from_config(config, steps_per_epoch=4)
  assert released.geometric is None and turning.geometric.active
  images = jnp.asarray(np.stack([np.stack([digit, digit[::-1]])] * 3))          # (B=3, V=2, 28, 28, 3)
  keys = {name: jax.random.split(jax.random.key(name == 'geometric'), 3) for name in ('geometric', 'photometric')}
  plain = np.asarray(step._augment(images, keys, 0, released))
  np.testing.assert_array_equal(plain, np.asarray(photometric.preprocess(images)))
  turned = np.asarray(step._augment(images, keys, 0, turning))
  crop_keys = step._crop_keys(keys['geometric'], 0, 2)
  want = photometric.preprocess(geometric.augment(images.reshape((6, 28, 28, 3)), crop_keys, turning.geometric))
  np.testing.assert_array_equal(turned, np.asarray(want).reshape(turned.shape))
  assert np.abs(turned - plain).max() > 1

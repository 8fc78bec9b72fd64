"""Stratified sampling and cross-view correspondence (docs/method.md §3)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import golden
from tests.reference_udi import official_maps
from udi_jax.method import sampling
from udi_jax.method.sampling import SamplingSettings, correspond_batch, correspondence, draw_cells

# Pattern k of the golden file: (source crop, target crop); crops 0, 1 global, 2.. local.
PAIRS = {0: (0, 1), 1: (1, 0), 2: (2, 1), 3: (3, 1), 4: (2, 0), 5: (3, 0)}
# tgt_maps index holding the read-out of pattern k (the golden README's interleaving).
TGT_MAP = {0: 0, 1: 1, 2: 2, 3: 4, 4: 3, 5: 5}


# As the training step runs them: compiled (grid sizes static).
compiled_correspondence = jax.jit(correspondence, static_argnums=(3, 4))


@pytest.fixture(scope='module')
def patterns():
  return golden.load('udi_golden_small'), golden.load('udi_golden_small_patterns')


def dense(idx, weights, size=196):
  out = np.zeros(idx.shape[:-1] + (size,), np.float64)
  for pos in np.ndindex(idx.shape[:-1]):
    for j in range(idx.shape[-1]):
      out[pos + (idx[pos + (j,)],)] += weights[pos + (j,)]
  return out


def test_correspondence_reproduces_official_validity_and_maps(patterns):
  """Every sample's validity exactly, and the official maps and masks for the valid ones."""
  g, p = patterns
  checked = invalid = 0
  for k, (src, tgt) in PAIRS.items():
    src_grid = 14 if src < 2 else 6
    for b in range(2):
      cells = p[f'idx/{k}'][b]
      valid, idx, w = compiled_correspondence(jnp.asarray(g[f'coords/{src}'][b]),
                                              jnp.asarray(g[f'coords/{tgt}'][b]), jnp.asarray(cells), src_grid, 14)
      valid, idx, w = np.asarray(valid), np.asarray(idx), np.asarray(w)
      np.testing.assert_array_equal(valid, p[f'valid/{k}'][b], err_msg=f'pattern {k} image {b}')
      n = int(valid.sum())
      tgt_maps = g[f'tgt_maps/{TGT_MAP[k]}'][b]
      np.testing.assert_allclose(dense(idx[valid], w[valid]), tgt_maps[:n], atol=1e-5, rtol=0)
      assert np.all(tgt_maps[n:] == 0) and np.all(w[~valid] == 0)
      src_maps = g[f'src_maps/{k}'][b]
      np.testing.assert_array_equal(src_maps[:n].argmax(-1), cells[valid])
      checked += len(cells)
      invalid += int((~valid).sum())
  assert (checked, invalid) == (136, 46)   # golden README: 22 of 64 global, 24 of 72 local invalid


def test_batch_correspondence_reproduces_official_maps(patterns):
  """correspond_batch on the official cells gives the official maps, rows packed valid-first."""
  g, p = patterns
  boxes = np.stack([g[f'coords/{k}'] for k in range(4)], 1)
  np.testing.assert_array_equal(p['idx/0'], p['idx/1'])             # one global pattern per image
  samples = jax.jit(correspond_batch, static_argnums=(3, 4))(jnp.asarray(boxes), jnp.asarray(p['idx/0']),
                                                            jnp.asarray(p['idx/2']), 14, 6)
  student_valid = np.asarray(samples.student_mask) > 0
  for name, ours in official_maps(samples, batch=2, num_local=2, global_grid=14, local_grid=6).items():
    k = int(name.split('/')[1])
    rows_valid = student_valid[2 * k:2 * k + 2] if name.startswith('src_maps') else ours.sum(-1) > 0
    for b in range(2):
      packed = ours[b][rows_valid[b]]
      np.testing.assert_allclose(packed, g[name][b][:len(packed)], atol=1e-5, rtol=0, err_msg=name)
      assert np.all(g[name][b][len(packed):] == 0), name


def test_point_rounding_onto_last_row_keeps_student_mask_and_zero_teacher_weights():
  """docs/method.md §3.4: a valid sample whose target coordinate rounds to 13 gets all-zero weights."""
  src = jnp.asarray([0.2718125, 0.1, 0.89179856, 0.9], jnp.float32)
  tgt = jnp.asarray([0.30331787, 0.0, 0.8917986, 1.0], jnp.float32)
  cells = jnp.asarray([13 * 14 + 7])          # last row, a middle column
  valid, idx, w = correspondence(src, tgt, cells, 14, 14)
  assert bool(valid[0])
  assert float(jnp.abs(w).sum()) == 0.0
  assert int(idx.max()) <= 195 and int(idx.min()) >= 0


def test_one_sample_per_window_and_uniform_corner():
  """Global: 16 cells, one per 3x3 window of a 12x12 block; the block's corner is uniform.

  Flipping rows or columns maps corners onto each other and leaves the in-window distribution unchanged,
  so with a uniform corner the images whose pattern fits exactly one corner split evenly over the four.
  Bound: chi-square with 3 degrees of freedom below 16.3 (p = 0.001) for 20 000 images, fixed seed.
  """
  keys = jax.random.split(jax.random.key(0), 20000)
  cells, local_cells = draw_cells(keys, 14, 6, 3, 2)
  cells, local_cells = np.asarray(cells), np.asarray(local_cells)
  assert cells.shape == (20000, 16) and local_cells.shape == (20000, 9)
  rows, cols = cells // 14, cells % 14
  fits = []
  for r0, c0 in ((0, 0), (0, 2), (2, 0), (2, 2)):
    inside = (rows >= r0) & (rows < r0 + 12) & (cols >= c0) & (cols < c0 + 12)
    window = np.where(inside, ((rows - r0) // 3) * 4 + (cols - c0) // 3, -1)
    fits.append(np.all(np.sort(window, 1) == np.arange(16), axis=1))
  fits = np.stack(fits)                                         # (4 corners, images)
  assert fits.any(0).all()                  # every pattern is one cell per window of some corner block
  unique = fits & (fits.sum(0) == 1)
  counts = unique.sum(1)
  assert counts.sum() > 19000
  chi2 = ((counts - counts.mean()) ** 2 / counts.mean()).sum()
  assert chi2 < 16.3, counts
  # Local: 9 cells cover the whole 6x6 grid, one per 2x2 window, the in-window cell uniform.
  lrows, lcols = local_cells // 6, local_cells % 6
  windows = np.sort((lrows // 2) * 3 + lcols // 2, 1)
  assert np.all(windows == np.arange(9))
  position = (lrows % 2) * 2 + lcols % 2
  counts = np.bincount(position.ravel(), minlength=4)
  chi2_local = ((counts - counts.mean()) ** 2 / counts.mean()).sum()
  assert chi2_local < 16.3, counts


def test_masks_are_shared_within_an_image():
  """Both global views use one pattern (docs/method.md §3.2); all local crops use one pattern."""
  settings = SamplingSettings()
  rng = np.random.default_rng(0)
  batch, n_local = 4, 3
  boxes = np.tile(np.asarray([0.1, 0.1, 0.9, 0.9], np.float32), (batch, 2 + n_local, 1))
  boxes[:, 1] = [0.2, 0.15, 0.95, 0.85]
  boxes[:, 2:] = [0.3, 0.3, 0.6, 0.6]       # identical local boxes ...
  keys = jax.random.split(jax.random.key(int(rng.integers(1 << 30))), batch)
  s = jax.jit(lambda b, k: sampling.draw_samples(b, k, settings))(jnp.asarray(boxes), keys)
  np.testing.assert_array_equal(s.student_idx[:batch], s.student_idx[batch:])
  local = np.asarray(s.teacher_w[:, 16:]).reshape(2 * batch, n_local, 9, 4)
  local_idx = np.asarray(s.teacher_idx[:, 16:]).reshape(2 * batch, n_local, 9, 4)
  for k in range(1, n_local):                # ... read out at identical points: one shared pattern
    np.testing.assert_array_equal(local_idx[:, k], local_idx[:, 0])
    np.testing.assert_array_equal(local[:, k], local[:, 0])
  assert s.teacher_idx.shape == (2 * batch, 16 + 9 * n_local, 4)
  # Different images draw different patterns.
  assert len({tuple(row) for row in np.asarray(s.student_idx[:batch])}) > 1


def test_window_larger_than_grid_is_refused():
  with pytest.raises(ValueError, match='global_window=15'):
    SamplingSettings(global_grid=14, global_window=15)


def test_sampling_runs_under_jit_and_vmap_with_static_shapes():
  settings = SamplingSettings()
  boxes = jnp.tile(jnp.asarray([0.0, 0.0, 1.0, 1.0]), (2, 4, 1))
  keys = jax.random.split(jax.random.key(1), 2)
  fn = jax.jit(lambda b, k: sampling.draw_samples(b, k, settings))
  s = fn(boxes, keys)
  assert s.student_idx.shape == (4, 16) and s.teacher_w.shape == (4, 16 + 2 * 9, 4)
  eager = sampling.draw_samples(boxes, keys, settings)
  for got, want in zip(jax.tree.leaves(s), jax.tree.leaves(eager)):
    np.testing.assert_array_equal(got, want)
  # Identical boxes: a sample is valid unless it lies on the crop border (strict inside test).
  rows, cols = np.asarray(s.student_idx) // 14, np.asarray(s.student_idx) % 14
  interior = (rows > 0) & (rows < 13) & (cols > 0) & (cols < 13)
  np.testing.assert_array_equal(np.asarray(s.student_mask) > 0, interior)

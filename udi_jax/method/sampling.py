"""Stratified random sampling (SRS) and cross-view correspondence, from crop boxes, on the accelerator.

docs/method.md §3. A box is `[i0, j0, i1, j1]` in normalised ij image coordinates; a horizontal flip swaps j0
and j1. Per image, one stratified cell pattern on the global grid is shared by both global views and one
on the local grid by all local crops. Each source sample is projected into a target GLOBAL view: it is
valid when strictly inside the target's (unflipped) box, and the teacher reads it out with the bilinear
weights of its 4 neighbours on the target grid.

Everything has static shapes: invalid samples stay in place with zero teacher weights and a zero student
mask, instead of the official valid-first packing, because every consumer is a masked sum.

Row layout for a batch of B images with n_l local crops (view-major, `row = v*B + b`):
- student row (v, b): its own `Sg` sampled tokens of global view v; mask = valid in view 1-v;
- teacher row (v, b): `Sg` points = student view 1-v's samples seen in view v, then for each local crop k
  its `Sl` samples seen in view v: `St = Sg + n_l*Sl` points, 4 neighbours each.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Samples:
  """Sampling and correspondence of one batch (shapes for B images, see the module docstring)."""
  student_idx: jax.Array     # (2B, Sg) int32 token index (row-major a*F + c) on the student's own grid
  student_mask: jax.Array    # (2B, Sg) float32 m^s: 1 where the sample lies inside the other view
  teacher_idx: jax.Array     # (2B, St, 4) int32 neighbour tokens on the teacher view's grid
  teacher_w: jax.Array       # (2B, St, 4) float32 bilinear weights, 0 for invalid points
  teacher_mask: jax.Array    # (2B, St) float32 m^t = sum of the weights (~1 valid, 0 invalid)
  # For the local patch-loss ablation (docs/method.md §9): the local pattern and every point's validity.
  local_idx: Optional[jax.Array] = None       # (B, Sl) int32 token indices on the local grid
  teacher_valid: Optional[jax.Array] = None   # (2B, St) float32: 1 where the point lies inside view v


jax.tree_util.register_dataclass(
    Samples, data_fields=['student_idx', 'student_mask', 'teacher_idx', 'teacher_w', 'teacher_mask',
                          'local_idx', 'teacher_valid'], meta_fields=[])


@functools.lru_cache(maxsize=None)
def torch_linspace01(n: int) -> np.ndarray:
  """float32 `torch.linspace(0, 1, n)`: the official token positions (it fills from both ends)."""
  step = np.float32(1.0) / np.float32(n - 1)
  i = np.arange(n)
  values = np.where(i < n // 2, i.astype(np.float32) * step,
                    np.float32(1.0) - (n - 1 - i).astype(np.float32) * step)
  return values.astype(np.float32)


SAMPLING_MODES = ('stratified', 'fixed', 'uniform')


def stratified_cells(key: jax.Array, grid: int, window: int, mode: str = 'stratified') -> jax.Array:
  """Sorted token indices (g*g,) of one image's sampling pattern, g = grid // window.

  - `stratified` (docs/method.md §3.2): one random cell per window of a (g*window)^2 block; when the block is
    smaller than the grid it sits in one of the 4 corners with probability 1/4 each;
  - `fixed`: the first cell of every window (official `random_sampling=False`), the corner still random;
  - `uniform`: the same number of distinct tokens drawn uniformly over the whole grid, without windows.
  """
  g = grid // window
  k_cell, k_corner = jax.random.split(key)
  if mode == 'uniform':
    return jnp.sort(jax.random.permutation(k_cell, grid * grid)[:g * g]).astype(jnp.int32)
  if mode == 'stratified':
    cells = jax.random.randint(k_cell, (g, g), 0, window * window)
  else:
    cells = jnp.zeros((g, g), jnp.int32)
  corner = jax.random.randint(k_corner, (), 0, 4)
  spare = grid - g * window
  row0, col0 = (corner // 2) * spare, (corner % 2) * spare
  base = np.arange(g) * window
  rows = row0 + base[:, None] + cells // window
  cols = col0 + base[None, :] + cells % window
  return jnp.sort((rows * grid + cols).reshape(-1)).astype(jnp.int32)


def correspondence(src_box: jax.Array, tgt_box: jax.Array, cells: jax.Array, src_grid: int,
                   tgt_grid: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Project source cells into a target view: (valid (S,), neighbour idx (S,4), weights (S,4)).

  Arithmetic follows the official float32 order (`udi_augmentation.py:424-490`): position
  `b0 + linspace[a] * (b1 - b0)`, strict inside test on the unflipped target box, target coordinate
  `(y - t0) * (G-1) / (t1 - t0)` with the stored (possibly flipped) box, bilinear weights with the upper
  neighbour clamped to G-1 (so a point that rounds onto the last row gets zero weights). Weights of
  invalid samples are zero; indices are clamped so they always address the grid.
  """
  lin = jnp.asarray(torch_linspace01(src_grid))
  rel = jnp.stack([lin[cells // src_grid], lin[cells % src_grid]], axis=-1)       # (S, 2) (i, j)
  src_box = src_box.astype(jnp.float32)
  tgt_box = tgt_box.astype(jnp.float32)
  points = src_box[:2] + rel * (src_box[2:] - src_box[:2])
  lo = jnp.minimum(tgt_box[:2], tgt_box[2:])
  hi = jnp.maximum(tgt_box[:2], tgt_box[2:])
  valid = jnp.all(((points - lo) > 0) & ((hi - points) > 0), axis=-1)
  last = tgt_grid - 1
  uv = (points - tgt_box[:2]) * np.float32(last) / (tgt_box[2:] - tgt_box[:2])
  low = jnp.floor(uv)
  high = jnp.minimum(low + 1, last)
  (u, v), (u0, v0), (u1, v1) = uv.T, low.T, high.T
  weights = jnp.stack([(u1 - u) * (v1 - v), (u1 - u) * (v - v0),
                       (u - u0) * (v1 - v), (u - u0) * (v - v0)], axis=-1)
  weights = jnp.where(valid[:, None], weights, 0.0)
  clamp = lambda x: jnp.clip(x, 0, last).astype(jnp.int32)
  a0, a1, c0, c1 = clamp(u0), clamp(u1), clamp(v0), clamp(v1)
  idx = jnp.stack([a0 * tgt_grid + c0, a0 * tgt_grid + c1, a1 * tgt_grid + c0, a1 * tgt_grid + c1], -1)
  return valid, idx, weights


def correspond_batch(boxes: jax.Array, global_cells: jax.Array, local_cells: jax.Array,
                     global_grid: int, local_grid: int) -> Samples:
  """Samples for a batch from its boxes (B, 2+n_l, 4) and cell patterns (B, Sg), (B, Sl)."""
  num_local = boxes.shape[1] - 2

  def per_image(box, g_cells, l_cells):
    proj_global = lambda src, tgt: correspondence(box[src], box[tgt], g_cells, global_grid, global_grid)
    # Student view v's samples, validity and read-out in view 1-v.
    valid_01, idx_01, w_01 = proj_global(0, 1)
    valid_10, idx_10, w_10 = proj_global(1, 0)
    student_mask = jnp.stack([valid_01, valid_10]).astype(jnp.float32)             # (2, Sg)
    teacher_idx, teacher_w = [[idx_10], [idx_01]], [[w_10], [w_01]]               # teacher view 0, 1
    teacher_valid = [[valid_10], [valid_01]]
    for k in range(num_local):
      for view in (0, 1):
        valid, idx, w = correspondence(box[2 + k], box[view], l_cells, local_grid, global_grid)
        teacher_idx[view].append(idx)
        teacher_w[view].append(w)
        teacher_valid[view].append(valid)
    cat = lambda parts: jnp.stack([jnp.concatenate(p) for p in parts])             # (2, St, ...)
    return student_mask, cat(teacher_idx), cat(teacher_w), cat(teacher_valid).astype(jnp.float32)

  student_mask, teacher_idx, teacher_w, teacher_valid = jax.vmap(per_image)(boxes, global_cells, local_cells)
  view_major = lambda x: jnp.swapaxes(x, 0, 1).reshape((-1,) + x.shape[2:])
  student_idx = jnp.concatenate([global_cells, global_cells]).astype(jnp.int32)
  teacher_w = view_major(teacher_w)
  return Samples(student_idx=student_idx, student_mask=view_major(student_mask),
                 teacher_idx=view_major(teacher_idx), teacher_w=teacher_w,
                 teacher_mask=teacher_w.sum(-1), local_idx=local_cells.astype(jnp.int32),
                 teacher_valid=view_major(teacher_valid))


def draw_cells(keys: jax.Array, global_grid: int, local_grid: int, global_window: int,
               local_window: int, mode: str = 'stratified') -> tuple[jax.Array, jax.Array]:
  """Per-image cell patterns (B, Sg), (B, Sl) from per-example keys (B,) (docs/design.md, contract 2)."""
  def per_image(key):
    k_global, k_local = jax.random.split(key)
    return (stratified_cells(k_global, global_grid, global_window, mode),
            stratified_cells(k_local, local_grid, local_window, mode))
  return jax.vmap(per_image)(keys)


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
  """Token grids of the global and local crops and the SRS window sizes (docs/method.md §3.2)."""
  global_grid: int = 14
  local_grid: int = 6
  global_window: int = 3
  local_window: int = 2
  mode: str = 'stratified'      # stratified | fixed | uniform

  def __post_init__(self):
    if self.mode not in SAMPLING_MODES:
      raise ValueError(f'config.udi.sampling={self.mode!r} is not known; use one of {SAMPLING_MODES}.')
    for name, grid, window in (('global', self.global_grid, self.global_window),
                               ('local', self.local_grid, self.local_window)):
      if not 1 <= window <= grid:
        raise ValueError(f'config.udi.{name}_window={window} does not fit the {grid}x{grid} token grid '
                         f'of the {name} crops; choose a window between 1 and {grid}.')

  @classmethod
  def from_config(cls, config) -> 'SamplingSettings':
    patch = config.model.patch_size
    return cls(global_grid=config.data.global_size // patch, local_grid=config.data.local_size // patch,
               global_window=config.udi.global_window, local_window=config.udi.local_window,
               mode=config.udi.sampling)


def draw_samples(boxes: jax.Array, keys: jax.Array, settings: SamplingSettings) -> Samples:
  """Stratified sampling and correspondences of a batch: boxes (B, 2+n_l, 4), keys (B,)."""
  s = settings
  global_cells, local_cells = draw_cells(keys, s.global_grid, s.local_grid, s.global_window,
                                         s.local_window, s.mode)
  return correspond_batch(boxes, global_cells, local_cells, s.global_grid, s.local_grid)

"""A dense protocol scored on whole validation images at their own label resolution, as mmseg's
sliding-window inference does for ADE20K.

Each image is turned so that its longer side is horizontal, resized so that its shorter side is `size`
(bicubic; the longer side to the nearest multiple of the patch, at least `size`), and cut into `size` x
`size` windows along its longer side: a stride of two thirds of a window (a multiple of the patch), the
last window flush with the end. Each window's patch tokens are scored by the protocol (`token_scores`:
the probe's logits, or a one for the class of the k-NN vote); the scores of overlapping windows are
averaged on the image's token grid, resized bilinearly (half-pixel centres, as torch's
`align_corners=False`) to the annotation's own size, and every pixel of the annotation that is not
labelled 255 is scored by the class of highest score.

Two details differ from mmseg: the windows are averaged on the token grid, not after upsampling each to
pixels, and one bilinear resize takes the token grid to the annotation (mmseg resizes to the window's
pixels, then the resized image to the annotation). Both change only pixels within a token of a window's
or class's border.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from PIL import Image
from tqdm import tqdm

from udi_jax.data.segmentation import read_whole
from udi_jax.data.sources import UnreadableImage
from udi_jax.evaluate.batches import record_name
from udi_jax.evaluate.dense import PatchFeatures, confusion_matrix

TokenScores = Callable[[np.ndarray], np.ndarray]     # (n, T, D) tokens -> (n, T, C) class scores
SHAPE_BUCKET = 64        # output sides rounded up to a multiple of this (fewer compiled shapes)
GRID_BUCKET = 8          # token-grid lengths likewise


@dataclasses.dataclass
class Windows:
  """One validation image cut into windows, with the sums of its windows' scores on its token grid."""
  mask: np.ndarray                   # (H, W), turned like the image (W >= H)
  crops: np.ndarray                  # (n, size, size, 3) uint8
  starts: list[int]                  # each window's first token column
  grid: tuple[int, int]              # the resized image's token grid (rows, columns)
  sums: dict = dataclasses.field(default_factory=dict)
  done: int = 0


def cut_windows(image: Image.Image, mask: np.ndarray, size: int, patch: int) -> Windows:
  if image.height > image.width:
    image, mask = image.transpose(Image.Transpose.TRANSPOSE), mask.T
  length = max(size, int(round(image.width * size / image.height / patch)) * patch)
  resized = np.asarray(image.resize((length, size), Image.Resampling.BICUBIC), np.uint8)
  stride = max(patch, (2 * size // 3) // patch * patch)
  starts = sorted(set(range(0, length - size, stride)) | {length - size})
  crops = np.stack([resized[:, s:s + size] for s in starts])
  return Windows(np.ascontiguousarray(mask), crops, [s // patch for s in starts], (size // patch, length // patch))


@functools.partial(jax.jit, static_argnames=('out_shape',))
def _labels_at(grid_scores: jax.Array, scale: jax.Array, out_shape: tuple[int, int]) -> jax.Array:
  """argmax over classes of (h, w, C) token-grid scores resized bilinearly by `scale` onto `out_shape`."""
  resized = jax.image.scale_and_translate(grid_scores, (*out_shape, grid_scores.shape[-1]), (0, 1), scale,
                                          jnp.zeros(2), method='linear', antialias=False)
  return jnp.argmax(resized, axis=-1).astype(jnp.int32)


def labels_at_resolution(grid_scores: np.ndarray, height: int, width: int) -> np.ndarray:
  """(h, w, C) scores on a token grid -> (height, width) classes: the grid stretched over the image, its
  scores interpolated bilinearly at the pixels' centres (edge-padded and bucketed so few shapes compile)."""
  rows, cols = grid_scores.shape[:2]
  up = lambda n, step: -(-n // step) * step
  padded = np.pad(grid_scores, ((0, up(rows, GRID_BUCKET) - rows), (0, up(cols, GRID_BUCKET) - cols), (0, 0)),
                  mode='edge')
  scale = jnp.asarray([height / rows, width / cols], jnp.float32)
  labels = _labels_at(jnp.asarray(padded), scale, (up(height, SHAPE_BUCKET), up(width, SHAPE_BUCKET)))
  return np.asarray(labels)[:height, :width]


def _windows(source, size: int, patch: int, num_classes: int, reduce_zero_label: bool,
             skipped: list) -> Iterator[Windows]:
  for index in range(len(source)):
    try:
      image, mask = read_whole(source[index], num_classes, reduce_zero_label)
    except UnreadableImage as e:
      logging.warning('Skipping unreadable example %d (%s): %s', index, record_name(source, index), e)
      skipped.append(index)
      continue
    yield cut_windows(image, mask, size, patch)


def whole_image_confusions(features: PatchFeatures, source, scorers: dict[str, TokenScores], num_classes: int,
                           reduce_zero_label: bool = False, desc: str = 'dense validation'
                           ) -> tuple[dict[str, np.ndarray], int, int]:
  """({protocol: (C, C) confusion over every labelled pixel of every readable image}, images scored,
  images skipped). The windows of consecutive images share the feature batches; every process scores
  every image (the features are gathered), so all of them return the same."""
  confusions = {name: np.zeros((num_classes, num_classes), np.int64) for name in scorers}
  skipped, scored = [], 0
  queue: list[tuple[Windows, int]] = []      # windows waiting for a feature batch

  def run_batch(entries):
    nonlocal scored
    crops = np.zeros((features.batch_size, features.size, features.size, 3), np.uint8)
    for row, (item, w) in enumerate(entries):
      crops[row] = item.crops[w]
    first = jax.process_index() * features.rows
    tokens = features(crops[first:first + features.rows])[:len(entries)]
    token_scores = {name: scorer(tokens) for name, scorer in scorers.items()}
    for row, (item, w) in enumerate(entries):
      g = features.size // features.patch
      for name, values in token_scores.items():
        sums = item.sums.setdefault(name, np.zeros(item.grid + (num_classes,), np.float32))
        sums[:, item.starts[w]:item.starts[w] + g] += values[row].reshape(g, g, -1)
      item.done += 1
      if item.done == len(item.starts):
        counts = np.zeros(item.grid[1], np.float32)
        for start in item.starts:
          counts[start:start + g] += 1
        for name in scorers:
          labels = labels_at_resolution(item.sums[name] / counts[None, :, None], *item.mask.shape)
          confusions[name] += confusion_matrix(item.mask, labels, num_classes)
        item.crops = item.sums = None
        scored += 1

  images = _windows(source, features.size, features.patch, num_classes, reduce_zero_label, skipped)
  for item in tqdm(images, total=len(source), desc=desc, disable=jax.process_index() != 0, leave=False):
    queue += [(item, w) for w in range(len(item.starts))]
    while len(queue) >= features.batch_size:
      run_batch(queue[:features.batch_size])
      queue = queue[features.batch_size:]
  if queue:
    run_batch(queue)
  return confusions, scored, len(skipped)

"""Dense evaluation on frozen patch tokens: a linear segmentation probe and a k-NN over patches.

Features: the patch tokens of the last block after the backbone's final norm (`blocks=4`: those of the
last four blocks, each normed, concatenated), on `size` x `size` evaluation crops (shorter side to
`size`, bicubic, centre crop; the class map resized with nearest neighbours). Both protocols report the
mean IoU over the classes present in the labels or predictions (mmseg's convention: a class with an
empty union is left out) and the pixel accuracy, on every non-ignored (255) pixel of the validation crops.

- `linear` (the frozen-feature protocol of DINOv2's linear segmentation): each token's feature is
  standardised with the training tokens' per-channel mean and variance (a batch-norm with its population
  statistics; its affine part is absorbed by the linear layer), one linear layer maps it to class logits,
  the logits are bilinearly upsampled to the crop and trained with a pixel-wise cross-entropy ignoring
  255, by AdamW (cosine learning rate, no warm-up) on the cached training features, on the accelerator.
- `knn` (non-parametric): every training patch carries the majority class of its pixels (patches of
  ignored pixels only are left out), the bank is subsampled to at most `bank_size` patches; each
  validation patch takes the weighted vote of its k nearest bank patches (cosine, exp(s/0.07), as the
  image k-NN, chunked), and its pixels take the patch's class.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils
from tqdm import tqdm

from udi_jax.data.photometric import preprocess
from udi_jax.data.segmentation import IGNORE, read_pair
from udi_jax.data.sources import UnreadableImage
from udi_jax.evaluate import knn
from udi_jax.mesh import batch_sharding, data_mesh, replicated
from udi_jax.models.vit import layer_norm


# ---- Scores

def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
  """(C, C) counts, rows the true class, columns the predicted one; pixels labelled 255 are left out."""
  labels, predictions = np.asarray(labels).reshape(-1), np.asarray(predictions).reshape(-1)
  keep = labels != IGNORE
  return np.bincount(labels[keep].astype(np.int64) * num_classes + predictions[keep],
                     minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def scores(confusion: np.ndarray) -> dict[str, Any]:
  """{'miou', 'pixel_accuracy' (%), 'iou' per class (None where the class has an empty union)}."""
  confusion = np.asarray(confusion, np.float64)
  hits = np.diag(confusion)
  union = confusion.sum(0) + confusion.sum(1) - hits
  iou = np.where(union > 0, hits / np.maximum(union, 1), np.nan)
  return {'miou': float(100 * np.nanmean(iou)) if np.any(union > 0) else 0.0,
          'pixel_accuracy': float(100 * hits.sum() / max(confusion.sum(), 1)),
          'iou': [None if np.isnan(v) else round(float(100 * v), 2) for v in iou]}


# ---- Features

@dataclasses.dataclass
class DenseBatch:
  """Picklable grain map: global batch t -> this process's rows, padded past the end of the source:
  {'image' uint8 (rows, size, size, 3), 'mask' uint8 (rows, size, size), 'valid' bool}."""
  source: Any
  size: int
  batch_size: int
  process_index: int
  process_count: int

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    rows = self.batch_size // self.process_count
    first = int(step) * self.batch_size + self.process_index * rows
    images = np.zeros((rows, self.size, self.size, 3), np.uint8)
    masks = np.full((rows, self.size, self.size), IGNORE, np.uint8)
    valid = np.zeros(rows, bool)
    for r, index in enumerate(range(first, min(first + rows, len(self.source)))):
      try:
        images[r], masks[r] = read_pair(self.source[index], self.size, self.source.num_classes)
      except UnreadableImage as e:
        name = self.source.paths[index] if hasattr(self.source, 'paths') else f'record {index}'
        logging.warning('Skipping unreadable segmentation example %d (%s): %s', index, name, e)
        continue
      valid[r] = True
    return {'image': images, 'mask': masks, 'valid': valid}


def _patch_features(nets, backbone_params, images: jax.Array, blocks: int) -> jax.Array:
  out = nets.backbone.apply({'params': backbone_params}, preprocess(images),
                            return_patch_blocks=blocks if blocks > 1 else 0)
  if blocks > 1:
    return jnp.moveaxis(out.patch_blocks, 1, 2).reshape(out.patch.shape[:2] + (-1,)).astype(jnp.float32)
  norm = layer_norm('norm', nets.backbone.dtype)
  return norm.apply({'params': backbone_params['norm']}, out.patch).astype(jnp.float32)


@functools.lru_cache(maxsize=8)
def compiled_patch_features(nets, blocks: int, mesh):
  return jax.jit(lambda p, x: _patch_features(nets, p, x, blocks), out_shardings=batch_sharding(mesh))


def extract(nets, backbone_params, source, size: int, batch_size: int, blocks: int = 1,
            desc: str = 'patch features') -> tuple[np.ndarray, np.ndarray, int]:
  """(features (N, h*w, D*blocks) float32, masks (N, size, size) uint8, skipped examples) of every
  readable example of `source`. `batch_size` is global, rounded up to a multiple of the device count."""
  patch = nets.backbone.patch_size
  if size % patch:
    raise ValueError(f'config.eval.dense_size={size} is not a multiple of the patch size {patch}.')
  mesh = data_mesh()
  batch_size = -(-batch_size // mesh.devices.size) * mesh.devices.size
  sharding = batch_sharding(mesh)
  fn = compiled_patch_features(nets, blocks, mesh)
  params = jax.device_put(backbone_params, replicated(mesh))
  gather = ((lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True))) if jax.process_count() > 1
            else np.asarray)
  maker = DenseBatch(source, size, batch_size, jax.process_index(), jax.process_count())
  steps = -(-len(source) // batch_size)
  batches = grain.MapDataset.range(steps).map(maker).to_iter_dataset(
      grain.ReadOptions(num_threads=4, prefetch_buffer_size=8))
  feats, masks, valid = [], [], []
  for batch in tqdm(batches, total=steps, desc=desc, disable=jax.process_index() != 0, leave=False):
    feats.append(gather(fn(params, jax.make_array_from_process_local_data(sharding, batch['image']))))
    masks.append(gather(batch['mask']))
    valid.append(gather(batch['valid']))
  keep = np.concatenate(valid)[:len(source)]
  feats, masks = np.concatenate(feats)[:len(source)], np.concatenate(masks)[:len(source)]
  return feats[keep], masks[keep], int(len(source) - keep.sum())


# ---- Linear probe

@dataclasses.dataclass(frozen=True)
class DenseProbeSettings:
  epochs: int = 20
  batch_size: int = 16        # images per step
  lr: float = 1e-2
  weight_decay: float = 1e-4
  seed: int = 0


def upsampled_logits(params: dict, feats: jax.Array, grid: int, size: int) -> jax.Array:
  """Class logits (B, size, size, C) of standardised token features (B, grid*grid, D)."""
  logits = feats @ params['w'] + params['b']
  logits = logits.reshape(feats.shape[0], grid, grid, -1)
  return jax.image.resize(logits, (feats.shape[0], size, size, logits.shape[-1]), 'bilinear')


def pixel_cross_entropy(logits: jax.Array, masks: jax.Array) -> jax.Array:
  """Mean cross-entropy over the pixels not labelled 255."""
  keep = masks != IGNORE
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(keep, masks, 0).astype(jnp.int32))
  return jnp.sum(losses * keep) / jnp.maximum(jnp.sum(keep), 1)


def train_linear(train_x: np.ndarray, train_masks: np.ndarray, test_x: np.ndarray, test_masks: np.ndarray,
                 num_classes: int, settings: DenseProbeSettings = DenseProbeSettings()) -> dict[str, Any]:
  """Trains the probe on (N, h*w, D) features and (N, S, S) masks; scores it on the test set."""
  n, tokens, dim = train_x.shape
  grid, size = int(round(np.sqrt(tokens))), train_masks.shape[-1]
  mean = train_x.reshape(-1, dim).mean(0)
  std = np.sqrt(train_x.reshape(-1, dim).var(0) + 1e-5)
  standardise = lambda x: (jnp.asarray(x, jnp.float32) - mean) / std
  xs, ms = standardise(train_x), jnp.asarray(train_masks)
  batch = min(settings.batch_size, n)
  steps_per_epoch = n // batch
  tx = optax.adamw(optax.cosine_decay_schedule(settings.lr, steps_per_epoch * settings.epochs),
                   weight_decay=settings.weight_decay)
  params = {'w': 0.01 * jax.random.normal(jax.random.key(settings.seed), (dim, num_classes)),
            'b': jnp.zeros((num_classes,))}
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, idx):
    loss, grads = jax.value_and_grad(
        lambda p: pixel_cross_entropy(upsampled_logits(p, xs[idx], grid, size), ms[idx]))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(settings.seed)
  losses = []
  for _ in range(settings.epochs):
    order = rng.permutation(n)
    for s in range(steps_per_epoch):
      params, opt_state, loss = step(params, opt_state, jnp.asarray(order[s * batch:(s + 1) * batch]))
    losses.append(float(loss))

  predict = jax.jit(lambda p, x: jnp.argmax(upsampled_logits(p, x, grid, size), -1).astype(jnp.int32))
  confusion = np.zeros((num_classes, num_classes), np.int64)
  for start in range(0, len(test_x), batch):
    predicted = np.asarray(predict(params, standardise(test_x[start:start + batch])))
    confusion += confusion_matrix(test_masks[start:start + batch], predicted, num_classes)
  return {**scores(confusion), 'final_train_loss': losses[-1] if losses else None, 'epochs': settings.epochs}


# ---- k-NN over patches

def patch_labels(masks: np.ndarray, patch: int, num_classes: int) -> np.ndarray:
  """The majority class of each patch's pixels (N, h*w), IGNORE where all of them are ignored; ties go
  to the lower class id."""
  n, size, _ = masks.shape
  grid = size // patch
  labels = np.empty((n, grid * grid), np.uint8)
  for start in range(0, n, 64):                       # bounded memory: (64·h·w, C) counts at a time
    chunk = masks[start:start + 64]
    blocks = chunk.reshape(len(chunk), grid, patch, grid, patch).transpose(0, 1, 3, 2, 4)
    blocks = blocks.reshape(-1, patch * patch).astype(np.int64)
    counts = np.zeros((len(blocks), num_classes + 1), np.int64)
    np.add.at(counts, (np.repeat(np.arange(len(blocks)), patch * patch),
                       np.where(blocks == IGNORE, num_classes, blocks).reshape(-1)), 1)
    majority = np.argmax(counts[:, :num_classes], axis=1)
    majority = np.where(counts[:, :num_classes].sum(1) > 0, majority, IGNORE)
    labels[start:start + len(chunk)] = majority.reshape(len(chunk), -1)
  return labels


def knn_segment(train_x: np.ndarray, train_masks: np.ndarray, test_x: np.ndarray, test_masks: np.ndarray,
                num_classes: int, patch: int, k: int = 20, bank_size: int = 200_000, seed: int = 0
                ) -> dict[str, Any]:
  """Labels each test patch by a k-NN vote over the training patches; scores the pixels."""
  dim = train_x.shape[-1]
  bank_labels = patch_labels(train_masks, patch, num_classes).reshape(-1)
  bank = train_x.reshape(-1, dim)
  keep = np.flatnonzero(bank_labels != IGNORE)
  if len(keep) > bank_size:
    keep = np.sort(np.random.default_rng(seed).choice(keep, bank_size, replace=False))
  if not len(keep):
    raise ValueError('No training patch has a labelled pixel; check the annotations.')
  predicted = knn.knn_predict(bank[keep], bank_labels[keep], test_x.reshape(-1, dim), num_classes, ks=(k,))
  top1 = next(iter(predicted.values()))[:, 0]
  grid = test_masks.shape[-1] // patch
  pixels = np.repeat(np.repeat(top1.reshape(-1, grid, grid), patch, axis=1), patch, axis=2)
  return {**scores(confusion_matrix(test_masks, pixels, num_classes)), 'k': min(k, len(keep)),
          'bank_patches': int(len(keep))}

"""Dense evaluation on frozen patch tokens: a linear segmentation probe and a k-NN over patches.

Features: the patch tokens of the last block after the backbone's final norm (`blocks=4`: those of the
last four blocks, each normed, concatenated). Both protocols learn from `size` x `size` training crops
(shorter side to `size`, bicubic, centre crop; the class map resized with nearest neighbours), whose
tokens are held on the host in bfloat16 and streamed to the accelerator a batch at a time (ADE20K's
20 210 training images at 448 px, ViT-S/16: 784 tokens x 384 channels x 2 bytes = 12.2 GB of host
memory, plus 4.1 GB of class maps; docs/evaluation.md has the device's share). They are scored on
the whole validation images at their own label resolution (`dense_whole.py`): the mean IoU over the
classes present in the labels or predictions (mmseg's convention: a class with an empty union is left
out) and the pixel accuracy, over every pixel not labelled 255.

- `linear` (the frozen-feature protocol of DINOv2's linear segmentation): each token's feature is
  standardised with the training tokens' per-channel mean and variance (a batch-norm with its population
  statistics; its affine part is absorbed by the linear layer), one linear layer maps it to class logits,
  the logits are bilinearly upsampled to the crop and trained with a pixel-wise cross-entropy ignoring
  255, by AdamW (cosine learning rate, no warm-up).
- `knn` (non-parametric): every training patch carries the majority class of its pixels (patches of
  ignored pixels only are left out), the bank is subsampled to at most `bank_size` patches; each
  validation patch takes the weighted vote of its k nearest bank patches (cosine, exp(s/0.07), as the
  image k-NN, chunked), and scores one for the class that wins.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from udi_jax.data.photometric import preprocess
from udi_jax.data.segmentation import IGNORE, read_pair
from udi_jax.evaluate import knn
from udi_jax.evaluate.batches import DeviceBatches
from udi_jax.mesh import batch_sharding, replicated
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

FEATURE_DTYPE = np.dtype(jnp.bfloat16)     # the training tokens on the host (ml_dtypes' bfloat16)


@dataclasses.dataclass(frozen=True)
class SegmentationRow:
  """Picklable reader of one record: {'image', 'mask'}, the training crop and its class map."""
  size: int
  num_classes: int
  reduce_zero_label: bool = False

  def __call__(self, record: dict) -> dict[str, np.ndarray]:
    image, mask = read_pair(record, self.size, self.num_classes, self.reduce_zero_label)
    return {'image': image, 'mask': mask}


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


class PatchFeatures(DeviceBatches):
  """The patch tokens of global batches of `size` x `size` images: every process gives its rows of a
  batch, every process gets the tokens of the whole batch."""

  def __init__(self, nets, backbone_params, size: int, batch_size: int, blocks: int = 1):
    patch = nets.backbone.patch_size
    if size % patch:
      raise ValueError(f'config.eval.dense.size={size} is not a multiple of the patch size {patch}.')
    super().__init__(batch_size)
    self.size, self.patch = size, patch
    self._fn = compiled_patch_features(nets, blocks, self.mesh)
    self._params = jax.device_put(backbone_params, replicated(self.mesh))

  def __call__(self, local_images: np.ndarray) -> np.ndarray:
    """(rows, size, size, 3) uint8 of this process -> (batch_size, tokens, D) float32 of all processes."""
    return self.gather(self._fn(self._params, self.put(local_images)))


def extract(nets, backbone_params, source, size: int, batch_size: int, blocks: int = 1,
            desc: str = 'patch features', reduce_zero_label: bool = False
            ) -> tuple[np.ndarray, np.ndarray, int]:
  """(features (N, h*w, D*blocks) bfloat16, masks (N, size, size) uint8, skipped examples) of the training
  crops of every readable example of `source`, written into arrays allocated once."""
  features = PatchFeatures(nets, backbone_params, size, batch_size, blocks)
  read = SegmentationRow(size, source.num_classes, reduce_zero_label)
  padding = {'image': np.zeros((size, size, 3), np.uint8), 'mask': np.full((size, size), IGNORE, np.uint8)}
  feats = masks = None
  kept = 0
  for step, batch in enumerate(features.read(source, read, padding, desc)):
    tokens = features(batch['image'])
    rows = np.flatnonzero(features.gather(batch['valid'])[:len(source) - step * features.batch_size])
    if feats is None:
      feats = np.empty((len(source),) + tokens.shape[1:], FEATURE_DTYPE)
      masks = np.empty((len(source), size, size), np.uint8)
    feats[kept:kept + len(rows)] = tokens[rows]
    masks[kept:kept + len(rows)] = features.gather(batch['mask'])[rows]
    kept += len(rows)
  return feats[:kept], masks[:kept], int(len(source) - kept)


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


def channel_statistics(x: np.ndarray, chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and standard deviation (variance + 1e-5) of (N, T, D) tokens, in float64 chunks."""
  sums, squares = np.zeros(x.shape[-1]), np.zeros(x.shape[-1])
  for start in range(0, len(x), chunk):
    part = np.asarray(x[start:start + chunk], np.float64).reshape(-1, x.shape[-1])
    sums, squares = sums + part.sum(0), squares + (part ** 2).sum(0)
  count = x.shape[0] * x.shape[1]
  mean = sums / count
  std = np.sqrt(np.maximum(squares / count - mean ** 2, 0) + 1e-5)
  return mean.astype(np.float32), std.astype(np.float32)


@jax.jit
def _token_logits(params, mean, std, x):
  return ((x.astype(jnp.float32) - mean) / std) @ params['w'] + params['b']


@dataclasses.dataclass
class LinearProbe:
  params: dict                 # 'w' (D, C), 'b' (C,)
  mean: np.ndarray             # the training tokens' per-channel statistics (D,)
  std: np.ndarray
  final_train_loss: Optional[float]

  def token_scores(self, x: np.ndarray) -> np.ndarray:
    """(n, T, D) tokens -> (n, T, C) class logits, on the accelerator."""
    return np.asarray(_token_logits(self.params, self.mean, self.std, jnp.asarray(x)))


def fit_segmentation_probe(train_x: np.ndarray, train_masks: np.ndarray, num_classes: int,
                           settings: DenseProbeSettings = DenseProbeSettings()) -> LinearProbe:
  """Trains the linear segmentation probe by AdamW on (N, h*w, D) token features (any float dtype, kept on
  the host: each step sends its batch) and (N, S, S) masks."""
  n, tokens, dim = train_x.shape
  grid, size = int(round(np.sqrt(tokens))), train_masks.shape[-1]
  mean, std = channel_statistics(train_x)
  batch = min(settings.batch_size, n)
  steps_per_epoch = n // batch
  tx = optax.adamw(optax.cosine_decay_schedule(settings.lr, steps_per_epoch * settings.epochs),
                   weight_decay=settings.weight_decay)
  params = {'w': 0.01 * jax.random.normal(jax.random.key(settings.seed), (dim, num_classes)),
            'b': jnp.zeros((num_classes,))}
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, x, masks):
    standardised = (x.astype(jnp.float32) - mean) / std
    loss, grads = jax.value_and_grad(
        lambda p: pixel_cross_entropy(upsampled_logits(p, standardised, grid, size), masks))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(settings.seed)
  loss = None
  for _ in range(settings.epochs):
    order = rng.permutation(n)
    for s in range(steps_per_epoch):
      rows = np.sort(order[s * batch:(s + 1) * batch])
      params, opt_state, loss = step(params, opt_state, train_x[rows], train_masks[rows])
  return LinearProbe(params, mean, std, None if loss is None else float(loss))


def segmentation_probe_on_crops(train_x: np.ndarray, train_masks: np.ndarray, test_x: np.ndarray,
                                test_masks: np.ndarray, num_classes: int,
                                settings: DenseProbeSettings = DenseProbeSettings()) -> dict[str, Any]:
  """Trains the probe and scores it on test crops of the training crops' grid (the logits upsampled to
  the crop): the protocol on equal crops, without the whole-image evaluation."""
  probe = fit_segmentation_probe(train_x, train_masks, num_classes, settings)
  grid, size = int(round(np.sqrt(train_x.shape[1]))), train_masks.shape[-1]
  predict = jax.jit(lambda p, x: jnp.argmax(upsampled_logits(p, (x - probe.mean) / probe.std, grid, size),
                                            -1).astype(jnp.int32))
  confusion = np.zeros((num_classes, num_classes), np.int64)
  for start in range(0, len(test_x), settings.batch_size):
    chunk = slice(start, start + settings.batch_size)
    predicted = np.asarray(predict(probe.params, jnp.asarray(test_x[chunk], jnp.float32)))
    confusion += confusion_matrix(test_masks[chunk], predicted, num_classes)
  return {**scores(confusion), 'final_train_loss': probe.final_train_loss, 'epochs': settings.epochs}


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


@dataclasses.dataclass
class PatchBank:
  """The labelled training patches a validation patch votes among."""
  features: jax.Array          # (M, D) float32, L2-normalised, on the accelerator (sent once)
  labels: np.ndarray           # (M,)
  num_classes: int
  k: int

  def predict(self, x: np.ndarray) -> np.ndarray:
    """(n, T, D) tokens -> (n, T): the class of each token's weighted vote."""
    top = knn.knn_predict(self.features, self.labels, x.reshape(-1, x.shape[-1]), self.num_classes,
                          ks=(self.k,))
    return next(iter(top.values()))[:, 0].reshape(x.shape[:2])

  def token_scores(self, x: np.ndarray) -> np.ndarray:
    """(n, T, D) tokens -> (n, T, C): one for the class of each token's vote."""
    return np.eye(self.num_classes, dtype=np.float32)[self.predict(x)]


def patch_bank(train_x: np.ndarray, train_masks: np.ndarray, num_classes: int, patch: int, k: int = 20,
               bank_size: int = 200_000, seed: int = 0) -> PatchBank:
  """The training patches with a labelled pixel, each with its majority class, subsampled to `bank_size`."""
  bank_labels = patch_labels(train_masks, patch, num_classes).reshape(-1)
  keep = np.flatnonzero(bank_labels != IGNORE)
  if len(keep) > bank_size:
    keep = np.sort(np.random.default_rng(seed).choice(keep, bank_size, replace=False))
  if not len(keep):
    raise ValueError('No training patch has a labelled pixel; check the annotations.')
  features = knn.l2_normalize(jnp.asarray(train_x.reshape(-1, train_x.shape[-1])[keep], jnp.float32))
  return PatchBank(features, bank_labels[keep], num_classes, min(k, len(keep)))


def knn_segment(train_x: np.ndarray, train_masks: np.ndarray, test_x: np.ndarray, test_masks: np.ndarray,
                num_classes: int, patch: int, k: int = 20, bank_size: int = 200_000, seed: int = 0
                ) -> dict[str, Any]:
  """Labels each test-crop patch by a k-NN vote over the training patches; scores the crops' pixels
  (the protocol on equal crops, without the whole-image evaluation)."""
  bank = patch_bank(train_x, train_masks, num_classes, patch, k, bank_size, seed)
  grid = test_masks.shape[-1] // patch
  pixels = np.repeat(np.repeat(bank.predict(test_x).reshape(-1, grid, grid), patch, axis=1), patch, axis=2)
  return {**scores(confusion_matrix(test_masks, pixels, num_classes)), 'k': bank.k,
          'bank_patches': int(len(bank.labels))}

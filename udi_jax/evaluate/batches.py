"""Evaluation batches on every device and every process: a source read row by row into global batches,
each process reading its rows, the results gathered so that every process sees the whole batch.

One global batch of `batch_size` rows (rounded up to a multiple of the device count) is split over the
processes in contiguous parts, as in training (docs/design.md, contract 1); past the end of the source,
and where a record cannot be read (one warning each), a row is padding with `valid` False.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator

import grain
import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from tqdm import tqdm

from udi_jax.data.sources import UnreadableImage
from udi_jax.mesh import batch_sharding, data_mesh

Reader = Callable[[dict], dict[str, np.ndarray]]     # one record -> its arrays (UnreadableImage: skip it)


def record_name(source, index: int) -> str:
  return source.paths[index] if hasattr(source, 'paths') else f'record {index}'


@dataclasses.dataclass
class ProcessRows:
  """Picklable grain map: global batch t -> this process's rows of it, {key: (rows, ...)} plus 'valid'."""
  source: Any
  read: Reader
  padding: dict[str, np.ndarray]     # one row of each array, for the rows that hold no record
  batch_size: int                    # global
  process_index: int
  process_count: int

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    rows = self.batch_size // self.process_count
    first = int(step) * self.batch_size + self.process_index * rows
    batch = {k: np.repeat(v[None], rows, 0) for k, v in self.padding.items()}
    batch['valid'] = np.zeros(rows, bool)
    for r, index in enumerate(range(first, min(first + rows, len(self.source)))):
      try:
        arrays = self.read(self.source[index])
      except UnreadableImage as e:
        logging.warning('Skipping unreadable example %d (%s): %s', index, record_name(self.source, index), e)
        continue
      for key, value in arrays.items():
        batch[key][r] = value
      batch['valid'][r] = True
    return batch


class DeviceBatches:
  """Global batches of `batch_size` rows over every device of every process."""

  def __init__(self, batch_size: int):
    mesh = data_mesh()
    self.mesh = mesh
    self.batch_size = -(-batch_size // mesh.devices.size) * mesh.devices.size
    self.rows = self.batch_size // jax.process_count()
    self.sharding = batch_sharding(mesh)

  def put(self, local: np.ndarray) -> jax.Array:
    """This process's rows of a global batch -> the global array, sharded over the devices."""
    return jax.make_array_from_process_local_data(self.sharding, local)

  def gather(self, x) -> np.ndarray:
    """A global array, or this process's rows -> the whole batch on the host of every process."""
    if jax.process_count() == 1:
      return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))

  def read(self, source, read: Reader, padding: dict[str, np.ndarray], desc: str,
           num_threads: int = 4) -> Iterator[dict[str, np.ndarray]]:
    """This process's rows of every global batch over the whole source, in order, with a progress bar."""
    steps = -(-len(source) // self.batch_size)
    maker = ProcessRows(source, read, padding, self.batch_size, jax.process_index(), jax.process_count())
    batches = grain.MapDataset.range(steps).map(maker).to_iter_dataset(
        grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2 * num_threads))
    return iter(tqdm(batches, total=steps, desc=desc, disable=jax.process_index() != 0, leave=False))

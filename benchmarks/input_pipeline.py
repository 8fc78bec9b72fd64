"""Host input-pipeline throughput on ImageNet-size JPEGs: `python benchmarks/input_pipeline.py`.

Writes JPEGs of about 470x410 (quality 90) made from the photos that ship with scikit-image and
scikit-learn into a temporary ImageFolder, then times the real pipeline (decode, 2x224 + 10x96 crops with
boxes, batching) after a warm-up batch. It reports images/s for one worker process with one thread
(the per-worker figure) and for the requested worker counts. Target: >= 150 images/s per worker.
"""

from __future__ import annotations

import argparse
import pathlib
import tempfile
import time

import numpy as np
from absl import flags
from PIL import Image

from udi_jax.data import sources
from udi_jax.data.crops import CropSettings
from udi_jax.data.pipeline import InputPipeline, PipelineSettings


def photos() -> list[np.ndarray]:
  from skimage import data
  from sklearn.datasets import load_sample_images
  names = ('astronaut', 'chelsea', 'coffee', 'rocket', 'cat', 'hubble_deep_field', 'immunohistochemistry')
  images = [getattr(data, n)() for n in names] + list(load_sample_images().images)
  return [im for im in images if im.ndim == 3 and im.shape[-1] == 3]


def write_folder(root: pathlib.Path, count: int, seed: int = 0) -> None:
  """`count` JPEGs of about 470x410 px, quality 90, cut from the photos at random scales and offsets."""
  rng = np.random.default_rng(seed)
  base = photos()
  for k in range(count):
    photo = Image.fromarray(base[k % len(base)])
    w, h = int(rng.integers(440, 500)), int(rng.integers(380, 440))
    scale = max(w / photo.width, h / photo.height) * rng.uniform(1.0, 1.3)
    resized = photo.resize((int(photo.width * scale) + 1, int(photo.height * scale) + 1), Image.BICUBIC)
    left, top = int(rng.integers(0, resized.width - w + 1)), int(rng.integers(0, resized.height - h + 1))
    folder = root / f'class{k % 10}'
    folder.mkdir(parents=True, exist_ok=True)
    resized.crop((left, top, left + w, top + h)).save(folder / f'{k:05d}.jpg', quality=90)


def measure(source, workers: int, threads: int, batch: int, steps: int) -> float:
  settings = PipelineSettings(seed=0, global_batch=batch, crops=CropSettings(), num_workers=workers,
                              num_threads=threads)
  pipe = InputPipeline(source, settings, num_steps=steps + max(workers, 1) * threads + 1,
                       process_index=0, process_count=1)
  for _ in range(max(workers, 1) * threads):   # warm-up: start workers, fill the pipes
    next(pipe)
  start = time.perf_counter()
  for _ in range(steps):
    next(pipe)
  elapsed = time.perf_counter() - start
  pipe.close()
  return steps * batch / elapsed


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--images', type=int, default=400, help='JPEGs to write')
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--steps', type=int, default=8, help='timed batches per setting')
  parser.add_argument('--workers', type=int, nargs='*', default=[1, 2], help='worker counts to time')
  args = parser.parse_args()
  flags.FLAGS.mark_as_parsed()
  with tempfile.TemporaryDirectory() as tmp:
    root = pathlib.Path(tmp)
    write_folder(root, args.images)
    source = sources.open_source(f'imagefolder:{root}')
    sizes = [Image.open(p).size for p in source.paths[:50]]
    print(f'{len(source)} JPEGs, mean size {np.mean([s[0] for s in sizes]):.0f}x'
          f'{np.mean([s[1] for s in sizes]):.0f}, crops 2x224 + 10x96, batch {args.batch}')
    per_worker = measure(source, workers=1, threads=1, batch=args.batch, steps=args.steps)
    print(f'one worker, one thread: {per_worker:.0f} images/s')
    for workers in args.workers:
      total = measure(source, workers=workers, threads=2, batch=args.batch, steps=args.steps)
      print(f'{workers} workers x 2 threads: {total:.0f} images/s in total, {total / workers:.0f} per worker')


if __name__ == '__main__':
  main()

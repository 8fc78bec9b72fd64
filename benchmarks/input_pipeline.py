"""Host input-pipeline throughput on ImageNet-size JPEGs: `python benchmarks/input_pipeline.py`.

Writes JPEGs of about 470x410 (quality 90) made from the photos that ship with scikit-image and
scikit-learn into a temporary ImageFolder, then times the real pipeline after a warm-up batch in both
modes of `config.data.crops_on`: host crops (decode, 2x224 + 10x96 crops with boxes, batching) and device
crops (decode, fit into a 512 canvas, boxes, batching). It reports images/s for one worker process with
one thread (the per-worker figure) and for the requested worker counts, the bytes per example moved to the
device, and what the step's crop stage costs per image on this machine's JAX device. Targets: >= 150
images/s per worker with host crops, >= 600 with device crops.
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


def measure(source, workers: int, threads: int, batch: int, steps: int, crops: CropSettings) -> float:
  settings = PipelineSettings(seed=0, global_batch=batch, crops=crops, num_workers=workers, num_threads=threads)
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


def device_crop_ms(source, crops: CropSettings, batch: int, repeats: int = 5) -> float:
  """Milliseconds per image of the step's crop stage (cut and resize 2 + n_l crops from canvases) on this
  machine's default JAX device, timed on one real batch after compiling."""
  import jax

  from udi_jax.data import device_crops
  pipe = InputPipeline(source, PipelineSettings(seed=0, global_batch=batch, crops=crops, num_threads=1),
                       num_steps=1, process_index=0, process_count=1)
  host = next(pipe)
  canvas, windows = jax.device_put(host['canvas']), jax.device_put(host['windows'])
  cut = jax.jit(device_crops.cut_batch, static_argnums=(2, 3))
  jax.block_until_ready(cut(canvas, windows, crops.global_size, crops.local_size))
  start = time.perf_counter()
  for _ in range(repeats):
    jax.block_until_ready(cut(canvas, windows, crops.global_size, crops.local_size))
  return 1e3 * (time.perf_counter() - start) / (repeats * batch)


def example_bytes(crops: CropSettings) -> int:
  """Bytes of one example's pixels moved to the device (uint8 crops, or the canvas), with the windows."""
  if crops.canvas_size:
    return crops.canvas_size ** 2 * 3 + (2 + crops.num_local) * 5 * 4
  return 3 * (2 * crops.global_size ** 2 + crops.num_local * crops.local_size ** 2)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--images', type=int, default=400, help='JPEGs to write')
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--steps', type=int, default=8, help='timed batches per setting')
  parser.add_argument('--workers', type=int, nargs='*', default=[1, 2], help='worker counts to time')
  parser.add_argument('--canvas', type=int, default=512, help='canvas side of the device-crop mode')
  args = parser.parse_args()
  flags.FLAGS.mark_as_parsed()
  modes = {'host crops': CropSettings(), 'device crops': CropSettings(canvas_size=args.canvas)}
  with tempfile.TemporaryDirectory() as tmp:
    root = pathlib.Path(tmp)
    write_folder(root, args.images)
    source = sources.open_source(f'imagefolder:{root}')
    sizes = [Image.open(p).size for p in source.paths[:50]]
    print(f'{len(source)} JPEGs, mean size {np.mean([s[0] for s in sizes]):.0f}x'
          f'{np.mean([s[1] for s in sizes]):.0f}, crops 2x224 + 10x96, batch {args.batch}')
    for mode, crops in modes.items():
      per_worker = measure(source, workers=1, threads=1, batch=args.batch, steps=args.steps, crops=crops)
      print(f'{mode}: one worker, one thread: {per_worker:.0f} images/s; '
            f'{example_bytes(crops) / 1e3:.0f} kB per example to the device', flush=True)
      for workers in args.workers:
        total = measure(source, workers=workers, threads=2, batch=args.batch, steps=args.steps, crops=crops)
        print(f'{mode}: {workers} workers x 2 threads: {total:.0f} images/s in total, {total / workers:.0f} '
              'per worker', flush=True)
    crop_ms = device_crop_ms(source, modes['device crops'], 8)
    print(f'device crops: the crop stage of the step takes {crop_ms:.1f} ms per image on this JAX device')


if __name__ == '__main__':
  main()

r"""Steady-state throughput of the real training step: `python -m udi_jax.benchmark --config=configs/vits16.py`.

Times the compiled step (photometric augmentation, sampling, teacher, student, optimiser, EMA) on
synthetic uint8 batches with realistic crop boxes, after warm-up, synchronising the device after every
step; reports the median step time, images/s per device, peak device memory, and MFU.

MFU (docs/design.md, contract 11) = model FLOPs per image x images/s / the device's peak bf16 rate. Model FLOPs are
counted analytically (`udi_flops_per_image`): matmuls and attention of the student forward on every crop,
its read-out and head rows, x3 for forward + backward, plus the teacher forward on the two global views
with its read-out at all 16 + 9 n_l points per view and the projected target rows. Element-wise work
(augmentation, softmax, layer norms) is not counted. XLA's own count (`cost_analysis`) is printed beside it.
Peak rates come from a table by device kind; `--peak_tflops` overrides it; on a CPU MFU prints as n/a.

  python -m udi_jax.benchmark --config=configs/vits16.py --per_device_batch=128
  python -m udi_jax.benchmark --config=configs/vits16.py --sweep=32,64,128,256
  python -m udi_jax.benchmark --config=configs/demo.py --steps=5
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Optional

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from udi_jax.mesh import batch_sharding, data_mesh
from udi_jax.say import say

# Dense bf16 peak TFLOP/s per device, by `device_kind`.
PEAK_BF16_TFLOPS = {
    'NVIDIA H100 80GB HBM3': 989.0, 'NVIDIA H100': 989.0, 'NVIDIA H200': 989.0, 'NVIDIA H100 PCIe': 756.0,
    'NVIDIA A100-SXM4-80GB': 312.0, 'NVIDIA A100-SXM4-40GB': 312.0, 'NVIDIA A100 80GB PCIe': 312.0,
    'TPU v4': 275.0, 'TPU v5 lite': 197.0, 'TPU v5e': 197.0, 'TPU v5p': 459.0, 'TPU v6 lite': 918.0,
    'TPU v6e': 918.0,
}


def peak_tflops(device) -> Optional[float]:
  kind = getattr(device, 'device_kind', '')
  for name, value in PEAK_BF16_TFLOPS.items():
    if kind.startswith(name):
      return value
  return None


def _vit_forward_flops(width: int, depth: int, tokens: int, patches: int, patch_size: int) -> float:
  blocks = depth * (24 * tokens * width ** 2 + 4 * tokens ** 2 * width)   # qkv, proj, MLP; q k^T, attn v
  return blocks + 2 * patches * 3 * patch_size ** 2 * width


def _readout_flops(width: int, patches: int, points: int) -> float:
  return 6 * patches * width ** 2 + 4 * points * patches * width + 2 * points * width ** 2


def udi_flops_per_image(config) -> float:
  """Analytic model FLOPs of one training step, per image (see the module docstring)."""
  from udi_jax.models.networks import PATCH, build_networks
  nets = build_networks(config)
  b, h = nets.backbone, nets.head
  d, t, p = b.embed_dim, b.num_cls_tokens, b.patch_size
  n_g, n_l = (config.data.global_size // p) ** 2, (config.data.local_size // p) ** 2
  crops = config.data.num_local
  mlp = 2 * (d * h.hidden_dim + h.hidden_dim ** 2 + h.hidden_dim * h.bottleneck_dim)
  last = 2 * h.bottleneck_dim * h.out_dim
  g_window, l_window = config.udi.global_window, config.udi.local_window
  s_g = (int(n_g ** 0.5) // g_window) ** 2
  s_l = (int(n_l ** 0.5) // l_window) ** 2
  patch = PATCH in nets.levels
  student = (2 * _vit_forward_flops(d, b.depth, t + n_g, n_g, p)
             + crops * _vit_forward_flops(d, b.depth, t + n_l, n_l, p)
             + t * (2 + crops) * (mlp + last))
  if patch:
    student += 2 * _readout_flops(d, n_g, s_g) + 2 * s_g * (mlp + last)
  teacher = 2 * _vit_forward_flops(d, b.depth, t + n_g, n_g, p) + 2 * (mlp + last)
  if patch:
    s_t = s_g + crops * s_l
    teacher += 2 * _readout_flops(d, n_g, s_t) + 2 * s_t * mlp + 2 * (s_g + 1 + crops) * last
  return 3 * student + teacher


def xla_flops(lowered_or_compiled) -> Optional[float]:
  """XLA's cost-analysis FLOP count of a lowered or compiled program (best effort: None if unavailable)."""
  try:
    cost = lowered_or_compiled.cost_analysis()
  except Exception:   # not every backend implements it
    return None
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get('flops', 0.0)) or None


def synthetic_batch(config, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
  """A batch of the schema the pipeline gives under `config` (host crops, or canvases when the device cuts
  them), with random pixels and real crop boxes of a 480x360 image."""
  from PIL import Image

  from udi_jax.data.crops import CropSettings, multi_crop
  from udi_jax.data.device_crops import canvas_crops, to_canvases
  rng = np.random.default_rng(seed)
  settings = CropSettings.from_config(config)
  image = Image.fromarray(rng.integers(0, 256, (360, 480, 3), dtype=np.uint8))
  if settings.canvas_size:
    rows = [canvas_crops(image, np.random.default_rng([seed, i]), settings) for i in range(batch)]
    pixels = {'canvas': to_canvases([r['pixels'] for r in rows], settings.canvas_size),
              **{k: np.stack([r[k] for r in rows]) for k in ('windows', 'boxes')}}
  else:
    boxes = np.stack([multi_crop(image, np.random.default_rng([seed, i]), dataclasses.replace(
        settings, global_size=8, local_size=8))['boxes'] for i in range(batch)])
    g, loc, n = config.data.global_size, config.data.local_size, config.data.num_local
    pixels = {'global': rng.integers(0, 256, (batch, 2, g, g, 3), dtype=np.uint8),
              'local': rng.integers(0, 256, (batch, n, loc, loc, 3), dtype=np.uint8), 'boxes': boxes}
  return {**pixels, 'boxes': pixels['boxes'].astype(np.float32), 'index': np.arange(batch, dtype=np.int32),
          'label': np.zeros(batch, np.int32), 'skipped': np.zeros(batch, np.int32)}


@dataclasses.dataclass
class Result:
  per_device_batch: int
  step_ms: float
  images_per_s_per_device: float
  peak_memory_gib: Optional[float]
  mfu: Optional[float]
  model_gflops_per_image: float
  xla_gflops_per_image: Optional[float]


def measure(config, per_device_batch: int, steps: int, warmup: int, peak: Optional[float]) -> Result:
  from udi_jax.train.state import create_state
  from udi_jax.train.step import Trainer, make_train_step
  devices = jax.devices()
  config = config.copy_and_resolve_references()
  config.batch_size = per_device_batch * len(devices)
  mesh = data_mesh()
  trainer = Trainer.from_config(config, steps_per_epoch=1000)
  state = create_state(trainer.nets, trainer.tx, jax.random.key(0), mesh)
  step = make_train_step(trainer, mesh, config.parallel)
  host = synthetic_batch(config, config.batch_size)
  batch = {k: jax.make_array_from_process_local_data(batch_sharding(mesh), v) for k, v in host.items()} \
      if config.parallel == 'shard_map' else host
  compiled_flops = None
  if config.parallel == 'shard_map':
    step = step.lower(state, batch).compile()       # compiled once: XLA's FLOP count, then timed
    flops = xla_flops(step)
    compiled_flops = flops * len(devices) / config.batch_size if flops else None
  for _ in range(warmup):
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - start)
  step_s = statistics.median(times)
  per_device = per_device_batch / step_s
  stats = getattr(devices[0], 'memory_stats', lambda: None)() or {}
  peak_bytes = stats.get('peak_bytes_in_use')
  flops = udi_flops_per_image(config)
  mfu = flops * per_device / (peak * 1e12) if peak else None
  return Result(per_device_batch, 1e3 * step_s, per_device, peak_bytes / 2 ** 30 if peak_bytes else None, mfu,
                flops / 1e9, compiled_flops / 1e9 if compiled_flops else None)


def report(result: Result, device) -> str:
  fmt = lambda x, spec, unit='': 'n/a' if x is None else format(x, spec) + unit
  return (f'{device.device_kind} x{jax.device_count()} | per-device batch {result.per_device_batch} | '
          f'step {result.step_ms:.1f} ms | {result.images_per_s_per_device:.1f} images/s per device | '
          f'peak memory {fmt(result.peak_memory_gib, ".2f", " GiB")} | model {result.model_gflops_per_image:.3g} '
          f'GFLOP/image (XLA {fmt(result.xla_gflops_per_image, ".3g")}) | '
          f'MFU {fmt(result.mfu and 100 * result.mfu, ".1f", " %")}')


FLAGS = flags.FLAGS


def _define_flags():
  config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/vits16.py.', lock_config=False)
  flags.DEFINE_integer('per_device_batch', None, 'Images per device (default: config batch / devices).')
  flags.DEFINE_string('sweep', '', 'Comma-separated per-device batch sizes to time, e.g. 32,64,128.')
  flags.DEFINE_integer('steps', 20, 'Timed steps (the median is reported).')
  flags.DEFINE_integer('warmup', 3, 'Untimed steps after compilation.')
  flags.DEFINE_float('peak_tflops', None, 'Peak bf16 TFLOP/s per device (default: table by device kind).')


def main(argv):
  del argv
  config = FLAGS.config
  if config is None:
    raise app.UsageError('--config is required, e.g. --config=configs/vits16.py')
  device = jax.devices()[0]
  peak = FLAGS.peak_tflops or peak_tflops(device)
  sizes = ([int(s) for s in FLAGS.sweep.split(',') if s] if FLAGS.sweep
           else [FLAGS.per_device_batch or max(1, config.batch_size // jax.device_count())])
  say(f'JAX {jax.__version__}, {jax.device_count()} x {device.device_kind}, peak '
      f'{"n/a" if peak is None else f"{peak:.0f} TFLOP/s"} bf16, compute dtype {config.model.dtype}')
  for size in sizes:
    try:
      say(report(measure(config, size, FLAGS.steps, FLAGS.warmup, peak), device))
    except Exception as e:   # e.g. out of memory at the largest sweep size
      say(f'per-device batch {size}: failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})')


if __name__ == '__main__':
  _define_flags()
  app.run(main)

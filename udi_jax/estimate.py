"""Estimates of a config's run on a runtime: the per-device batch that fits, and how long the run takes.

- FLOPs per image: XLA's count of the real training step lowered at the config's shapes (from abstract
  inputs: nothing is allocated or compiled).
- Memory: XLA's memory analysis of the step compiled at two per-device batches, split into a fixed part
  (parameters, optimiser state, the program's own buffers) and a part per image. Compiled on a CPU it
  stands in for an accelerator's (XLA's GPU and TPU compilers fuse differently): an estimate. Compiled on
  the runtime itself (the Colab notebook) it is that runtime's own analysis.
- Time: steps x global batch x FLOPs per image / (devices x peak x MFU), at an assumed MFU of 0.30 until
  someone measures it (`benchmarks/device_check.py`, `python -m udi_jax.benchmark`).

  python -m udi_jax.estimate --config=configs/imagenette.py            # the runtime table
"""

from __future__ import annotations

import dataclasses
import time
from typing import Optional

import jax
import jax.numpy as jnp
from absl import app, flags
from ml_collections import config_flags

ASSUMED_MFU = 0.30
MEMORY_MARGIN = 0.85             # of a device's memory: XLA's own reservations, fragmentation


@dataclasses.dataclass(frozen=True)
class Runtime:
  name: str
  devices: int
  memory_gib: float              # per device
  peak_tflops: float             # per device, in the config's compute dtype
  note: str = ''


# Colab's runtimes (a TPU v2-8 is 4 chips of 2 cores: 8 JAX devices of 8 GiB).
RUNTIMES = (
    Runtime('T4', 1, 15.0, 8.1, 'float32 (a T4 has no bfloat16 units): use `:tiny`'),
    Runtime('L4', 1, 22.5, 121.0),
    Runtime('A100 40 GB', 1, 40.0, 312.0),
    Runtime('A100 80 GB', 1, 80.0, 312.0),
    Runtime('TPU v2-8', 8, 8.0, 22.5),
    Runtime('TPU v5e-1', 1, 16.0, 197.0),
)


def abstract_step_inputs(config, trainer, devices: int, rows_per_device: int):
  """(mesh, state, batch) of the training step as ShapeDtypeStructs sharded over the first `devices`."""
  from udi_jax.data.pipeline import batch_shapes
  from udi_jax.mesh import batch_sharding, data_mesh
  from udi_jax.train.state import abstract_state
  mesh = data_mesh(jax.devices()[:devices])
  batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding(mesh))
           for k, (shape, dtype) in batch_shapes(config, devices * rows_per_device).items()}
  return mesh, abstract_state(trainer.nets, trainer.tx, mesh), batch


def lowered_step(config, rows_per_device: int):
  """The real training step (one device, state donated) lowered at the config's shapes."""
  from udi_jax.train.step import Trainer, make_train_step
  trainer = Trainer.from_config(config, steps_per_epoch=1000)
  mesh, state, batch = abstract_step_inputs(config, trainer, 1, rows_per_device)
  return make_train_step(trainer, mesh, donate=True).lower(state, batch)


def step_flops_per_image(config, rows_per_device: int = 2) -> float:
  from udi_jax.benchmark import udi_flops_per_image, xla_flops
  flops = xla_flops(lowered_step(config, rows_per_device))
  return flops / rows_per_device if flops else udi_flops_per_image(config)


@dataclasses.dataclass(frozen=True)
class Memory:
  fixed_bytes: float
  per_image_bytes: float

  def at(self, per_device_batch: int) -> float:
    return self.fixed_bytes + self.per_image_bytes * per_device_batch


def _peak_bytes(compiled) -> float:
  stats = compiled.memory_analysis()
  return float(stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
               + stats.temp_size_in_bytes)


def step_memory(config, rows: tuple[int, int] = (2, 4)) -> Memory:
  """The step's device memory at two per-device batches, as a fixed part and a part per image."""
  low, high = (_peak_bytes(lowered_step(config, r).compile()) for r in rows)
  per_image = max((high - low) / (rows[1] - rows[0]), 0.0)
  return Memory(fixed_bytes=max(low - per_image * rows[0], 0.0), per_image_bytes=per_image)


def fitting_batch(memory: Memory, memory_gib: float, most: int) -> int:
  """The largest per-device batch (a multiple of 8, at most `most`) whose step fits; 0 if none does."""
  room = MEMORY_MARGIN * memory_gib * 2 ** 30
  fits = int((room - memory.fixed_bytes) // max(memory.per_image_bytes, 1.0))
  return max(min(fits, most) // 8 * 8, 0)


def run_hours(config, flops_per_image: float, devices: int, peak_tflops: float, mfu: float = ASSUMED_MFU,
              num_examples: Optional[int] = None) -> float:
  """Hours of training steps for the config's epochs (evaluation and input stalls not counted)."""
  examples = num_examples or config.batch_size
  steps = config.epochs * max(examples // config.batch_size, 1)
  return steps * config.batch_size * flops_per_image / (devices * peak_tflops * 1e12 * mfu) / 3600


def cpu_tflops(size: int = 1024, repeats: int = 5) -> float:
  """This machine's measured float32 matmul rate, for the no-accelerator estimate."""
  x = jnp.ones((size, size), jnp.float32)
  matmul = jax.jit(lambda a: a @ a)
  matmul(x).block_until_ready()
  started = time.perf_counter()
  for _ in range(repeats):
    matmul(x).block_until_ready()
  return 2 * size ** 3 * repeats / (time.perf_counter() - started) / 1e12


def hours_text(hours: float) -> str:
  return f'{hours:.1f} h' if hours < 48 else f'{hours / 24:.0f} days'


def runtime_row(config, runtime: Runtime, flops_per_image: float, memory: Memory, num_examples: int) -> str:
  """| runtime | devices | per-device batch that fits | hours for the config's epochs | note |"""
  per_device = config.batch_size // runtime.devices
  fits = fitting_batch(memory, runtime.memory_gib, per_device)
  if fits >= per_device:
    batch, note = f'{per_device} (fits up to {fitting_batch(memory, runtime.memory_gib, 4096)})', runtime.note
  else:
    batch, note = f'{fits}', ' '.join(filter(None, (runtime.note, f'config batch {config.batch_size} does not '
                                                    f'fit: use --config.batch_size={fits * runtime.devices}')))
  hours = run_hours(config, flops_per_image, runtime.devices, runtime.peak_tflops, num_examples=num_examples)
  return f'| {runtime.name} | {runtime.devices} | {batch} | {hours_text(hours)} (estimate) | {note} |'


def no_accelerator_sentence(config, flops_per_image: float, num_examples: int, quick: str, demo: str) -> str:
  hours = run_hours(config, flops_per_image, 1, cpu_tflops(), num_examples=num_examples)
  return (f'No accelerator: at this CPU\'s measured rate this run would take about {hours_text(hours)}; pick a '
          f'GPU or TPU runtime, or run {quick} or the demo ({demo}) instead.')


def runtime_table(config, num_examples: int) -> str:
  """Markdown: one row per Colab runtime, for `config` (its epochs and global batch)."""
  flops = step_flops_per_image(config)
  memory = step_memory(config)
  lines = [f'{config.model.arch}, {config.epochs} epochs of {num_examples} images at batch {config.batch_size}: '
           f'{flops / 1e9:.1f} GFLOP per image and step (XLA), step memory {memory.fixed_bytes / 2 ** 30:.2f} GiB '
           f'+ {memory.per_image_bytes / 2 ** 20:.0f} MiB per image (XLA, compiled on {jax.devices()[0].platform}); '
           f'MFU {ASSUMED_MFU:.2f} assumed', '',
           '| runtime | devices | per-device batch | time | note |', '|---|---|---|---|---|']
  return '\n'.join(lines + [runtime_row(config, r, flops, memory, num_examples) for r in RUNTIMES])


FLAGS = flags.FLAGS


def _define_flags():
  config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/imagenette.py.', lock_config=False)
  flags.DEFINE_integer('num_examples', 9469, 'Training images (Imagenette: 9469).')


def main(argv):
  del argv
  from udi_jax.say import say
  config = FLAGS.config
  if config is None:
    raise app.UsageError('--config is required, e.g. --config=configs/imagenette.py')
  say(runtime_table(config, FLAGS.num_examples))


if __name__ == '__main__':
  _define_flags()
  app.run(main)

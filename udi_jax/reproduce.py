"""The Imagenette reproduction (`configs/imagenette.py`, `launch/colab_reproduce.ipynb`): the runtime it got,
where it keeps its data and workdir, its estimate, its k-NN curve and its final table beside the published
figures.

The published anchor: stable-pretraining's Imagenette benchmark (galilai-group/stable-pretraining,
`benchmarks/imagenet10/RESULTS.md`): ViT-S/16, 200 epochs, batch 128-256, one A100, online 20-NN and
linear probes on the validation split. This project evaluates offline instead: a 20-NN and a linear probe
on frozen centre crops of the training split after (and k-NN during) pretraining.

Nothing here imports JAX at import time: the notebook picks the runtime and installs its JAX backend first.
"""

from __future__ import annotations

import glob
import os
import pathlib
import shutil
import subprocess
from typing import Any, Optional

from udi_jax.errors import UserError

DATASET = 'imagenette/320px-v2'
TRAIN_EXAMPLES = 9469
# Published top-1 % (k-NN, linear) on Imagenette's validation split, ViT-S/16, 200 epochs.
PUBLISHED = {'DINO': (83.8, 86.1), 'iBOT': (43.3, 57.9), 'SwAV': (86.4, 89.7), 'MoCo v3': (82.6, 84.7)}
CURVE_LINES = ('DINO', 'iBOT')
INSTALL = {'gpu': ('jax[cuda12]', 'jax_cuda12_plugin'), 'tpu': ('jax[tpu]', 'libtpu')}


def detect_runtime() -> str:
  """'tpu', 'gpu' or 'cpu': what the machine has, found before JAX is imported (it picks its backend once)."""
  if os.environ.get('COLAB_TPU_ADDR') or os.environ.get('TPU_ACCELERATOR_TYPE') or glob.glob('/dev/accel*'):
    return 'tpu'
  smi = shutil.which('nvidia-smi')
  if smi and subprocess.run([smi, '-L'], capture_output=True).returncode == 0:
    return 'gpu'
  return 'cpu'


def jax_install_command(runtime: str) -> Optional[list[str]]:
  """The pip command that adds JAX's backend for `runtime`, or None when it is there (or on a CPU)."""
  import importlib.util
  import sys
  if runtime not in INSTALL or importlib.util.find_spec(INSTALL[runtime][1]) is not None:
    return None
  return [sys.executable, '-m', 'pip', 'install', '-q', '-U', INSTALL[runtime][0]]


def check_store(store: str) -> pathlib.Path:
  """The folder that keeps the data and the workdir across sessions; UserError when it is on Google Drive
  and Drive is not mounted."""
  if store.startswith('gs://'):
    raise UserError(f'UDI_STORE={store}: a gs:// workdir is not supported yet (the workdir lock and the '
                    'metrics log are local files); keep the store on Google Drive, which a TPU runtime mounts too.')
  path = pathlib.Path(store)
  if str(path).startswith('/content/drive') and not pathlib.Path('/content/drive/MyDrive').is_dir():
    raise UserError('Google Drive is not mounted at /content/drive: run the cell that mounts it and allow access '
                    '(without Drive a disconnect loses the run), or set UDI_STORE to another folder.')
  path.mkdir(parents=True, exist_ok=True)
  return path


def prepare(data_dir: pathlib.Path, name: str = DATASET) -> None:
  """Downloads and prepares the dataset once, as ArrayRecord (what the input pipeline reads), in `data_dir`;
  UserError in one sentence when the download fails."""
  import tensorflow_datasets as tfds

  from udi_jax.data.sources import probe_source
  try:
    probe_source(f'tfds:{name}:train', str(data_dir), 'the prepared data')
    probe_source(f'tfds:{name}:validation', str(data_dir), 'the prepared data')
    return                                    # prepared by an earlier session
  except ValueError:
    pass
  try:
    tfds.builder(name, data_dir=str(data_dir)).download_and_prepare(file_format='array_record')
  except Exception as e:  # noqa: BLE001 (network, disk, quota: the sentence says which)
    raise UserError(f'Downloading or preparing {name} into {data_dir} failed ({type(e).__name__}: '
                    f'{str(e)[:200]}); check the connection and the free space on Drive, then run the cell '
                    'again (a finished download is kept).') from e


def with_overrides(config, overrides: dict[str, Any]):
  """`config` with {dotted.field: value} set; a field the config lacks is refused in one sentence."""
  config = config.copy_and_resolve_references()
  for path, value in overrides.items():
    *parents, leaf = path.split('.')
    node = config
    for part in parents:
      node = node.get(part) if hasattr(node, 'get') else None
    if node is None or leaf not in node:
      raise ValueError(f'config.{path} is not a field of configs/imagenette.py; check the spelling.')
    node[leaf] = tuple(value) if isinstance(value, list) else value
  return config


def estimate(config, num_examples: int = TRAIN_EXAMPLES) -> str:
  """This runtime's row: its devices, the step's memory (XLA's analysis compiled here), the batch that fits,
  and the hours of the run at an assumed MFU; on a CPU, the sentence that says how long it would take."""
  import jax

  from udi_jax import estimate as estimates
  from udi_jax.benchmark import peak_tflops
  device = jax.devices()[0]
  flops = estimates.step_flops_per_image(config)
  if device.platform == 'cpu':
    return estimates.no_accelerator_sentence(config, flops, num_examples, 'configs/imagenette.py:quick',
                                             'configs/demo.py, 8 minutes on a CPU')
  memory = estimates.step_memory(config)
  limit = (device.memory_stats() or {}).get('bytes_limit', 0) / 2 ** 30
  peak = peak_tflops(device) or next((r.peak_tflops for r in estimates.RUNTIMES
                                      if r.name.split()[0] in device.device_kind), None)
  runtime = estimates.Runtime(device.device_kind, jax.device_count(), limit or 16.0, peak or 100.0,
                              '' if peak else 'peak rate unknown: 100 TFLOP/s assumed')
  return ('| runtime | devices | per-device batch | time | note |\n|---|---|---|---|---|\n'
          + estimates.runtime_row(config, runtime, flops, memory, num_examples))


def curve(workdir: pathlib.Path, steps_per_epoch: int, include_patch: bool) -> Optional[pathlib.Path]:
  """pictures/knn_curve_vs_published.png: the run's k-NN curve with the published DINO and iBOT k-NN as lines
  (the report's knn_curve.png has raw pixels instead)."""
  from udi_jax.evaluate.curves import draw_knn_curve
  references = {f'{m} (published)': PUBLISHED[m][0] for m in CURVE_LINES}
  method = 'UDI' if include_patch else 'DINO (this project)'
  return draw_knn_curve(workdir / 'metrics.jsonl', workdir / 'pictures' / 'knn_curve_vs_published.png', steps_per_epoch,
                        references=references, title=f'{method}, Imagenette validation, 20-NN')


def final_table(found: dict[str, dict[str, Any]], method: str) -> str:
  """Markdown: k-NN (k = 20) and linear top-1 per token of `found` {'initialisation': results,
  'pretrained': results} (each with 'knn' and 'linear'), and the published figures below."""
  lines = ['| features | token | k-NN top-1 % | linear top-1 % |', '|---|---|---|---|']
  for what, results in found.items():
    for token, knn in results['knn'].items():
      linear = results.get('linear', {}).get(token)
      lines.append(f'| {method if what == "pretrained" else what} | {token} | {knn["top1@20"]:.1f} | '
                   f'{"-" if linear is None else format(linear["top1"], ".1f")} |')
  lines += [f'| {m} (published, online probes) | cls | {k:.1f} | {lin:.1f} |' for m, (k, lin) in PUBLISHED.items()]
  return '\n'.join(lines)

"""Launchers (dry runs), the Colab notebook end to end on the CPU, the throughput benchmark and FLOP count,
and the step and feature extractor lowered for GPUs and TPUs."""

import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import REPO, env
from udi_jax.estimate import abstract_step_inputs

LAUNCHERS = ['launch/tpu_pod.sh', 'launch/gpu.sh', 'launch/slurm.sbatch']


def bash(*args, **kwargs):
  return subprocess.run(['bash', *args], cwd=REPO, capture_output=True, text=True, timeout=60, **kwargs)


@pytest.mark.parametrize('script', LAUNCHERS)
def test_launcher_syntax(script):
  result = bash('-n', script)
  assert result.returncode == 0, result.stderr


def test_tpu_pod_dry_run_prints_every_command():
  result = bash('launch/tpu_pod.sh', '--dry-run', '--name=udi-v4', '--zone=us-central2-b',
                '--accelerator-type=v4-32', '--repo=https://example.org/udi_jax.git',
                '--config=configs/vitb16.py', '--workdir=gs://bucket/runs/b16', '--', '--config.epochs=100')
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 3
  assert lines[0].startswith('gcloud compute tpus tpu-vm create udi-v4 --zone=us-central2-b '
                             '--accelerator-type=v4-32')
  assert '--worker=all' in lines[1] and 'git\\ clone\\ https://example.org/udi_jax.git' in lines[1]
  assert "jax\\[tpu\\]==" in lines[1]
  assert ('python3\\ -m\\ udi_jax.main\\ --config=configs/vitb16.py\\ --workdir=gs://bucket/runs/b16\\ '
          '--distributed\\ --config.epochs=100') in lines[2]
  missing = bash('launch/tpu_pod.sh', '--dry-run', '--name=x', '--zone=z', '--accelerator-type=v4-8',
                 '--repo=r', '--workdir=/local/dir')
  assert missing.returncode == 2 and 'gs://' in missing.stderr


GPU_FLAGS = '--xla_gpu_enable_latency_hiding_scheduler=true'


def test_gpu_and_slurm_dry_runs():
  user_env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}      # not this session's flags
  gpu = bash('launch/gpu.sh', '--dry-run', '--install', '--config=configs/demo.py', '--workdir=runs/d', '--',
             '--config.batch_size=128', env=user_env)
  assert gpu.returncode == 0, gpu.stderr
  assert gpu.stdout.splitlines() == [
      'python3 -m pip install -r requirements.txt ',
      'python3 -m pip install -U jax\\[cuda12\\]==0.10.2 ',
      'python3 -m pip install -e . ',
      f'env XLA_PYTHON_CLIENT_MEM_FRACTION=.95 XLA_FLAGS={GPU_FLAGS} python3 -m udi_jax.main '
      '--config=configs/demo.py --workdir=runs/d --config.batch_size=128 ']
  slurm = bash('launch/slurm.sbatch', '--dry-run', '--workdir=/shared/runs/s16',
               env={**user_env, 'XLA_FLAGS': '--xla_dump_to=/tmp/hlo'})
  assert slurm.returncode == 0, slurm.stderr
  assert slurm.stdout.strip() == ('srun --ntasks-per-node=1 env XLA_PYTHON_CLIENT_MEM_FRACTION=.95 '
                                  f'XLA_FLAGS=--xla_dump_to=/tmp/hlo\\ {GPU_FLAGS} python3 -m '
                                  'udi_jax.main --config=configs/vits16.py --workdir=/shared/runs/s16 --distributed')
  assert bash('launch/slurm.sbatch', '--dry-run').returncode == 2


def test_the_launchers_gpu_flags_exist_in_this_jaxlib():
  """XLA parses every XLA_FLAGS entry at start on any backend and dies on an unknown one: a flag renamed
  in a jaxlib release would stop every GPU run at start, so check them here, on the CPU."""
  def starts(flags):
    return subprocess.run([sys.executable, '-c', 'import jax; jax.numpy.zeros(1).block_until_ready()'],
                          env={**os.environ, 'XLA_FLAGS': flags, 'JAX_PLATFORMS': 'cpu'},
                          capture_output=True, text=True, timeout=120)
  assert starts(GPU_FLAGS).returncode == 0
  unknown = starts('--xla_gpu_no_such_flag=true')
  assert unknown.returncode != 0 and 'Unknown flag' in unknown.stderr


@pytest.mark.slow
def test_colab_notebook_runs_end_to_end_on_the_cpu(tmp_path):
  nbformat = pytest.importorskip('nbformat')
  nbclient = pytest.importorskip('nbclient')
  notebook = nbformat.read(REPO / 'launch' / 'colab.ipynb', as_version=4)
  shortened = ('--config.epochs=1 --config.data.max_examples=512 --config.eval.max_train_examples=600 '
               '--config.eval.max_test_examples=200 --config.eval.dense.max_train_examples=96 '
               '--config.eval.dense.max_test_examples=32 --config.eval.diagnostics.examples=128 '
               '--config.eval.dense_linear.epochs=5')
  workdir = tmp_path / 'colab_demo'
  settings = {'UDI_REPO': str(REPO), 'UDI_DEMO_ARGS': shortened, 'UDI_WORKDIR': str(workdir)}
  client = nbclient.NotebookClient(notebook, timeout=900, kernel_name='python3',
                                   resources={'metadata': {'path': str(tmp_path)}})
  client.execute(env={**env(1), **settings})   # the flags of .ci/run's demo: its compiled programs
  outputs = [o for cell in notebook.cells if cell.cell_type == 'code' for o in cell.get('outputs', [])]
  assert not [o for o in outputs if o.get('output_type') == 'error']
  text = ''.join(o.get('text', '') for o in outputs)
  tables = [o['data']['text/markdown'] for o in outputs if 'text/markdown' in o.get('data', {})]
  assert len(tables) == 2, tables                              # the k-NN and dense tables, as markdown
  for row in ('| raw pixels | - |', '| initialisation | cls |', '| pretrained teacher | cls_plus |'):
    assert row in tables[0], (row, tables[0])
  assert 'Dense: segdigits (96 training crops of 56 px, 32 whole validation images, 11 classes)' in tables[1], tables[1]
  assert sum('image/png' in o.get('data', {}) for o in outputs) == 5      # the k-NN curve first
  assert 'model.load_state_dict(' in text
  assert (workdir / 'export' / 'udi_demo_timm.safetensors').is_file()


# A tiny model on tfds' mock Imagenette: 48 photographs, 3 steps an epoch, 2 epochs.
TINY_IMAGENETTE = {
    'batch_size': 16, 'epochs': 2, 'model.patch_size': 4, 'model.embed_dim': 32, 'model.depth': 2,
    'model.num_heads': 2, 'model.out_dim': 64, 'model.head_hidden_dim': 32, 'model.head_bottleneck_dim': 16,
    'model.dtype': 'float32', 'udi.global_window': 2, 'udi.local_window': 1, 'data.global_size': 16,
    'data.local_size': 8, 'data.num_local': 2, 'data.num_workers': 0, 'data.num_threads': 1,
    'optim.warmup_epochs': 1, 'udi.warmup_teacher_temp_epochs': 1, 'eval.batch_size': 16,
    'eval.linear.epochs': 2, 'eval.knn_every_epochs': 1, 'log_every_steps': 1}


def run_notebook(path: pathlib.Path, settings: dict, directory: pathlib.Path, until: str = '') -> tuple[
    list[dict], str]:
  """Executes a notebook in a fresh kernel, up to the cell holding `until` if given (a session that ends
  there); (its outputs, their printed text)."""
  nbformat = pytest.importorskip('nbformat')
  nbclient = pytest.importorskip('nbclient')
  notebook = nbformat.read(path, as_version=4)
  if until:
    last = next(i for i, cell in enumerate(notebook.cells) if until in cell.source)
    notebook.cells = notebook.cells[:last + 1]
  client = nbclient.NotebookClient(notebook, timeout=900, kernel_name='python3',
                                   resources={'metadata': {'path': str(directory)}})
  client.execute(env={**env(1), **settings})
  outputs = [o for cell in notebook.cells if cell.cell_type == 'code' for o in cell.get('outputs', [])]
  assert not [o for o in outputs if o.get('output_type') == 'error']
  return outputs, ''.join(o.get('text', '') for o in outputs)


@pytest.mark.slow
def test_reproduction_notebook_resumes_after_a_disconnect_and_finishes(tmp_path):
  """The Imagenette notebook on the CPU, tfds' mock data in Imagenette's place and a tiny model: the first
  session ends after 3 of 6 steps, in its training cell (as a disconnect would end it); the second finds
  the prepared data and the run on the store, trains only steps 4-6, and ends with the curve, the table,
  the pictures and the export."""
  store = tmp_path / 'store'
  settings = {'UDI_REPO': str(REPO), 'UDI_STORE': str(store), 'UDI_MOCK_DATA': '48'}
  notebook = REPO / 'launch' / 'colab_reproduce.ipynb'
  _, first = run_notebook(notebook, {**settings, 'UDI_OVERRIDES': json.dumps({**TINY_IMAGENETTE, 'max_steps': 3})},
                          tmp_path, until='train_and_evaluate(')
  assert 'Training 6 steps (2 epochs x 3) from step 0 to step 3 (config.max_steps)' in first, first[-3000:]
  assert 'No accelerator: at this CPU\'s measured rate this run would take about' in first
  assert 'the run is not complete' in first
  outputs, second = run_notebook(notebook, {**settings, 'UDI_OVERRIDES': json.dumps(TINY_IMAGENETTE)}, tmp_path)
  workdir = store / 'runs' / 'imagenette'
  assert 'Resuming from the checkpoint of step 3' in second and 'from step 3;' in second, second[-3000:]
  assert '3 steps trained in this session; the run is complete.' in second
  knn_steps = [json.loads(line)['step'] for line in (workdir / 'metrics.jsonl').read_text().splitlines()
               if 'knn/cls/top1@20' in line]
  assert knn_steps == [0, 3, 6]
  [table] = [o['data']['text/markdown'] for o in outputs if 'text/markdown' in o.get('data', {})]
  for row in ('| initialisation | cls_plus |', '| UDI (this run) | concat |', '| DINO (published, online probes) | cls '
              '| 83.8 | 86.1 |'):
    assert row in table, (row, table)
  assert sum('image/png' in o.get('data', {}) for o in outputs) == 6    # the curve, 3 attention, 2 curves
  assert (workdir / 'export' / 'hf' / 'model.safetensors').is_file()


def test_benchmark_prints_every_figure_on_the_cpu():
  result = subprocess.run([sys.executable, '-m', 'udi_jax.benchmark', '--config=tests/tiny_train_config.py',
                           '--steps=2', '--warmup=1', '--per_device_batch=8'], cwd=REPO, env=env(1),
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  line = [text for text in result.stdout.splitlines() if 'per-device batch 8' in text]
  assert line, result.stdout
  for figure in ('step ', ' ms', 'images/s per device', 'peak memory n/a', 'GFLOP/image (XLA ', 'MFU n/a'):
    assert figure in line[0], (figure, line[0])
  figures = re.search(r'step ([\d.]+) ms \| ([\d.]+) images/s per device .* model ([\d.e-]+) GFLOP/image '
                      r'\(XLA ([\d.e-]+)\)', line[0])
  step_ms, per_device, model, xla = map(float, figures.groups())
  assert per_device == pytest.approx(8 / step_ms * 1e3, rel=0.01, abs=0.1)    # as printed (rounded)
  assert xla >= model > 0


@pytest.mark.slow
def test_device_check_runs_every_stage_on_the_cpu(tmp_path):
  """benchmarks/device_check.py as a device session runs it, at the tiny size: every stage measures,
  parity passes, and the JSON and the RESULTS.md row agree."""
  import json

  from tests import golden
  result = subprocess.run([sys.executable, 'benchmarks/device_check.py', '--config=tests/tiny_train_config.py',
                           f'--out={tmp_path}', f'--golden_dir={golden.golden_dir()}'], cwd=REPO, env=env(1),
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  [path] = tmp_path.glob('cpu-*.json')
  record = json.loads(path.read_text())
  stages = record['stages']
  assert list(stages) == ['env', 'parity', 'step', 'loop', 'bf16']
  assert not [name for name, r in stages.items() if 'error' in r], stages
  assert stages['env']['backend'] == 'cpu' and stages['env']['devices'] == 1
  assert stages['parity']['passed'] and stages['parity']['gradients'] == 46
  assert [r['per_device_batch'] for r in stages['step']['rows']] == [8] and stages['step']['largest_fitting'] == 8
  timed = stages['step']['rows'] + [stages['step'][k] for k in ('remat', 'no_remat')]
  for row in timed:     # the figures agree with each other, and XLA counts at least the model's FLOPs
    assert row['images_per_s_per_device'] * row['step_ms'] / 1e3 == pytest.approx(row['per_device_batch'])
    assert row['xla_gflops_per_image'] >= row['model_gflops_per_image'] > 0
  # rematerialisation recomputes the forward pass in the backward one: XLA counts more FLOPs
  assert stages['step']['remat']['xla_gflops_per_image'] > 1.1 * stages['step']['no_remat']['xla_gflops_per_image']
  [loop] = stages['loop']['runs']
  assert stages['loop']['step_alone_images_per_s'] == stages['step']['rows'][0]['images_per_s_per_device']
  assert loop['workers'] == 0 and loop['images_per_s'] > 0
  assert loop['loop_over_step'] == pytest.approx(loop['images_per_s'] / stages['loop']['step_alone_images_per_s'])
  assert loop['crops_on'] == 'host' and stages['loop']['crop_stage_ms_per_image'] > 0   # the CPU's default
  assert stages['bf16']['steps'] == 4 and stages['bf16']['finite'] and stages['bf16']['max_gap'] < 0.05
  assert record['row'] in result.stdout and record['row'].count('|') == 10


@pytest.fixture(scope='module')
def vit_s16():
  """The released recipe (ViT-S/16, bf16, 2x224 + 10x96) as config and trainer, as it runs on a GPU or TPU
  (`data.crops_on='auto'` cuts the crops on the device there): shapes only, nothing allocated."""
  from configs import vits16
  from udi_jax.train.step import Trainer
  config = vits16.get_config()
  config.data.crops_on = 'device'
  return config, Trainer.from_config(config, steps_per_epoch=1000)


@pytest.fixture(scope='module')
def released_step(vit_s16):
  """The whole shard_map step as launched (state donated) on 2 devices, 2 rows each, with its abstract
  inputs: one step function, so that the FLOP count and the exports share its trace."""
  from udi_jax.train.step import make_train_step
  config, trainer = vit_s16
  mesh, state, batch = abstract_step_inputs(config, trainer, devices=2, rows_per_device=2)
  return make_train_step(trainer, mesh, donate=True), state, batch


def test_analytic_flops_of_the_released_recipe_agree_with_xla(vit_s16, released_step):
  """The analytic count (matmuls and attention, docs/design.md, contract 11) of ViT-S/16 with 2x224 + 10x96 is the
  documented 137.1 GFLOP per image and step, and lies within 5 % below XLA's count of the real step
  (lowered from abstract shapes, nothing allocated; per device, 2 images), which adds the element-wise
  work and the crops' resampling products (2.9 GFLOP: 142.9 in all, 140.0 with host crops). Forgetting
  the backward pass or the teacher would fall far outside."""
  from udi_jax.benchmark import udi_flops_per_image, xla_flops
  config, _ = vit_s16
  step, state, batch = released_step
  analytic = udi_flops_per_image(config)
  xla = xla_flops(step.lower(state, batch)) / 2
  print(f'ViT-S/16, 2x224 + 10x96, GFLOP per image and step: analytic {analytic / 1e9:.1f}, XLA {xla / 1e9:.1f}')
  assert round(analytic / 1e9, 1) == 137.1
  assert 0.95 * xla <= analytic <= xla


# ---- Lowering for GPUs and TPUs from this CPU (jax.export, abstract shapes: nothing is compiled).

ACCELERATORS = ('cuda', 'tpu')


def portability_problems(fn, *args) -> list[str]:
  """What stops `fn` from running on a GPU or TPU, found by lowering it for both: an op without a lowering
  there or a host callback (the export fails), float64 values, or custom calls (CPU-only library calls,
  kernels that need a review of where they run)."""
  try:
    text = jax.export.export(fn, platforms=ACCELERATORS)(*args).mlir_module()
  except Exception as e:  # noqa: BLE001 (the reason is the finding)
    return [f'{type(e).__name__}: {e}']
  problems = ['float64 values'] if re.search(r'\bf64\b|xf64\b', text) else []
  calls = sorted(set(re.findall(r'custom_call @([\w.]+)', text)))
  return problems + ([f'custom calls {calls}'] if calls else [])


def test_training_step_lowers_for_gpu_and_tpu(released_step):
  """The whole shard_map step as launched (state donated, bf16, ViT-S/16, 2x224 + 10x96 cut on the device
  from 512-px canvases) on 2 devices."""
  assert portability_problems(*released_step) == []


def test_the_imagenette_step_lowers_for_gpu_and_tpu():
  """configs/imagenette.py's step as it runs on a GPU or TPU: ViT-S/16, bf16, 2x224 + 6x96 cut on the device."""
  from configs import imagenette
  from udi_jax.train.step import Trainer, make_train_step
  config = imagenette.get_config()
  config.data.crops_on = 'device'
  trainer = Trainer.from_config(config, steps_per_epoch=36)
  mesh, state, batch = abstract_step_inputs(config, trainer, devices=2, rows_per_device=2)
  assert batch['windows'].shape == (4, 8, 5)                      # 2 global + 6 local crops per image
  assert portability_problems(make_train_step(trainer, mesh, donate=True), state, batch) == []


def test_feature_extractor_lowers_for_gpu_and_tpu(vit_s16):
  """The evaluation features, every kind (tokens, concat, avgpool, last blocks), at 224 px on 2 devices."""
  from udi_jax.evaluate.features import KINDS, compiled_features
  from udi_jax.mesh import batch_sharding
  config, trainer = vit_s16
  mesh, state, _ = abstract_step_inputs(config, trainer, devices=2, rows_per_device=2)
  images = jax.ShapeDtypeStruct((4, 224, 224, 3), np.uint8, sharding=batch_sharding(mesh))
  assert portability_problems(compiled_features(trainer.nets, KINDS, mesh), state.teacher['backbone'],
                              images) == []


def test_the_portability_check_can_fail():
  x = jax.ShapeDtypeStruct((4,), jnp.float32)
  on_host = lambda v: jax.pure_callback(lambda a: np.asarray(a) * 2, x, v)
  assert 'callback' in ' '.join(portability_problems(jax.jit(on_host), x))
  with jax.enable_x64(True):
    assert portability_problems(jax.jit(lambda v: v.astype(jnp.float64).sum()), x) == ['float64 values']
  assert portability_problems(jax.jit(lambda v: v * 2), x) == []

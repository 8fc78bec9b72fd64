"""Device acceptance in one command: `python benchmarks/device_check.py [--stages=...] [--out=DIR]`.

The stages, printed as they run; the results go to `<out>/<device>-<date>.json` after every stage (a
run cut short keeps what it measured), and the last line is a row for `benchmarks/RESULTS.md`:

  env     JAX and jaxlib versions, backend, device kind and count, device memory;
  parity  the golden one-step objective (`udi_golden_small.npz`, official code) in float32 under
          `jax.default_matmul_precision('highest')`: loss components, centres and all 46 gradients
          against the official numbers, with the suite's tolerances (1e-5, 1e-5, 1e-4);
  step    the UDI training step (`udi_jax.benchmark.measure`): --config (ViT-S/16, bf16) at each of
          --batches per device, then doubling while it fits; --remat_config (ViT-B/16) at the first
          batch with and without remat; on a GPU where cuDNN flash attention applies (the default
          config.model.attention='auto' takes it), the first batch again with XLA's attention;
  loop    the real training loop (grain pipeline, the compiled step, metrics, checkpoints) on
          ImageNet-size JPEGs written here, per worker-process count, with the crops cut on the device
          (the default on an accelerator), then with host crops at the most workers: images/s of the
          loop over the step alone says whether the host keeps up; and the step's crop stage alone;
  bf16    bf16 against float32 (matmuls at 'highest') from the same initialisation over --bf16_steps
          steps of synthetic batches: the relative loss gap.

On a CPU the defaults shrink (configs/demo.py, one batch size, a few steps), so that the command is known
to work before device time is spent; the suite runs it that way (tests/test_run_anywhere.py).
The exit code is 1 when a stage failed or parity missed its tolerances.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import pathlib
import platform
import re
import statistics
import sys
import tempfile
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from udi_jax.parity import MARKER, find_golden

REPO = pathlib.Path(__file__).resolve().parents[1]

STAGES = ('env', 'parity', 'step', 'loop', 'bf16')

FLAGS = flags.FLAGS
flags.DEFINE_list('stages', list(STAGES), f'Stages to run, of {STAGES}.')
config_flags.DEFINE_config_file('config', None, 'Step, loop and bf16 config (default: configs/vits16.py '
                                'on an accelerator, configs/demo.py on a CPU).', lock_config=False)
config_flags.DEFINE_config_file('remat_config', None, 'Config timed with and without remat (default: '
                                'configs/vitb16.py on an accelerator, --config on a CPU).', lock_config=False)
flags.DEFINE_list('batches', None, 'Per-device batches for the step (default 64,128,256; CPU: 8).')
flags.DEFINE_integer('largest_tries', 2, 'Doublings tried past the last of --batches (accelerators).')
flags.DEFINE_integer('steps', None, 'Timed steps per measurement (default 20; CPU: 2).')
flags.DEFINE_integer('loop_steps', None, 'Steps of the training loop per worker count (default 100; CPU: 8).')
flags.DEFINE_list('workers', None, 'Worker-process counts for the loop (default 0,4,8 up to the cores; CPU: 0).')
flags.DEFINE_integer('bf16_steps', None, 'Steps of the bf16-vs-fp32 comparison (default 50; CPU: 4).')
flags.DEFINE_string('golden_dir', None, 'Folder with udi_golden_small.npz (default: UDI_GOLDEN_DIR, '
                    'then shared/golden in or beside the repository).')
flags.DEFINE_string('out', str(REPO / 'benchmarks' / 'results'), 'Where the JSON goes.')


@dataclasses.dataclass
class Plan:
  """What the stages measure; the defaults depend on whether an accelerator is present."""
  accelerator: bool
  config: object
  remat_config: object
  batches: list[int]
  steps: int
  warmup: int
  loop_steps: int
  workers: list[int]
  bf16_steps: int
  work: pathlib.Path
  measured: dict = dataclasses.field(default_factory=dict)   # per-device batch -> the step stage's row

  @classmethod
  def from_flags(cls, work: pathlib.Path) -> 'Plan':
    from configs import demo, vitb16, vits16
    accelerator = jax.default_backend() != 'cpu'
    config = FLAGS.config or (vits16.get_config() if accelerator else demo.get_config())
    cores = os.cpu_count() or 1
    pick = lambda value, on_device, on_cpu: value if value is not None else (on_device if accelerator else on_cpu)
    return cls(accelerator=accelerator, config=config,
               remat_config=FLAGS.remat_config or (vitb16.get_config() if accelerator else config),
               batches=[int(b) for b in pick(FLAGS.batches, [64, 128, 256], [8])],
               steps=pick(FLAGS.steps, 20, 2), warmup=3 if accelerator else 1,
               loop_steps=pick(FLAGS.loop_steps, 100, 8),
               workers=[int(w) for w in pick(FLAGS.workers, [w for w in (0, 4, 8) if w <= cores], [0])],
               bf16_steps=pick(FLAGS.bf16_steps, 50, 4), work=work)


def first_line(error: BaseException) -> str:
  return f'{type(error).__name__}: {(str(error).splitlines() or [""])[0][:300]}'


# ---- Stages: each returns a JSON-able dict.

def stage_env(plan: Plan) -> dict:
  import jaxlib
  device = jax.devices()[0]
  stats = getattr(device, 'memory_stats', lambda: None)() or {}
  limit = stats.get('bytes_limit')
  return {'jax': jax.__version__, 'jaxlib': jaxlib.__version__, 'python': platform.python_version(),
          'backend': jax.default_backend(), 'device_kind': device.device_kind, 'devices': jax.device_count(),
          'processes': jax.process_count(), 'memory_gib': round(limit / 2 ** 30, 1) if limit else None,
          'xla_flags': os.environ.get('XLA_FLAGS', '')}


def stage_parity(plan: Plan) -> dict:
  folder = find_golden(MARKER, FLAGS.golden_dir, os.environ.get('UDI_GOLDEN_DIR'), REPO / 'shared' / 'golden',
                       REPO.parent / 'shared' / 'golden')
  if folder is None:
    return {'skipped': 'no udi_golden_small.npz: give --golden_dir or UDI_GOLDEN_DIR'}
  from udi_jax.interop import official
  from udi_jax.parity import COMPONENTS, max_rel, one_step, one_step_case, rel
  with jax.default_matmul_precision('highest'):
    case = one_step_case(folder)
    out, grads = one_step(case)
  g = case['g']
  loss = {name: rel(out.components[ours], g[f'loss/{name}']) for ours, name in COMPONENTS.items()}
  loss['total'] = rel(out.loss, g['loss/total'])
  centres = max_rel(official.centres_to_official(out.centres), g['center_new'])
  ours = official.to_official(grads)
  gradient = max(max(rel(ours[n], g[f'grad/{n}']), max_rel(ours[n], g[f'grad/{n}']))
                 for n in case['grad_names'])
  return {'loss_error': max(loss.values()), 'centres_error': centres, 'gradient_error': gradient,
          'gradients': len(case['grad_names']),
          'passed': max(loss.values()) <= 1e-5 and centres <= 1e-5 and gradient <= 1e-4}


def timed_step(config, per_device_batch: int, plan: Plan) -> dict:
  from udi_jax.benchmark import measure, peak_tflops, report
  try:
    result = measure(config, per_device_batch, plan.steps, plan.warmup, peak_tflops(jax.devices()[0]))
  except Exception as e:  # noqa: BLE001 (out of memory is a finding: the batch does not fit)
    print(f'  per-device batch {per_device_batch}: failed ({first_line(e)})', flush=True)
    return {'per_device_batch': per_device_batch, 'error': first_line(e)}
  print('  ' + report(result, jax.devices()[0]), flush=True)
  return dataclasses.asdict(result)


def stage_step(plan: Plan) -> dict:
  rows = [timed_step(plan.config, b, plan) for b in plan.batches]
  plan.measured.update({r['per_device_batch']: r for r in rows if 'error' not in r})
  batch = plan.batches[-1]
  for _ in range(FLAGS.largest_tries if plan.accelerator else 0):
    if 'error' in rows[-1]:
      break
    batch *= 2
    rows.append(timed_step(plan.config, batch, plan))
  fitted = [r['per_device_batch'] for r in rows if 'error' not in r]
  remat = {}
  for on in (False, True):
    config = plan.remat_config.copy_and_resolve_references()
    config.model.remat = on
    remat['remat' if on else 'no_remat'] = timed_step(config, plan.batches[0], plan)
  # config.model.attention='auto' takes cuDNN's flash attention where it applies; XLA's form beside it.
  from udi_jax.models.networks import build_networks
  from udi_jax.models.vit import cudnn_unfit_reason
  backbone = build_networks(plan.config).backbone
  unfit = cudnn_unfit_reason(backbone.dtype, backbone.embed_dim // backbone.num_heads)
  kernels = {'attention_auto': 'xla' if unfit else 'cudnn', 'cudnn_unfit': unfit}
  if plan.accelerator and not unfit:
    config = plan.config.copy_and_resolve_references()
    config.model.attention = 'xla'
    print('  the same step with XLA attention instead of cuDNN:', flush=True)
    kernels['attention_xla'] = timed_step(config, plan.batches[0], plan)
  return {'arch': plan.config.model.arch, 'dtype': plan.config.model.dtype, 'rows': rows,
          'largest_fitting': max(fitted) if fitted else None, 'remat_arch': plan.remat_config.model.arch,
          **remat, **kernels}


def loop_config(plan: Plan, root: pathlib.Path, images: int, workers: int, crops_on: str = 'auto'):
  config = plan.config.copy_and_resolve_references()
  config.data.crops_on = crops_on
  config.batch_size = plan.batches[0] * jax.device_count()
  steps_per_epoch = images // config.batch_size
  config.epochs = math.ceil(plan.loop_steps / steps_per_epoch)
  config.data.source = f'imagefolder:{root}'
  config.data.max_examples = 0
  config.data.num_workers = workers
  config.log_every_steps = max(plan.loop_steps // 10, 1)
  config.checkpoint_every_steps = 0                      # a save at each epoch's end, as in a real run
  config.eval.knn_every_epochs = 0
  config.eval.report = False
  config.init_from = ''
  return config


def stage_loop(plan: Plan) -> dict:
  from input_pipeline import device_crop_ms, write_folder

  from udi_jax.data.crops import CropSettings, crops_on_device
  from udi_jax.data.sources import open_source
  from udi_jax.train.loop import train_and_evaluate
  batch = plan.batches[0] * jax.device_count()
  images = batch * max(plan.loop_steps // 4, 1)          # four epochs
  root = plan.work / 'jpegs'
  started = time.perf_counter()
  write_folder(root, images)
  print(f'  wrote {images} JPEGs (about 470x410) in {time.perf_counter() - started:.0f} s', flush=True)
  crops = dataclasses.replace(CropSettings.from_config(plan.config), canvas_size=plan.config.data.canvas_size)
  crop_ms = device_crop_ms(open_source(f'imagefolder:{root}'), crops, plan.batches[0])
  print(f'  the crop stage alone (cut {2 + crops.num_local} crops from {crops.canvas_size}-px canvases): '
        f'{crop_ms:.3f} ms per image', flush=True)
  alone = (plan.measured.get(plan.batches[0])
           or timed_step(loop_config(plan, root, images, 0), plan.batches[0], plan))
  step_rate = alone.get('images_per_s_per_device', math.nan) * jax.device_count()
  runs = []
  # With an accelerator, the default ('auto': crops cut on the device) at every worker count, then host
  # crops at the most workers, for comparison; on a CPU the default alone (host crops there).
  settings = [('auto', w) for w in plan.workers] + ([('host', max(plan.workers))] if plan.accelerator else [])
  for crops_on, workers in settings:
    config = loop_config(plan, root, images, workers, crops_on)
    where = 'device' if crops_on_device(config) else 'host'
    workdir = plan.work / f'loop_{workers}_workers_{where}_crops'
    train_and_evaluate(config, workdir)
    logged = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
    rate = statistics.median(m['images_per_s'] for m in logged if 'images_per_s' in m)   # (not the first: compiled)
    runs.append({'workers': workers, 'crops_on': where, 'images_per_s': rate, 'loop_over_step': rate / step_rate})
    print(f'  {workers} workers, crops on the {where}: loop {rate:.1f} images/s, step alone {step_rate:.1f}: '
          f'{100 * rate / step_rate:.0f} %', flush=True)
  return {'batch': batch, 'steps': plan.loop_steps, 'step_alone_images_per_s': step_rate,
          'crop_stage_ms_per_image': crop_ms, 'runs': runs}


def stage_bf16(plan: Plan) -> dict:
  from udi_jax.benchmark import synthetic_batch
  from udi_jax.mesh import batch_sharding, data_mesh
  from udi_jax.train.state import create_state
  from udi_jax.train.step import Trainer, make_train_step
  mesh = data_mesh()
  losses = {}
  for dtype, precision in (('float32', 'highest'), ('bfloat16', 'default')):
    config = plan.config.copy_and_resolve_references()
    config.model.dtype = dtype
    config.batch_size = plan.batches[0] * jax.device_count()
    with jax.default_matmul_precision(precision):
      trainer = Trainer.from_config(config, steps_per_epoch=max(plan.bf16_steps // 2, 1))
      state = create_state(trainer.nets, trainer.tx, jax.random.key(0), mesh)
      step = make_train_step(trainer, mesh)
      losses[dtype] = []
      for i in range(plan.bf16_steps):
        batch = {k: jax.device_put(v, batch_sharding(mesh))
                 for k, v in synthetic_batch(config, config.batch_size, seed=i).items()}
        state, metrics = step(state, batch)
        losses[dtype].append(float(metrics['loss']))
  fp32, bf16 = np.array(losses['float32']), np.array(losses['bfloat16'])
  gap = np.abs(bf16 - fp32) / np.abs(fp32)
  print(f'  loss after {plan.bf16_steps} steps: fp32 {fp32[-1]:.4f}, bf16 {bf16[-1]:.4f}; '
        f'largest relative gap {gap.max():.4f}', flush=True)
  return {'steps': plan.bf16_steps, 'fp32_loss': fp32.tolist(), 'bf16_loss': bf16.tolist(),
          'final_gap': float(gap[-1]), 'max_gap': float(gap.max()), 'finite': bool(np.all(np.isfinite(bf16)))}


STAGE_FUNCTIONS = {'env': stage_env, 'parity': stage_parity, 'step': stage_step, 'loop': stage_loop,
                   'bf16': stage_bf16}


# ---- The record.

def results_row(results: dict) -> str:
  """One line for benchmarks/RESULTS.md's device-check table."""
  stages = results['stages']
  env, parity, step = stages.get('env', {}), stages.get('parity', {}), stages.get('step', {})
  fmt = lambda x, spec: 'n/a' if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)
  fitted = [r for r in step.get('rows', []) if 'error' not in r]
  best = max(fitted, key=lambda r: r['images_per_s_per_device'], default={})
  loop = max(stages.get('loop', {}).get('runs', []), key=lambda r: r['loop_over_step'], default={})
  cells = [results['date'], f"{env.get('device_kind', '?')} x{env.get('devices', '?')}", env.get('jax', '?'),
           f"{fmt(best.get('images_per_s_per_device'), '.0f')} at batch {best.get('per_device_batch', 'n/a')}",
           fmt(best.get('mfu') and 100 * best['mfu'], '.1f'), step.get('largest_fitting', 'n/a'),
           f"{fmt(parity.get('loss_error'), '.1e')} / {fmt(parity.get('gradient_error'), '.1e')}",
           f"{fmt(loop.get('loop_over_step'), '.2f')} ({loop.get('workers', 'n/a')} workers, "
           f"{loop.get('crops_on', 'n/a')} crops)",
           fmt(stages.get('bf16', {}).get('max_gap'), '.4f')]
  return '| ' + ' | '.join(str(c) for c in cells) + ' |'


def main(argv):
  del argv
  unknown = [s for s in FLAGS.stages if s not in STAGES]
  if unknown:
    raise app.UsageError(f'Unknown stage(s) {unknown}; choose from {STAGES}.')
  date = datetime.date.today().isoformat()
  device = jax.devices()[0].device_kind
  out = pathlib.Path(FLAGS.out)
  out.mkdir(parents=True, exist_ok=True)
  path = out / f"{re.sub(r'[^A-Za-z0-9]+', '-', device).strip('-').lower()}-{date}.json"
  results = {'date': date, 'command': ' '.join(sys.argv), 'stages': {}}
  with tempfile.TemporaryDirectory() as work:
    if not jax.config.jax_compilation_cache_dir:          # the loop runs reuse the step's compiled program
      jax.config.update('jax_compilation_cache_dir', str(pathlib.Path(work) / 'jax_cache'))
    plan = Plan.from_flags(pathlib.Path(work))
    print(f'device check on {jax.device_count()} x {device} ({"accelerator" if plan.accelerator else "CPU"}), '
          f'stages {FLAGS.stages}; results in {path}', flush=True)
    for name in FLAGS.stages:
      print(f'== {name}', flush=True)
      started = time.perf_counter()
      try:
        record = STAGE_FUNCTIONS[name](plan)
      except Exception as e:  # noqa: BLE001 (recorded; the other stages still run)
        record = {'error': first_line(e)}
        print(f'  failed: {record["error"]}', flush=True)
      record['seconds'] = round(time.perf_counter() - started, 1)
      results['stages'][name] = record
      if name in ('env', 'parity'):
        print('  ' + json.dumps(record, default=str), flush=True)
      path.write_text(json.dumps(results, indent=1, default=str))
  results['row'] = results_row(results)
  path.write_text(json.dumps(results, indent=1, default=str))
  print(f'Results: {path}\nRow for benchmarks/RESULTS.md:\n{results["row"]}', flush=True)
  failed = [n for n, r in results['stages'].items() if 'error' in r or r.get('passed') is False]
  if failed:
    print(f'Stages that failed: {failed}', flush=True)
    sys.exit(1)


if __name__ == '__main__':
  app.run(main)

"""train_and_evaluate: restore or create the state, run the steps, checkpoint, log, stop cleanly.

Read top to bottom: mesh and input, model and optimiser, state (resume from the newest checkpoint of the
workdir, or `init_from`), the compiled step, then the loop. A SIGTERM saves a checkpoint at the next step
boundary and returns normally (exit code 0). A non-finite metric stops the run with a message naming the
step and the metric; checkpoints are written only after their steps were checked, so the last good one
stays.
"""

from __future__ import annotations

import json
import pathlib
import signal
import time
from typing import Callable, Optional

import jax
import numpy as np
from absl import logging
from clu import metric_writers, periodic_actions
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from udi_jax.config_check import validate
from udi_jax.data.photometric import PhotometricSettings
from udi_jax.data.pipeline import InputPipeline, settings_from_config
from udi_jax.data.sources import limit, open_source
from udi_jax.method.objective import ObjectiveSettings
from udi_jax.method.sampling import SamplingSettings
from udi_jax.method.schedules import Schedules
from udi_jax.models.networks import build_networks
from udi_jax.train.checkpoint import Checkpoints
from udi_jax.train.optimizer import OptimizerSettings, make_optimizer
from udi_jax.train.state import TrainState, abstract_state, create_state
from udi_jax.train.step import Trainer, make_train_step


def trainer_from_config(config, steps_per_epoch: int) -> Trainer:
  schedules = Schedules.from_config(config, steps_per_epoch)
  tx = make_optimizer(OptimizerSettings.from_config(config), schedules.learning_rate,
                      schedules.weight_decay_at, schedules.last_layer_trainable)
  return Trainer(nets=build_networks(config), objective=ObjectiveSettings.from_config(config),
                 sampling=SamplingSettings.from_config(config), schedules=schedules, tx=tx, seed=config.seed,
                 photometric=(PhotometricSettings(blur_radius=tuple(config.data.blur_radius))
                              if config.data.augment else None))


PREEMPTION_CHECK_STEPS = 10   # multi-host: steps between agreeing on a SIGTERM


class Preemption:
  """Turns SIGTERM into a flag checked at step boundaries (agreed on by all processes)."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning('SIGTERM received: saving a checkpoint at the next step boundary, then stopping.')
    self.requested = True

  def __exit__(self, *exc):
    signal.signal(signal.SIGTERM, self._previous)

  def agreed(self, step: int) -> bool:
    """Whether every process should stop after `step`. Across hosts this is a collective (a device sync),
    so it is asked every PREEMPTION_CHECK_STEPS steps only."""
    if jax.process_count() == 1:
      return self.requested
    if step % PREEMPTION_CHECK_STEPS:
      return False
    return bool(np.max(multihost_utils.process_allgather(np.int32(self.requested))))


def _first_non_finite(pending: list[tuple[int, dict]]) -> Optional[tuple[int, str]]:
  for step, metrics in pending:
    for name, value in metrics.items():
      if not np.all(np.isfinite(value)):
        return step, name
  return None


def progress_line(step: int, total: int, steps_per_epoch: int, m: dict, seconds_per_step: float,
                  batch_size: int) -> str:
  levels = ' '.join(f'{k[5:]} {m[k]:.3f}' for k in ('loss/cls', 'loss/cls_plus', 'loss/patch') if k in m)
  eta = time.strftime('%H:%M:%S', time.gmtime(max(total - step, 0) * seconds_per_step))
  return (f'step {step}/{total} (epoch {(step - 1) // steps_per_epoch}) loss {m["loss"]:.4f} [{levels}] '
          f'lr {m["lr"]:.2e} T_t {m["teacher_temp"]:.4f} | {batch_size / seconds_per_step:.1f} img/s, '
          f'ETA {eta}')


def _load_init(state: TrainState, init_from: str, abstract: TrainState) -> TrainState:
  """Student, teacher and centres of another run's newest checkpoint (a workdir or checkpoint directory),
  or of a PyTorch file (`torch:PATH`: official UDI, DINO, timm); fresh optimiser and step."""
  primary = jax.process_index() == 0
  if init_from.startswith('torch:'):
    from udi_jax.interop.official import centres_from_official
    from udi_jax.interop.torch_files import load_torch_checkpoint
    imported = load_torch_checkpoint(init_from[len('torch:'):], abstract.student)
    place = lambda tree, like: jax.tree.map(lambda x, a: jax.device_put(np.asarray(x, np.float32), a.sharding),
                                            tree, like)
    # Student and teacher get separate buffers (the step donates both).
    parts = lambda: {k: place(v, abstract.student[k]) for k, v in imported.params.items()}
    centres = state.centres
    if imported.centres is not None:
      centres = place(centres_from_official(imported.centres, tuple(state.centres)), abstract.centres)
    if primary:
      print(f'Initialised {sorted(imported.params)} from {init_from} ({imported.layout} layout'
            f'{", centres too" if imported.centres is not None else ""}); unused keys: '
            f'{imported.unused_keys[:10] or "none"}.', flush=True)
    return TrainState(step=state.step, student={**state.student, **parts()}, teacher={**state.teacher, **parts()},
                      opt=state.opt, centres=centres)
  path = pathlib.Path(init_from)
  directory = path / 'checkpoints' if (path / 'checkpoints').is_dir() else path
  if not directory.is_dir():
    raise FileNotFoundError(f'config.init_from={init_from} is neither a workdir nor a checkpoint directory '
                            '(use torch:PATH for PyTorch files).')
  source = Checkpoints(directory, asynchronous=False)
  other, _, step = source.restore(abstract)
  source.close()
  if primary:
    print(f'Initialised the student, teacher and centres from {directory} (step {step}).', flush=True)
  return TrainState(step=state.step, student=other.student, teacher=other.teacher, opt=state.opt,
                    centres=other.centres)


def train_and_evaluate(config, workdir: str, *, step_hook: Optional[Callable] = None) -> TrainState:
  """Trains until config.epochs (or a SIGTERM); returns the final state. `step_hook(step_fn)` may wrap
  the compiled step (tests)."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  validate(config, jax.device_count(), jax.process_count())
  primary = jax.process_index() == 0

  # ---- Mesh and input.
  mesh = Mesh(np.array(jax.devices()), ('data',))
  source = open_source(config.data.source, data_dir=config.data.data_dir or None)
  if config.data.max_examples:
    source = limit(source, config.data.max_examples)
  pipe_settings = settings_from_config(config)
  steps_per_epoch = len(source) // config.batch_size
  if steps_per_epoch < 1:
    raise ValueError(f'config.data.source={config.data.source} has {len(source)} examples, fewer than '
                     f'config.batch_size={config.batch_size}; use a smaller batch.')

  # ---- Model, optimiser, schedules.
  trainer = trainer_from_config(config, steps_per_epoch)
  total_steps = trainer.schedules.total_steps
  config_dict = json.loads(config.to_json_best_effort())
  if primary:
    (workdir / 'config.json').write_text(json.dumps(config_dict, indent=2))

  # ---- State: resume, or create (optionally from another run).
  keep_period = config.keep_every_epochs * steps_per_epoch if config.keep_every_epochs else None
  checkpoints = Checkpoints(workdir / 'checkpoints', keep=config.keep_checkpoints, keep_period=keep_period)
  abstract = abstract_state(trainer.nets, trainer.tx, mesh)
  data_state = None
  if checkpoints.latest_step() is not None:
    state, data_state, step = checkpoints.restore(abstract)
    if primary:
      print(f'Resuming from the checkpoint of step {step} in {workdir / "checkpoints"}.', flush=True)
  else:
    state = create_state(trainer.nets, trainer.tx, jax.random.key(config.seed), mesh)
    if config.init_from:
      state = _load_init(state, config.init_from, abstract)
  start = int(jax.device_get(state.step))

  sharding = NamedSharding(mesh, P('data')) if config.parallel == 'shard_map' else None
  pipeline = InputPipeline(source, pipe_settings, num_steps=total_steps, start_step=start, sharding=sharding)
  if data_state is not None:
    pipeline.set_state(data_state)

  train_step = make_train_step(trainer, mesh, config.parallel)
  if step_hook is not None:
    train_step = step_hook(train_step)
  writer = metric_writers.create_default_writer(str(workdir), just_logging=not primary)
  progress = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer,
                                           every_steps=config.log_every_steps)
  if primary:
    print(f'Training {total_steps} steps ({config.epochs} epochs x {steps_per_epoch}) from step {start}; '
          f'workdir {workdir}', flush=True)

  # ---- Loop.
  pending: list[tuple[int, dict]] = []
  last_log_time, last_log_step = time.time(), start

  def check_and_log(step: int):
    nonlocal pending, last_log_time, last_log_step
    fetched = [(s, jax.device_get(m)) for s, m in pending]
    pending = []
    bad = _first_non_finite(fetched)
    if bad is not None:
      good = checkpoints.latest_step()
      raise FloatingPointError(
          f'Non-finite {bad[1]} at step {bad[0]}; stopping. The last good checkpoint is '
          f'{"step " + str(good) if good is not None else "none"} in {workdir / "checkpoints"}.')
    if not fetched:
      return
    mean = {k: float(np.mean([m[k] for _, m in fetched])) for k in fetched[-1][1]}
    seconds_per_step = max(time.time() - last_log_time, 1e-9) / max(step - last_log_step, 1)
    mean['images_per_s'] = config.batch_size / seconds_per_step
    writer.write_scalars(step, mean)
    if primary:
      with open(workdir / 'metrics.jsonl', 'a') as f:
        f.write(json.dumps({'step': step, **mean}) + '\n')
      print(progress_line(step, total_steps, steps_per_epoch, mean, seconds_per_step, config.batch_size),
            flush=True)
    last_log_time, last_log_step = time.time(), step

  def knn_now(step: int):
    from udi_jax.evaluate import run as evaluation   # only when asked: opens the evaluation splits
    train, test = evaluation.eval_sources(config)
    tokens = evaluation.token_kinds(config, trainer.nets)
    backbone = evaluation.evaluated_network(config, state)['backbone']
    results = evaluation.knn_results(trainer.nets, backbone, train, test, config, tokens)
    flat = {f'knn/{t}/{k}': v for t, r in results.items() for k, v in r.items()}
    writer.write_scalars(step, flat)
    if primary:
      with open(workdir / 'metrics.jsonl', 'a') as f:
        f.write(json.dumps({'step': step, **flat}) + '\n')
      k = evaluation.reported_k(config)
      print(f'k-NN at step {step}: ' + ', '.join(f'{t} top-1@{k} {r[f"top1@{k}"]:.2f}'
                                                   for t, r in results.items()), flush=True)

  with Preemption() as preemption:
    step = start
    while step < total_steps:
      batch = next(pipeline)
      state, metrics = train_step(state, batch)
      step += 1
      pending.append((step, metrics))
      progress(step)
      end_of_epoch = step % steps_per_epoch == 0
      save = (end_of_epoch or step == total_steps
              or (config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0))
      stop = preemption.agreed(step)
      if save or stop or step % config.log_every_steps == 0:
        check_and_log(step)
      if save or stop:
        checkpoints.save(step, state, pipeline.get_state(), config_dict)
      if stop:
        logging.warning('Stopped at step %d after SIGTERM; the checkpoint is saved.', step)
        break
      every = config.eval.knn_every_epochs
      if end_of_epoch and every and (step // steps_per_epoch) % every == 0:
        knn_now(step)
  checkpoints.wait()
  checkpoints.close()
  pipeline.close()
  writer.flush()
  if config.eval.report and step == total_steps:
    final_report(config, trainer, state, mesh, workdir)
  return state


def final_report(config, trainer: Trainer, state: TrainState, mesh: Mesh, workdir: pathlib.Path):
  """After training: the k-NN table (raw pixels, initialisation, trained network) and pictures."""
  from udi_jax.evaluate import run as evaluation
  init = create_state(trainer.nets, trainer.tx, jax.random.key(config.seed), mesh)
  pick = lambda st: jax.device_get(evaluation.evaluated_network(config, st))
  table, _ = evaluation.comparison_table(config, trainer.nets, pick(init), pick(state), workdir)
  pictures = evaluation.pictures(config, trainer.nets, pick(state), workdir)
  if jax.process_index() == 0:
    from udi_jax import export
    teacher = jax.device_get(state.teacher)
    out = workdir / 'export' / 'teacher_timm.safetensors'
    export.write(export.payload('timm', trainer.nets, None, teacher, None), out)
    print('\n' + table + '\n', flush=True)
    print(export.how_to_load('timm', trainer.nets, out, None, 'teacher', int(jax.device_get(state.step))),
          flush=True)
    print(f'Everything is in {workdir}:\n  k-NN table   {workdir / "eval" / "knn_table.md"} (and .json)\n'
          f'  pictures     ' + '\n               '.join(str(p) for p in pictures) +
          f'\n  PyTorch      {workdir / "export" / "teacher_timm.safetensors"} (timm layout)'
          f'\n  checkpoints  {workdir / "checkpoints"}\n  metrics      {workdir / "metrics.jsonl"} '
          f'(TensorBoard: tensorboard --logdir {workdir})', flush=True)

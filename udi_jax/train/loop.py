"""train_and_evaluate: restore or create the state, run the steps, checkpoint, log, stop cleanly.

Read top to bottom: the run's settings (every config value is checked before anything runs), mesh and
input, the trainer, the state (resume from the newest checkpoint of the workdir, or `init_from`), the
compiled step, then the loop. A SIGTERM saves a checkpoint at the next step boundary and returns
normally. A non-finite metric stops the run with a message naming the step and the metric; checkpoints
are written only after their steps were checked, so the last good one stays. The one evaluation the loop
runs is k-NN during training (`config.eval.knn_every_epochs`); the end-of-run report is the caller's
(`udi_jax.evaluate.report`).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import signal
import time
from typing import Optional

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from udi_jax.data.pipeline import InputPipeline, PipelineSettings, settings_from_config
from udi_jax.data.sources import Source, training_source
from udi_jax.errors import config_errors
from udi_jax.evaluate import run as evaluation
from udi_jax.mesh import batch_sharding, data_mesh
from udi_jax.models.networks import LEVELS
from udi_jax.train.checkpoint import Checkpoints, checkpoint_dir
from udi_jax.train.state import TrainState, abstract_state, create_state
from udi_jax.train.step import PARALLEL, Trainer, make_train_step

PREEMPTION_CHECK_STEPS = 10   # multi-host: steps between agreeing on a SIGTERM


@dataclasses.dataclass(frozen=True)
class RunSettings:
  """The loop's own fields of a config: batch, mapping, logging, checkpoints, k-NN, initialisation."""
  batch_size: int
  parallel: str
  log_every_steps: int
  checkpoint_every_steps: int
  keep_checkpoints: int
  keep_every_epochs: int
  knn_every_epochs: int
  init_from: str

  @classmethod
  def from_config(cls, config, num_devices: int, num_processes: int) -> 'RunSettings':
    if config.batch_size <= 0 or config.batch_size % num_devices:
      raise ValueError(f'config.batch_size={config.batch_size} does not divide over {num_devices} devices; '
                       f'use a positive multiple of {num_devices}.')
    if config.parallel not in PARALLEL:
      raise ValueError(f'config.parallel={config.parallel!r} is not known; use one of {PARALLEL}.')
    if config.parallel == 'pmap' and num_processes > 1:
      raise ValueError("config.parallel='pmap' runs on one process; use config.parallel='shard_map' on "
                       'several hosts.')
    if config.log_every_steps <= 0 or config.checkpoint_every_steps < 0 or config.keep_checkpoints < 1:
      raise ValueError('config.log_every_steps must be positive, checkpoint_every_steps >= 0 and '
                       'keep_checkpoints >= 1.')
    torch_file = config.init_from[len('torch:'):] if config.init_from.startswith('torch:') else None
    if torch_file is not None and not pathlib.Path(torch_file).is_file():
      raise ValueError(f'config.init_from={config.init_from}: no such file; give torch:PATH to a .pth or '
                       '.safetensors file.')
    return cls(batch_size=config.batch_size, parallel=config.parallel, log_every_steps=config.log_every_steps,
               checkpoint_every_steps=config.checkpoint_every_steps, keep_checkpoints=config.keep_checkpoints,
               keep_every_epochs=config.keep_every_epochs, knn_every_epochs=config.eval.knn_every_epochs,
               init_from=config.init_from)


def check_config(config, num_devices: int, num_processes: int = 1) -> None:
  """Refuses an impossible training config before anything runs (ConfigError, one sentence): builds
  every settings object of a run, each of which refuses its own bad values."""
  with config_errors():
    RunSettings.from_config(config, num_devices, num_processes)
    settings_from_config(config)
    evaluation.check_config(config)
    Trainer.from_config(config, steps_per_epoch=1)


@dataclasses.dataclass(frozen=True)
class TrainResult:
  state: TrainState
  trainer: Trainer
  completed: bool            # False when a SIGTERM stopped the run early


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


def progress_line(step: int, total: int, steps_per_epoch: int, m: dict, seconds_per_step: float,
                  batch_size: int) -> str:
  levels = ' '.join(f'{level} {m[f"loss/{level}"]:.3f}' for level in LEVELS if f'loss/{level}' in m)
  eta = time.strftime('%H:%M:%S', time.gmtime(max(total - step, 0) * seconds_per_step))
  return (f'step {step}/{total} (epoch {(step - 1) // steps_per_epoch}) loss {m["loss"]:.4f} [{levels}] '
          f'lr {m["lr"]:.2e} T_t {m["teacher_temp"]:.4f} | {batch_size / seconds_per_step:.1f} img/s, '
          f'ETA {eta}')


def clu_writers():
  """clu's metric writers and periodic actions. They load TensorFlow (seconds), so they are imported when
  a run starts (a bad config fails at once); without TensorFlow they cannot be imported at all."""
  from clu import metric_writers, periodic_actions
  return metric_writers, periodic_actions


class MetricsLog:
  """The steps' metrics, kept on the device until a log step; then checked for non-finite values and
  written to TensorBoard (clu), `metrics.jsonl` and the progress line (process 0). Without TensorFlow
  (e.g. an accelerator image that lacks it) the TensorBoard events are off, with a warning."""

  def __init__(self, workdir: pathlib.Path, total_steps: int, steps_per_epoch: int, batch_size: int,
               start: int, log_every_steps: int):
    self.workdir, self.total_steps, self.steps_per_epoch = workdir, total_steps, steps_per_epoch
    self.batch_size, self.primary = batch_size, jax.process_index() == 0
    self.writer = self.progress = None
    try:
      metric_writers, periodic_actions = clu_writers()
    except ImportError as e:
      logging.warning('TensorBoard events are off (%s); the metrics go to %s only.', e,
                      workdir / 'metrics.jsonl')
    else:
      self.writer = metric_writers.create_default_writer(str(workdir), just_logging=not self.primary)
      self.progress = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=self.writer,
                                                      every_steps=log_every_steps)
    self.pending: list[tuple[int, dict]] = []
    self.last_time, self.last_step = time.time(), start

  def add(self, step: int, metrics: dict):
    self.pending.append((step, metrics))
    if self.progress:
      self.progress(step)

  def write(self, step: int, scalars: dict):
    if self.writer:
      self.writer.write_scalars(step, scalars)
    if self.primary:
      with open(self.workdir / 'metrics.jsonl', 'a') as f:
        f.write(json.dumps({'step': step, **scalars}) + '\n')

  def flush(self, step: int, last_good: Optional[int]):
    """Writes the mean of the pending steps; raises FloatingPointError naming the first non-finite one."""
    fetched = [(s, jax.device_get(m)) for s, m in self.pending]
    self.pending = []
    for bad_step, metrics in fetched:
      for name, value in metrics.items():
        if not np.all(np.isfinite(value)):
          raise FloatingPointError(
              f'Non-finite {name} at step {bad_step}; stopping. The last good checkpoint is '
              f'{"step " + str(last_good) if last_good is not None else "none"} in {self.workdir / "checkpoints"}.')
    if not fetched:
      return
    mean = {k: float(np.mean([m[k] for _, m in fetched])) for k in fetched[-1][1]}
    seconds_per_step = max(time.time() - self.last_time, 1e-9) / max(step - self.last_step, 1)
    mean['images_per_s'] = self.batch_size / seconds_per_step
    self.write(step, mean)
    if self.primary:
      print(progress_line(step, self.total_steps, self.steps_per_epoch, mean, seconds_per_step,
                          self.batch_size), flush=True)
    self.last_time, self.last_step = time.time(), step

  def close(self):
    if self.writer:
      self.writer.flush()


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
  directory = checkpoint_dir(init_from)
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


def _initial_state(trainer: Trainer, run: RunSettings, checkpoints: Checkpoints, seed: int,
                   mesh) -> tuple[TrainState, Optional[dict]]:
  """(state, input-iterator state): the newest checkpoint of the run, or a new state (maybe `init_from`)."""
  abstract = abstract_state(trainer.nets, trainer.tx, mesh)
  if checkpoints.latest_step() is not None:
    state, data_state, step = checkpoints.restore(abstract)
    if jax.process_index() == 0:
      print(f'Resuming from the checkpoint of step {step} in {checkpoints.manager.directory}.', flush=True)
    return state, data_state
  state = create_state(trainer.nets, trainer.tx, jax.random.key(seed), mesh)
  if run.init_from:
    state = _load_init(state, run.init_from, abstract)
  return state, None


def _knn_now(config, nets, state: TrainState, step: int, log: MetricsLog):
  results = evaluation.knn_during_training(config, nets, state)
  log.write(step, {f'knn/{t}/{k}': v for t, r in results.items() for k, v in r.items()})
  if log.primary:
    k = evaluation.reported_k(config)
    print(f'k-NN at step {step}: ' + ', '.join(f'{t} top-1@{k} {r[f"top1@{k}"]:.2f}' for t, r in results.items()),
          flush=True)


def _settings(config) -> tuple[RunSettings, PipelineSettings, Source, Trainer]:
  """Every settings object of the run, built once (each refuses its own bad values: ConfigError, before
  anything runs), and the training images."""
  with config_errors():
    run = RunSettings.from_config(config, jax.device_count(), jax.process_count())
    pipe_settings = settings_from_config(config)
    evaluation.check_config(config)
  source = training_source(config)
  with config_errors():
    if len(source) < run.batch_size:
      raise ValueError(f'config.data.source={config.data.source} has {len(source)} examples, fewer than '
                       f'config.batch_size={run.batch_size}; use a smaller batch.')
    trainer = Trainer.from_config(config, steps_per_epoch=len(source) // run.batch_size)
  return run, pipe_settings, source, trainer


def train_and_evaluate(config, workdir: str | pathlib.Path) -> TrainResult:
  """Trains until config.epochs (or a SIGTERM). Raises ConfigError for an impossible config before
  anything runs, FloatingPointError at a non-finite metric."""
  run, pipe_settings, source, trainer = _settings(config)
  mesh = data_mesh()
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  steps_per_epoch, total_steps = trainer.schedules.steps_per_epoch, trainer.schedules.total_steps
  config_dict = json.loads(config.to_json_best_effort())
  if jax.process_index() == 0:
    (workdir / 'config.json').write_text(json.dumps(config_dict, indent=2))

  # ---- State: resume, or create (optionally from another run); the input from the same step.
  keep_period = run.keep_every_epochs * steps_per_epoch if run.keep_every_epochs else None
  checkpoints = Checkpoints(workdir / 'checkpoints', keep=run.keep_checkpoints, keep_period=keep_period)
  state, data_state = _initial_state(trainer, run, checkpoints, config.seed, mesh)
  start = int(jax.device_get(state.step))
  pipeline = InputPipeline(source, pipe_settings, num_steps=total_steps, start_step=start,
                           sharding=batch_sharding(mesh) if run.parallel == 'shard_map' else None)
  if data_state is not None:
    pipeline.set_state(data_state)
  train_step = make_train_step(trainer, mesh, run.parallel)
  log = MetricsLog(workdir, total_steps, steps_per_epoch, run.batch_size, start, run.log_every_steps)
  if log.primary:
    print(f'Training {total_steps} steps ({config.epochs} epochs x {steps_per_epoch}) from step {start}; '
          f'workdir {workdir}', flush=True)

  # ---- Loop: metrics stay on the device until a log step; saves only after their steps were checked.
  with Preemption() as preemption:
    step = start
    while step < total_steps:
      state, metrics = train_step(state, next(pipeline))
      step += 1
      log.add(step, metrics)
      end_of_epoch = step % steps_per_epoch == 0
      save = (end_of_epoch or step == total_steps
              or (run.checkpoint_every_steps and step % run.checkpoint_every_steps == 0))
      stop = preemption.agreed(step)
      if save or stop or step % run.log_every_steps == 0:
        log.flush(step, checkpoints.latest_step())
      if save or stop:
        checkpoints.save(step, state, pipeline.get_state(), config_dict)
      if stop:
        logging.warning('Stopped at step %d after SIGTERM; the checkpoint is saved.', step)
        break
      if end_of_epoch and run.knn_every_epochs and (step // steps_per_epoch) % run.knn_every_epochs == 0:
        _knn_now(config, trainer.nets, state, step, log)
  checkpoints.wait()
  checkpoints.close()
  pipeline.close()
  log.close()
  return TrainResult(state=state, trainer=trainer, completed=step == total_steps)

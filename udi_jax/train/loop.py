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
from typing import Optional

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from udi_jax.data.pipeline import InputPipeline, PipelineSettings, settings_from_config
from udi_jax.data.sources import Source, check_spec, training_source
from udi_jax.errors import config_errors
from udi_jax.evaluate import run as evaluation
from udi_jax.evaluate.protocols import knn as knn_protocol
from udi_jax.mesh import batch_sharding, data_mesh
from udi_jax.say import say
from udi_jax.train import metrics_log, run_config
from udi_jax.train.checkpoint import Checkpoints, checkpoint_dir
from udi_jax.train.metrics_log import MetricsLog
from udi_jax.train.state import TrainState, abstract_state, create_state
from udi_jax.train.step import PARALLEL, Trainer, make_train_step
from udi_jax.train.workdir import held_workdir

PREEMPTION_CHECK_STEPS = 10   # multi-host: steps between agreeing on a SIGTERM


@dataclasses.dataclass(frozen=True)
class RunSettings:
  """The loop's own fields of a config: batch, mapping, logging, checkpoints, k-NN, initialisation."""
  batch_size: int
  parallel: str
  log_every_steps: int
  checkpoint_every_steps: int
  checkpoint_every_minutes: float
  keep_checkpoints: int
  keep_every_epochs: int
  knn_every_epochs: int
  init_run: str              # another run's workdir or checkpoint directory to start from, or ''
  init_torch_file: str       # a PyTorch file to start from (config.init_from='torch:PATH'), or ''
  max_steps: int

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
    if (config.log_every_steps <= 0 or config.checkpoint_every_steps < 0 or config.keep_checkpoints < 1
        or not config.checkpoint_every_minutes >= 0):
      raise ValueError('config.log_every_steps must be positive, checkpoint_every_steps >= 0, '
                       'checkpoint_every_minutes >= 0 and keep_checkpoints >= 1.')
    if config.max_steps < 0:
      raise ValueError(f'config.max_steps={config.max_steps} must be 0 (the whole schedule) or positive.')
    is_torch = config.init_from.startswith('torch:')
    torch_file = config.init_from[len('torch:'):] if is_torch else ''
    if is_torch and not pathlib.Path(torch_file).is_file():
      raise ValueError(f'config.init_from={config.init_from}: no such file; give torch:PATH to a .pth or '
                       '.safetensors file.')
    if config.init_from and not is_torch and not checkpoint_dir(config.init_from).is_dir():
      raise ValueError(f'config.init_from={config.init_from} is neither a workdir nor a checkpoint directory; '
                       'give a run to start from, or torch:PATH for a PyTorch file.')
    return cls(batch_size=config.batch_size, parallel=config.parallel, log_every_steps=config.log_every_steps,
               checkpoint_every_steps=config.checkpoint_every_steps,
               checkpoint_every_minutes=float(config.checkpoint_every_minutes),
               keep_checkpoints=config.keep_checkpoints,
               keep_every_epochs=config.keep_every_epochs, knn_every_epochs=config.eval.knn_every_epochs,
               init_run='' if is_torch else config.init_from, init_torch_file=torch_file,
               max_steps=config.max_steps)


@dataclasses.dataclass(frozen=True)
class RunPlan:
  """Every settings object of a run, built once from its config."""
  run: RunSettings
  pipeline: PipelineSettings
  trainer: Trainer


def plan_run(config, num_devices: int, num_processes: int, steps_per_epoch: int = 1) -> RunPlan:
  """Builds every settings object of a run; each refuses its own bad values (ConfigError, one sentence),
  so an impossible config is refused before anything runs. `steps_per_epoch` sets the trainer's
  schedules (1 when only the config is checked)."""
  with config_errors():
    return RunPlan(run=RunSettings.from_config(config, num_devices, num_processes),
                   pipeline=settings_from_config(config), trainer=_checked_trainer(config, steps_per_epoch))


def _checked_trainer(config, steps_per_epoch: int) -> Trainer:
  evaluation.check_config(config)
  return Trainer.from_config(config, steps_per_epoch=steps_per_epoch)


def check_config(config, num_devices: int, num_processes: int = 1) -> None:
  """Refuses an impossible training config before anything runs (ConfigError, one sentence)."""
  plan_run(config, num_devices, num_processes)


@dataclasses.dataclass(frozen=True)
class TrainResult:
  state: TrainState
  trainer: Trainer
  completed: bool            # False when a SIGTERM or config.max_steps stopped the run early
  trained_steps: int         # by this call (0: the run was already complete)


class SaveClock:
  """Whether config.checkpoint_every_minutes of training passed since the last checkpoint: process 0's clock,
  agreed by all processes every PREEMPTION_CHECK_STEPS steps (a broadcast is a device sync)."""

  def __init__(self, minutes: float):
    self.seconds = 60.0 * minutes
    self.last = metrics_log.clock()

  def saved(self) -> None:
    self.last = metrics_log.clock()

  def due(self, step: int) -> bool:
    if not self.seconds:
      return False
    late = metrics_log.clock() - self.last >= self.seconds
    if jax.process_count() == 1:
      return late
    if step % PREEMPTION_CHECK_STEPS:
      return False
    return bool(multihost_utils.broadcast_one_to_all(np.int32(late)))


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


def _load_init(state: TrainState, run: RunSettings, abstract: TrainState) -> TrainState:
  """Student, teacher and centres of another run's newest checkpoint (a workdir or checkpoint directory),
  or of a PyTorch file (official UDI, DINO, timm); fresh optimiser and step."""
  primary = jax.process_index() == 0
  if run.init_torch_file:
    from udi_jax.interop.official import centres_from_official
    from udi_jax.interop.torch_files import load_student_and_teacher
    with config_errors():
      imported = load_student_and_teacher(run.init_torch_file, abstract.student)
    place = lambda tree, like: jax.tree.map(lambda x, a: jax.device_put(np.asarray(x, np.float32), a.sharding),
                                            tree, like)
    # Each network gets its own buffers, even when both come from one entry (the step donates both).
    parts = {role: {k: place(v, abstract.student[k]) for k, v in imported[role].params.items()}
             for role in ('student', 'teacher')}
    teacher = imported['teacher']
    centres = state.centres
    if teacher.centres is not None:
      centres = place(centres_from_official(teacher.centres, tuple(state.centres)), abstract.centres)
    if primary:
      filled = ('the student from its "student" entry, the teacher from its "teacher" entry'
                if teacher.layout == 'udi-checkpoint' else 'the student and the teacher from its one network')
      say(f'Initialised {sorted(teacher.params)} of {filled}: {run.init_torch_file} ({teacher.layout} layout'
          f'{", centres too" if teacher.centres is not None else ""}); unused keys: '
          f'{teacher.unused_keys[:10] or "none"}.')
    return TrainState(step=state.step, student={**state.student, **parts['student']},
                      teacher={**state.teacher, **parts['teacher']}, opt=state.opt, centres=centres)
  directory = checkpoint_dir(run.init_run)
  source = Checkpoints(directory, asynchronous=False)
  try:
    other, _, step, skipped = source.restore(abstract)
  finally:
    source.close()
  for bad, why in skipped:
    logging.warning('Skipped the checkpoint of step %d in %s: %s.', bad, directory, why)
  if primary:
    say(f'Initialised the student, teacher and centres from {directory} (step {step}).')
  return TrainState(step=state.step, student=other.student, teacher=other.teacher, opt=state.opt,
                    centres=other.centres)


def _initial_state(trainer: Trainer, run: RunSettings, checkpoints: Checkpoints, seed: int,
                   mesh) -> tuple[TrainState, Optional[dict]]:
  """(state, input-iterator state): the newest checkpoint of the run that restores (damaged newer ones
  are moved to WORKDIR/damaged_checkpoints/, saying why), or a new state (maybe `init_from`)."""
  abstract = abstract_state(trainer.nets, trainer.tx, mesh)
  if checkpoints.latest_step() is not None:
    state, data_state, step, skipped = checkpoints.restore(abstract)
    directory = pathlib.Path(checkpoints.manager.directory)
    for bad, why in skipped:
      moved = checkpoints.set_aside(bad, directory.parent / 'damaged_checkpoints')
      if jax.process_index() == 0:
        say(f'Skipped the checkpoint of step {bad}: {why}; moved it to {moved}.')
    if jax.process_index() == 0:
      say(f'Resuming from the checkpoint of step {step} in {directory}.')
    return state, data_state
  state = create_state(trainer.nets, trainer.tx, jax.random.key(seed), mesh)
  if run.init_run or run.init_torch_file:
    state = _load_init(state, run, abstract)
  return state, None


def _knn_now(config, nets, state: TrainState, step: int, log: MetricsLog):
  started = metrics_log.clock()
  results, diagnosed = evaluation.during_training(config, nets, state)
  seconds = metrics_log.clock() - started          # what the curve costs the run
  log.write(step, {**{f'knn/{t}/{k}': v for t, r in results.items() for k, v in r.items()}, **diagnosed,
                   'knn_seconds': seconds})
  if log.primary:
    k = knn_protocol.reported_k(config)
    say(f'k-NN at step {step}: ' + ', '.join(f'{t} top-1@{k} {r[f"top1@{k}"]:.2f}' for t, r in results.items())
        + f' ({seconds:.1f} s)')


def _prepare(config) -> tuple[RunPlan, Source]:
  """The run's settings, built once (refused before anything runs: ConfigError), and its training images;
  the evaluation sources and an `init_from` file are checked now rather than when they are needed."""
  with config_errors():
    check_spec(config.data.source, 'config.data.source')
    source = training_source(config)
  plan = plan_run(config, jax.device_count(), jax.process_count(),
                  steps_per_epoch=max(len(source) // max(config.batch_size, 1), 1))
  with config_errors():
    if len(source) < plan.run.batch_size:
      raise ValueError(f'config.data.source={config.data.source} has {len(source)} examples, fewer than '
                       f'config.batch_size={plan.run.batch_size}; use a smaller batch.')
    if config.eval.report or plan.run.knn_every_epochs:     # found now, not at the end of training
      evaluation.probe_sources(config)
    if plan.run.init_torch_file:      # readable? (loaded again when the state is made)
      from udi_jax.interop.torch_files import read_file
      read_file(plan.run.init_torch_file)
  return plan, source


def train_and_evaluate(config, workdir: str | pathlib.Path) -> TrainResult:
  """Trains until config.epochs (or a SIGTERM), holding the workdir. Raises ConfigError for an impossible
  config and UserError for a workdir that cannot be used (another run holds it, not writable) before
  anything runs, FloatingPointError at a non-finite metric."""
  plan, source = _prepare(config)
  with held_workdir(workdir) as workdir:
    return _train(config, workdir, plan, source)


def _train(config, workdir: pathlib.Path, plan: RunPlan, source: Source) -> TrainResult:
  """Resumes or starts the state, then trains from its step to the end (or `max_steps`, or a SIGTERM)."""
  run, trainer, mesh = plan.run, plan.trainer, data_mesh()
  schedules = trainer.schedules
  config_dict = json.loads(config.to_json_best_effort())
  keep_period = run.keep_every_epochs * schedules.steps_per_epoch if run.keep_every_epochs else None
  checkpoints = Checkpoints(workdir / 'checkpoints', keep=run.keep_checkpoints, keep_period=keep_period)
  if checkpoints.latest_step() is not None:
    with config_errors():
      run_config.agreed_refusal(workdir, config_dict)
  if jax.process_index() == 0:
    run_config.write(workdir, config_dict)
  state, data_state = _initial_state(trainer, run, checkpoints, config.seed, mesh)
  start = int(jax.device_get(state.step))
  end = min(schedules.total_steps, run.max_steps) if run.max_steps else schedules.total_steps
  if start >= end:
    checkpoints.close()
    say(f'The run in {workdir} is complete (step {start} of {schedules.total_steps}'
        f'{f", config.max_steps={run.max_steps}" if end < schedules.total_steps else ""}); nothing to train. '
        'Evaluate it with --mode=eval, or train longer with a larger --config.epochs.')
    return TrainResult(state=state, trainer=trainer, completed=start >= schedules.total_steps, trained_steps=0)
  pipeline = InputPipeline(source, plan.pipeline, num_steps=schedules.total_steps, start_step=start,
                           sharding=batch_sharding(mesh) if run.parallel == 'shard_map' else None)
  if data_state is not None:
    pipeline.set_state(data_state)
  log = MetricsLog(workdir, schedules.total_steps, schedules.steps_per_epoch, run.batch_size, start,
                   run.log_every_steps, config.model.out_dim)
  say(f'Training {schedules.total_steps} steps ({config.epochs} epochs x {schedules.steps_per_epoch}) from step '
      f'{start}{f" to step {end} (config.max_steps)" if end < schedules.total_steps else ""}; workdir {workdir}')
  if start == 0 and run.knn_every_epochs:      # epoch 0 of the k-NN curve: the network at initialisation
    _knn_now(config, trainer.nets, state, 0, log)
  state, step = _run_steps(config, plan, make_train_step(trainer, mesh, run.parallel), state, pipeline, log,
                           checkpoints, config_dict, start, end)
  checkpoints.wait()
  checkpoints.close()
  pipeline.close()
  log.close()
  return TrainResult(state=state, trainer=trainer, completed=step == schedules.total_steps,
                     trained_steps=step - start)


def _run_steps(config, plan: RunPlan, train_step, state: TrainState, pipeline: InputPipeline, log: MetricsLog,
               checkpoints: Checkpoints, config_dict: dict, start: int, end: int) -> tuple[TrainState, int]:
  """The loop: metrics stay on the device until a log step; a checkpoint is saved only after its steps
  were checked; k-NN at the chosen epochs; a SIGTERM saves and stops at a step boundary."""
  run, steps_per_epoch = plan.run, plan.trainer.schedules.steps_per_epoch
  timed = SaveClock(run.checkpoint_every_minutes)
  with Preemption() as preemption:
    step = start
    while step < end:
      state, metrics = train_step(state, next(pipeline))
      step += 1
      if step == start + 1:
        log.start_clock(step)       # this call compiled the step: speed and ETA from the next one
      log.add(step, metrics)
      end_of_epoch = step % steps_per_epoch == 0
      save = (end_of_epoch or step == end or timed.due(step)
              or (run.checkpoint_every_steps and step % run.checkpoint_every_steps == 0))
      stop = preemption.agreed(step)
      if save or stop or step % run.log_every_steps == 0:
        log.flush(step, checkpoints.latest_step())
      if save or stop:
        checkpoints.save(step, state, pipeline.get_state(), config_dict)
        timed.saved()
      if stop:
        logging.warning('Stopped at step %d after SIGTERM; the checkpoint is saved.', step)
        break
      if (end_of_epoch and run.knn_every_epochs
          and ((step // steps_per_epoch) % run.knn_every_epochs == 0 or step == end)):   # the curve ends at the end
        _knn_now(config, plan.trainer.nets, state, step, log)
  return state, step

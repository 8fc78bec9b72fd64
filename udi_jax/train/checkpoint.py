"""Checkpoints under `workdir/checkpoints` (orbax): the train state, the input-iterator state, the config.

Every process calls save and restore (orbax coordinates multi-host writes of global arrays). Saves are
asynchronous (a save waits for the one before it); `wait` blocks until the last one is on disk. orbax
writes a step into a temporary directory and renames it when complete, so a save cut short leaves no
step behind; a step damaged afterwards (a truncated or deleted file) is found by `damage`, which reads
every stored array's bytes, and skipped: restoring without a step takes the newest one that restores
and lists the ones it skipped. On several processes, process 0 alone reads the arrays and chooses the
step; a step that fails to restore on any process stops every process with the same sentence.
`restore_run` opens a finished or running run's checkpoint for export, evaluation and tests.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from absl import logging
from jax.experimental import multihost_utils
from ml_collections import ConfigDict
from orbax.checkpoint._src.metadata import array_metadata_store  # the default handler's store

from udi_jax.errors import UserError
from udi_jax.mesh import data_mesh
from udi_jax.train import run_config
from udi_jax.train.state import TrainState, abstract_state
from udi_jax.train.step import Trainer

REPLICA_PARALLEL_MIN_BYTES = 1 << 20


def _type_handlers() -> ocp.type_handlers.TypeHandlerRegistry:
  """orbax's default handlers, except that a jax.Array under 1 MiB is written whole by one replica: by
  default orbax slices every replicated array across its replicas, an eager device op per array and
  replica (seconds per save for a small model, and at the first save of any run)."""
  registry = ocp.type_handlers.create_type_handler_registry(
      *[(ty, ocp.type_handlers.get_type_handler(ty)) for ty in ocp.type_handlers.supported_types()])
  registry.add(jax.Array, ocp.type_handlers.ArrayHandler(
      array_metadata_store=array_metadata_store.Store(),
      min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_BYTES), override=True, ignore_warnings=True)
  return registry


@dataclasses.dataclass(frozen=True)
class RestoreFailure:
  """What `AgreedRestore` returns in place of the state when reading it failed on this process."""
  why: str


def _describe(e: Exception) -> str:
  return f'{type(e).__name__}: {str(e).splitlines()[0][:160]}' if str(e) else type(e).__name__


class AgreedRestore(ocp.PyTreeCheckpointHandler):
  """orbax's PyTree handler, whose restore returns a `RestoreFailure` instead of raising. orbax ends a
  restore with a barrier of all processes: a process that raised before it would leave the others waiting
  there; this way every process reaches it, and they then agree on the outcome (`Checkpoints.restore`)."""

  def restore(self, directory, args=None):
    try:
      return super().restore(directory, args=args)
    except Exception as e:   # pylint: disable=broad-except  (orbax and tensorstore raise bare Exceptions)
      return RestoreFailure(_describe(e))


@ocp.args.register_with_handler(AgreedRestore, for_save=True)
class StateSave(ocp.args.PyTreeSave):
  """orbax's PyTree save arguments, for the item `AgreedRestore` handles."""


@ocp.args.register_with_handler(AgreedRestore, for_restore=True)
class StateRestore(ocp.args.PyTreeRestore):
  """orbax's PyTree restore arguments, for the item `AgreedRestore` handles."""


def checkpoint_dir(path: str | pathlib.Path) -> pathlib.Path:
  """A run's workdir or its `checkpoints/` directory -> the checkpoints directory."""
  path = pathlib.Path(path)
  return path / 'checkpoints' if (path / 'checkpoints').is_dir() else path


class Checkpoints:
  def __init__(self, directory: str | pathlib.Path, keep: int = 3, keep_period: Optional[int] = None,
               asynchronous: bool = True):
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, keep_period=keep_period, create=True,
                                           enable_async_checkpointing=asynchronous)
    handlers = {'state': AgreedRestore(type_handler_registry=_type_handlers()),
                'data': ocp.JsonCheckpointHandler(), 'config': ocp.JsonCheckpointHandler()}
    self.manager = ocp.CheckpointManager(pathlib.Path(directory).absolute(), options=options,
                                         item_handlers=handlers)

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_state: dict, config: dict, force: bool = True) -> bool:
    return self.manager.save(step, force=force, args=ocp.args.Composite(
        state=StateSave(state), data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(config)))

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def damage(self, step: int) -> Optional[str]:
    """Why the checkpoint of `step` cannot be restored (a missing or truncated file), or None. Reads every
    array's bytes from the tensorstore database directly: a damaged file found while orbax restores
    leaves thousands of lines of asyncio tracebacks, found here it is one quiet sentence."""
    path = pathlib.Path(self.manager.directory) / str(step)
    for item in ('data', 'config'):
      try:
        json.loads((path / item / 'metadata').read_text())
      except (OSError, ValueError):
        return f'{item}/metadata is missing or not JSON'
    if not (path / 'state' / 'manifest.ocdbt').is_file():
      return None if (path / 'state' / '_METADATA').is_file() else 'its state has no arrays'
    try:
      store = ts.KvStore.open({'driver': 'ocdbt', 'base': f'file://{(path / "state").absolute()}/'}).result()
      keys = store.list().result()
      missing = [k for k in keys if store.read(k).result().state != 'value']
    except ValueError as e:          # tensorstore's errors: a truncated file, an unreadable database
      return f'a file of its state is damaged ({str(e).splitlines()[0][:160]})'
    if not keys:
      return 'its state has no arrays'
    if missing:
      return f'{len(missing)} of its arrays have no data (e.g. {missing[0].decode(errors="replace")})'
    return None

  def choose(self, candidates: list[int]) -> tuple[Optional[int], list[tuple[int, str]]]:
    """(the first of `candidates` that `damage` finds whole, or None; the (step, reason) of those before it).
    Process 0 reads the arrays and decides; every process gets its choice (they must restore one step)."""
    chosen, skipped = None, []
    if jax.process_index() == 0:
      for candidate in candidates:
        problem = self.damage(candidate)
        if problem is None:
          chosen = candidate
          break
        skipped.append((candidate, problem))
    if jax.process_count() > 1:
      index = multihost_utils.broadcast_one_to_all(np.int32(len(skipped)))
      skipped = skipped or [(c, 'damaged (found on process 0)') for c in candidates[:int(index)]]
      chosen = candidates[int(index)] if int(index) < len(candidates) else None
    return chosen, skipped

  def _restore_step(self, step: int, abstract_state: Any, restore_args: Any) -> tuple[Any, Optional[str]]:
    """(the restored items or None, why not); across processes, a failure on any one fails them all."""
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=StateRestore(abstract_state, restore_args=restore_args), data=ocp.args.JsonRestore()))
      problem = restored['state'].why if isinstance(restored['state'], RestoreFailure) else None
    except Exception as e:   # pylint: disable=broad-except  (orbax raises bare Exceptions for bad data)
      problem = _describe(e)
    if problem is not None:
      restored = None
    if jax.process_count() > 1:
      failed = np.asarray(multihost_utils.process_allgather(np.int32(problem is not None))).reshape(-1)
      if failed.any():
        where = ', '.join(str(i) for i in np.flatnonzero(failed))
        raise UserError(f'The checkpoint of step {step} in {self.manager.directory} could not be restored on '
                        f'process {where}{f" ({problem})" if problem else ""}, so every process stops; see '
                        f'the output of process {where}, and move that step directory away to resume from '
                        'the one before it.')
    return restored, problem

  def restore(self, abstract_state: Any, step: Optional[int] = None
              ) -> tuple[Any, dict, int, list[tuple[int, str]]]:
    """(state, data state, step, skipped) of `step`, or of the newest checkpoint that restores, into
    `abstract_state`'s shardings; `skipped` lists the newer (step, reason) that could not be restored.
    Every process restores the same step: process 0 chooses it (`choose`); a step that fails to restore
    on one process stops them all (UserError), where a single process goes on to the step before it."""
    candidates = [step] if step is not None else self.steps()[::-1]
    if not candidates:
      raise FileNotFoundError(f'No checkpoint in {self.manager.directory}.')
    if step is not None and step not in self.steps():
      raise UserError(f'There is no checkpoint of step {step} in {self.manager.directory}; the steps there '
                      f'are {self.steps() or "none"}.')
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_state)
    skipped = []
    while candidates:
      chosen, damaged = self.choose(candidates)
      skipped += damaged
      if chosen is None:
        break
      restored, problem = self._restore_step(chosen, abstract_state, restore_args)
      if restored is not None:
        return restored['state'], restored['data'], chosen, skipped
      skipped.append((chosen, problem))
      candidates = candidates[candidates.index(chosen) + 1:]
    listed = '; '.join(f'step {s}: {why}' for s, why in skipped)
    raise UserError(f'No checkpoint in {self.manager.directory} can be restored ({listed}); move the damaged '
                    'step directories away to train from the start, or restore them from a backup.')

  def set_aside(self, step: int, to: pathlib.Path) -> pathlib.Path:
    """Moves a damaged step out of the checkpoints and returns where to: kept for inspection, and out of
    the way of the new save of that step."""
    target, n = to / str(step), 1
    while target.exists():
      target, n = to / f'{step}.{n}', n + 1
    if jax.process_index() == 0:
      to.mkdir(parents=True, exist_ok=True)
      shutil.move(pathlib.Path(self.manager.directory) / str(step), target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'set aside checkpoint {step}')
    self.manager.reload()
    return target

  def restore_config(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))['config']

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()


@dataclasses.dataclass(frozen=True)
class RestoredRun:
  config: ConfigDict         # the config given, or the one saved with the checkpoint
  trainer: Trainer           # built from `config` (for its networks and shapes)
  state: TrainState          # on the host (NumPy)
  data_state: dict           # the input iterator's state: seed, step, epoch, ...
  step: int


def restore_run(path: str | pathlib.Path, step: Optional[int] = None,
                config: Optional[ConfigDict] = None) -> RestoredRun:
  """The checkpoint of `step` (default: the newest that restores, with a warning naming any newer one
  skipped) of a run (its workdir or checkpoints/ directory).

  The networks' shapes come from `config`, or from the config saved with the checkpoint.
  """
  directory = checkpoint_dir(path)
  missing = UserError(f'No checkpoint in {directory}; train first, or give the workdir of a run.')
  if not directory.is_dir():
    raise missing
  checkpoints = Checkpoints(directory, asynchronous=False)
  try:
    if not checkpoints.steps():
      raise missing
    if config is None:      # the shapes: from the requested step's config, else the newest undamaged one's
      newest = step if step in checkpoints.steps() else (
          checkpoints.choose(checkpoints.steps()[::-1])[0] or checkpoints.steps()[-1])
      config = ConfigDict(run_config.completed(checkpoints.restore_config(newest)))
    trainer = Trainer.from_config(config, steps_per_epoch=1)         # shapes only
    abstract = abstract_state(trainer.nets, trainer.tx, data_mesh())
    state, data_state, step, skipped = checkpoints.restore(abstract, step)
  finally:
    checkpoints.close()
  for bad, why in skipped:
    logging.warning('Skipped the checkpoint of step %d in %s: %s.', bad, directory, why)
  return RestoredRun(config, trainer, jax.device_get(state), data_state, step)

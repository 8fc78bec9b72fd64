"""Checkpoints under `workdir/checkpoints` (orbax): the train state, the input-iterator state, the config.

Every process calls save and restore (orbax coordinates multi-host writes of global arrays). Saves are
asynchronous; `wait` blocks until the last one is on disk. The newest checkpoint is where a run resumes.
`restore_run` opens a finished or running run's checkpoint for export, evaluation and tests.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from ml_collections import ConfigDict
from orbax.checkpoint._src.metadata import array_metadata_store   # the default handler's store

from udi_jax.mesh import data_mesh
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
      min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_BYTES), override=True)
  return registry


def checkpoint_dir(path: str | pathlib.Path) -> pathlib.Path:
  """A run's workdir or its `checkpoints/` directory -> the checkpoints directory."""
  path = pathlib.Path(path)
  return path / 'checkpoints' if (path / 'checkpoints').is_dir() else path


class Checkpoints:
  def __init__(self, directory: str | pathlib.Path, keep: int = 3, keep_period: Optional[int] = None,
               asynchronous: bool = True):
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, keep_period=keep_period, create=True,
                                           enable_async_checkpointing=asynchronous)
    handlers = {'state': ocp.PyTreeCheckpointHandler(type_handler_registry=_type_handlers()),
                'data': ocp.JsonCheckpointHandler(), 'config': ocp.JsonCheckpointHandler()}
    self.manager = ocp.CheckpointManager(pathlib.Path(directory).absolute(), options=options,
                                         item_handlers=handlers)

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_state: dict, config: dict, force: bool = True) -> bool:
    return self.manager.save(step, force=force, args=ocp.args.Composite(
        state=ocp.args.PyTreeSave(state), data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(config)))

  def restore(self, abstract_state: Any, step: Optional[int] = None) -> tuple[Any, dict, int]:
    """(state, data state, step) of `step` (default: the newest), into `abstract_state`'s shardings."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'No checkpoint in {self.manager.directory}.')
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_state)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(abstract_state, restore_args=restore_args), data=ocp.args.JsonRestore()))
    return restored['state'], restored['data'], step

  def restore_config(self, step: Optional[int] = None) -> dict:
    step = self.latest_step() if step is None else step
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
  """The checkpoint of `step` (default: the newest) of a run (its workdir or checkpoints/ directory).

  The networks' shapes come from `config`, or from the config saved with the checkpoint.
  """
  directory = checkpoint_dir(path)
  missing = FileNotFoundError(f'No checkpoint in {directory}; train first or point --workdir at a run.')
  if not directory.is_dir():
    raise missing
  checkpoints = Checkpoints(directory, asynchronous=False)
  try:
    if checkpoints.latest_step() is None:
      raise missing
    if config is None:
      config = ConfigDict(checkpoints.restore_config(step))
    trainer = Trainer.from_config(config, steps_per_epoch=1)         # shapes only
    abstract = abstract_state(trainer.nets, trainer.tx, data_mesh())
    state, data_state, step = checkpoints.restore(abstract, step)
  finally:
    checkpoints.close()
  return RestoredRun(config, trainer, jax.device_get(state), data_state, step)

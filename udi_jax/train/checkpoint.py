"""Checkpoints under `workdir/checkpoints` (orbax): the train state, the input-iterator state, the config.

Every process calls save and restore (orbax coordinates multi-host writes of global arrays). Saves are
asynchronous; `wait` blocks until the last one is on disk. The newest checkpoint is where a run resumes.
"""

from __future__ import annotations

import pathlib
from typing import Any, Optional

import orbax.checkpoint as ocp

ITEMS = ('state', 'data', 'config')


class Checkpoints:
  def __init__(self, directory: str | pathlib.Path, keep: int = 3, keep_period: Optional[int] = None,
               asynchronous: bool = True):
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, keep_period=keep_period, create=True,
                                           enable_async_checkpointing=asynchronous)
    self.manager = ocp.CheckpointManager(pathlib.Path(directory).absolute(), options=options,
                                         item_names=ITEMS)

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: Any, data_state: dict, config: dict, force: bool = True) -> bool:
    return self.manager.save(step, force=force, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(config)))

  def restore(self, abstract_state: Any, step: Optional[int] = None) -> tuple[Any, dict, int]:
    """(state, data state, step) of `step` (default: the newest), into `abstract_state`'s shardings."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'No checkpoint in {self.manager.directory}.')
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return restored['state'], restored['data'], step

  def restore_config(self, step: Optional[int] = None) -> dict:
    step = self.latest_step() if step is None else step
    return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))['config']

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()

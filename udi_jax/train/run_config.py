"""The config a workdir's run was trained with (`WORKDIR/config.json`), and the refusal to resume that run
under a config that trains differently.

Resuming may change how a run is driven: its length (`epochs`, `max_steps`), logging, checkpointing,
evaluation, input workers and parallel mapping. It may not change what is trained: the model, the method,
the optimiser, the crops, the batch or the seed; such a resume would continue one run's state under another
run's schedules and losses without saying so.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

FILE = 'config.json'
# What may differ on a resume: sections and fields that drive the run but do not change what it trains.
DRIVING = ('epochs', 'max_steps', 'log_every_steps', 'checkpoint_every_steps', 'checkpoint_every_minutes',
           'keep_checkpoints', 'keep_every_epochs', 'init_from', 'parallel', 'eval', 'data.data_dir',
           'data.num_workers', 'data.num_threads', 'data.device_prefetch', 'data.crops_on', 'model.attention',
           'model.remat')
# Fields added to the configs after runs were saved without them, with the value those runs trained with.
LATER_FIELDS = {'udi.momentum_teacher_end': 1.0, 'checkpoint_every_minutes': 0.0,
                'data.rotation_degrees': 0.0, 'data.translate_fraction': 0.0}


def _leaves(tree: Any, prefix: str = '') -> dict[str, Any]:
  if isinstance(tree, dict):
    return {k: v for key, value in tree.items() for k, v in _leaves(value, f'{prefix}{key}.').items()}
  return {prefix[:-1]: tree}


def _driving(path: str) -> bool:
  return any(path == d or path.startswith(d + '.') for d in DRIVING)


def completed(saved: dict) -> dict:
  """A saved config with the fields added since (LATER_FIELDS) at the values its run trained with."""
  saved = json.loads(json.dumps(saved))
  for path, value in LATER_FIELDS.items():
    *parents, leaf = path.split('.')
    node = saved
    for part in parents:
      node = node.setdefault(part, {})
    node.setdefault(leaf, value)
  return saved


def differences(trained: dict, now: dict) -> list[str]:
  """'field: old -> new' for every field that changes what is trained."""
  old, new = _leaves(completed(trained)), _leaves(now)
  return [f'{path}: {old.get(path, "(absent)")!r} -> {new.get(path, "(absent)")!r}'
          for path in sorted(set(old) | set(new)) if not _driving(path) and old.get(path) != new.get(path)]


def refuse_a_different_config(workdir: pathlib.Path, now: dict) -> None:
  """Raises ValueError naming the fields that differ when the workdir's run was trained with another config."""
  path = workdir / FILE
  if not path.is_file():
    return
  try:
    trained = json.loads(path.read_text())
  except (OSError, ValueError):
    return                  # unreadable: the checkpoints alone decide (the file is rewritten below)
  changed = differences(trained, now)
  if changed:
    shown = '; '.join(changed[:6]) + (f'; and {len(changed) - 6} more' if len(changed) > 6 else '')
    raise ValueError(f'The run in {workdir} was trained with another config ({shown}); resume it with the '
                     'config it was trained with, or train this config in a new --workdir.')


def agreed_refusal(workdir: pathlib.Path, now: dict) -> None:
  """`refuse_a_different_config` on process 0, its verdict shared: every process raises, or none does."""
  failure = None
  if jax.process_index() == 0:
    try:
      refuse_a_different_config(workdir, now)
    except ValueError as e:
      failure = e
  if jax.process_count() > 1 and multihost_utils.broadcast_one_to_all(np.int32(failure is not None)):
    failure = failure or ValueError(f'Process 0 refused to resume the run in {workdir} under this config; '
                                    'see its output.')
  if failure is not None:
    raise failure


def write(workdir: pathlib.Path, config_dict: dict) -> None:
  (workdir / FILE).write_text(json.dumps(config_dict, indent=2))

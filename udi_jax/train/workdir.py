"""A training run's hold on its workdir: the directory is created and must be writable, and one run at a
time trains in it.

The holder is recorded in `WORKDIR/run.lock` (host, pid, start time, command), created atomically and
removed when the run ends, however it ends short of a SIGKILL. A second run finds the file and is refused
with a sentence naming the holder. A lock left by a SIGKILL or a crash is stale when its process is gone
on this host (or the pid now belongs to a process started later): it is taken over with a warning. A lock
from another host cannot be checked from here; if that run is gone, delete the file. On a multi-host run
process 0 takes the lock and every process learns whether it got it.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import socket
import sys
import time
from typing import Iterator, Optional

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from udi_jax.errors import UserError

LOCK_FILE = 'run.lock'


def _process_start(pid: int) -> Optional[str]:
  """The start time of a process (Linux /proc, in clock ticks since boot), or None where unknown."""
  try:
    return pathlib.Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _this_process() -> dict:
  return {'host': socket.gethostname(), 'pid': os.getpid(), 'process_start': _process_start(os.getpid()),
          'started': time.strftime('%Y-%m-%d %H:%M:%S'), 'command': ' '.join(sys.argv)}


def _running(holder: dict) -> bool:
  """Whether the process that wrote a lock may still run (a lock from another host: assumed so)."""
  if holder.get('host') != socket.gethostname() or not isinstance(holder.get('pid'), int):
    return True
  try:
    os.kill(holder['pid'], 0)
  except ProcessLookupError:
    return False
  except PermissionError:           # another user's process
    return True
  started = _process_start(holder['pid'])
  return holder.get('process_start') is None or started is None or started == holder['process_start']


def _writable(workdir: pathlib.Path) -> None:
  """Creates the workdir, or says in one sentence why it cannot be a workdir."""
  try:
    workdir.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    blocking = next((p for p in [workdir, *workdir.parents] if p.exists() and not p.is_dir()), None)
    if blocking is not None:
      raise UserError(f'The workdir {workdir} cannot be created: {blocking} is a file, not a directory; '
                      'choose another --workdir.') from e
    raise UserError(f'The workdir {workdir} cannot be created ({e.strerror}); choose a --workdir where you '
                    'can write.') from e


def _take(lock: pathlib.Path) -> None:
  """Creates the lock file, taking over a stale one; UserError if a running process holds it."""
  workdir = lock.parent
  for _ in range(3):               # a stale lock removed by a rival in between: try again
    try:
      fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      try:
        holder = json.loads(lock.read_text())
      except (OSError, ValueError):
        holder = {}
      if _running(holder):
        raise UserError(
            f'The workdir {workdir} is in use by another run (process {holder.get("pid", "?")} on host '
            f'{holder.get("host", "?")}, started {holder.get("started", "at an unknown time")}); wait for it, '
            f'choose another --workdir, or, if that run is gone, delete {lock}.') from None
      logging.warning('Taking over the stale lock %s of process %s on %s, which is no longer running.',
                      lock, holder.get('pid'), holder.get('host'))
      lock.unlink(missing_ok=True)
      continue
    except OSError as e:
      raise UserError(f'The workdir {workdir} is not writable ({e.strerror}); choose a --workdir where you '
                      'can write.') from e
    with os.fdopen(fd, 'w') as f:
      json.dump(_this_process(), f)
    return
  raise UserError(f'The workdir {workdir} is being claimed by another run; try again, or choose another '
                  '--workdir.')


def _release(lock: pathlib.Path) -> None:
  try:
    if json.loads(lock.read_text()).get('pid') == os.getpid():
      lock.unlink()
  except (OSError, ValueError):
    pass


@contextlib.contextmanager
def held_workdir(workdir: str | pathlib.Path) -> Iterator[pathlib.Path]:
  """The workdir, created and locked for this run while the context lasts (UserError if it cannot be)."""
  workdir = pathlib.Path(workdir)
  lock = workdir / LOCK_FILE
  refusal = None
  if jax.process_index() == 0:
    try:
      _writable(workdir)
      _take(lock)
    except UserError as e:
      refusal = e
  if jax.process_count() > 1:      # every process stops if process 0 did not get the workdir
    refused_on_0 = multihost_utils.broadcast_one_to_all(np.int32(refusal is not None))
    if refused_on_0 and refusal is None:
      refusal = UserError(f'Process 0 could not claim the workdir {workdir}; see its output.')
  if refusal is not None:
    raise refusal
  workdir.mkdir(parents=True, exist_ok=True)     # on the other processes
  try:
    yield workdir
  finally:
    if jax.process_index() == 0:
      _release(lock)

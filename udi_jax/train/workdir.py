"""A training run's hold on its workdir: the directory is created and must be writable, and one run at a
time trains in it.

The hold is an exclusive `flock` on `WORKDIR/run.lock`, kept on an open descriptor for the whole run: the
kernel releases it when the process ends, however it ends (a SIGKILL included), and two runs can never
both hold it. The file also records the holder (host, pid, start time, command) for the messages. A
second run is refused with a sentence naming the holder; a file whose lock nobody holds is left from a
run that is gone, and is taken over with a warning. A file written on another host is assumed to be held
(a shared file system may not carry locks between hosts): if that run is gone, delete the file. On a
multi-host run process 0 takes the lock, and every process learns whether it got it, whatever stopped it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pathlib
import socket
import sys
import time
from typing import Iterator

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from udi_jax.errors import UserError

LOCK_FILE = 'run.lock'


def _this_process() -> dict:
  return {'host': socket.gethostname(), 'pid': os.getpid(), 'started': time.strftime('%Y-%m-%d %H:%M:%S'),
          'command': ' '.join(sys.argv)}


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


def _read_holder(fd: int) -> dict:
  """The holder recorded in an open lock file ({} if empty or unreadable)."""
  try:
    os.lseek(fd, 0, os.SEEK_SET)
    return json.loads(os.read(fd, 1 << 16) or b'{}')
  except (OSError, ValueError):
    return {}


def _in_use(lock: pathlib.Path, holder: dict) -> UserError:
  return UserError(
      f'The workdir {lock.parent} is in use by another run (process {holder.get("pid", "?")} on host '
      f'{holder.get("host", "?")}, started {holder.get("started", "at an unknown time")}); wait for it, '
      f'choose another --workdir, or, if that run is gone, delete {lock}.')


def _take(lock: pathlib.Path) -> int:
  """Holds the lock file (an exclusive `flock` on an open descriptor, which dies with the process) and
  records this process in it; returns the descriptor. UserError if a running process holds it.

  The claim is the kernel's lock, so two runs that find the same stale file cannot both win: one gets the
  lock, the other is refused. The holder's record only words the messages, and keeps the one case flock
  cannot see: a lock file from another host (a shared file system may not carry locks across hosts), which
  is assumed running.
  """
  for _ in range(3):               # the lock file removed by its holder in between: open it again
    try:
      fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
    except OSError as e:
      raise UserError(f'The workdir {lock.parent} is not writable ({e.strerror}); choose a --workdir where you '
                      'can write.') from e
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _read_holder(fd)
      os.close(fd)
      raise _in_use(lock, holder) from None
    try:
      same_file = os.stat(lock).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
      same_file = False
    if not same_file:
      os.close(fd)
      continue
    holder = _read_holder(fd)
    if holder and holder.get('host') != socket.gethostname():
      os.close(fd)
      raise _in_use(lock, holder)
    if holder:
      logging.warning('Taking over the stale lock %s of process %s on %s, which is no longer running.',
                      lock, holder.get('pid'), holder.get('host'))
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps(_this_process()).encode())
    return fd
  raise UserError(f'The workdir {lock.parent} is being claimed by another run; try again, or choose another '
                  '--workdir.')


def _release(lock: pathlib.Path, fd: int) -> None:
  """Removes the lock file while still holding it (a rival that opened it finds it gone, above), then lets
  it go."""
  try:
    if os.stat(lock).st_ino == os.fstat(fd).st_ino:
      lock.unlink()
  except OSError:
    pass
  os.close(fd)


@contextlib.contextmanager
def held_workdir(workdir: str | pathlib.Path) -> Iterator[pathlib.Path]:
  """The workdir, created and locked for this run while the context lasts (UserError if it cannot be)."""
  workdir = pathlib.Path(workdir)
  lock = workdir / LOCK_FILE
  failure, fd = None, None
  if jax.process_index() == 0:
    try:
      _writable(workdir)
      fd = _take(lock)
    except Exception as e:         # pylint: disable=broad-except  (whatever it is, the others must hear of it)
      failure = e
  if jax.process_count() > 1:      # every process stops if process 0 did not get the workdir
    failed_on_0 = multihost_utils.broadcast_one_to_all(np.int32(failure is not None))
    if failed_on_0 and failure is None:
      failure = UserError(f'Process 0 could not claim the workdir {workdir}; see its output.')
  if failure is not None:
    raise failure
  workdir.mkdir(parents=True, exist_ok=True)     # on the other processes
  try:
    yield workdir
  finally:
    if fd is not None:
      _release(lock, fd)

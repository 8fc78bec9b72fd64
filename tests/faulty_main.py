"""`python -m tests.faulty_main FAULT [udi_jax.main flags]`: `udi_jax.main` with one fault injected, for
the multi-host tests (a fault that no config can cause, on one process only).

- `lock_error`: process 0 meets an error that is not the user's (a PermissionError) while it takes the
  workdir's lock.
- `restore_error_on_1`: reading the state's arrays fails on process 1 alone.
"""

import sys

import jax
from absl import app

from udi_jax import main as entry
from udi_jax.train import checkpoint, workdir

FAULTS = ('lock_error', 'restore_error_on_1')


def inject(fault: str) -> None:
  if fault == 'lock_error':
    def take(lock):
      raise PermissionError(13, 'Permission denied (injected)', str(lock))
    workdir._take = take             # called on process 0 only
  elif fault == 'restore_error_on_1':
    real = checkpoint.ocp.PyTreeCheckpointHandler.restore

    def restore(self, *args, **kwargs):         # where a read of the arrays fails
      if jax.process_index() == 1:
        raise ValueError('injected read failure')
      return real(self, *args, **kwargs)
    checkpoint.ocp.PyTreeCheckpointHandler.restore = restore
  else:
    raise SystemExit(f'Unknown fault {fault!r}; use one of {FAULTS}.')


if __name__ == '__main__':
  inject(sys.argv.pop(1))
  app.run(entry.main, flags_parser=entry.parse_flags)

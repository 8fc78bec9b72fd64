"""What a command tells its user, on one channel: `say` prints a line on process 0's standard output;
warnings go through absl's `logging.warning` (standard error). `--verbosity=-2` (errors only) silences
both; absl's INFO chatter of the libraries (orbax, clu) is off unless `--verbosity=0` is given.
"""

from __future__ import annotations

import jax
from absl import logging


def say(message: str) -> None:
  """Prints `message` on process 0, unless the user turned messages down below warnings."""
  if jax.process_index() == 0 and logging.get_verbosity() >= logging.WARNING:
    print(message, flush=True)

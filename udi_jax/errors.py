"""Errors a user can cause, reported as one sentence (STYLE: "Errors a user can cause ... produce one
clear sentence that names the thing and the fix").

`UserError` is anything the user gave that cannot work: a config value, a path, a file, a workdir that
another run holds. `main` prints its sentence and exits with code 2, without a traceback. Settings classes
refuse their own bad values with a `ValueError` in their `from_config`; the entry points build them
inside `config_errors()`, which turns that sentence into a `ConfigError`, so `main` can print it before
anything runs.
"""

from __future__ import annotations

import contextlib


class UserError(Exception):
  """Something the user gave that cannot work; the message is one sentence naming it and the fix."""
  label = 'Error'


class ConfigError(UserError, ValueError):
  """A config value that cannot work."""
  label = 'Config error'


@contextlib.contextmanager
def config_errors():
  """Re-raises a ValueError of the settings being built as a ConfigError with the same sentence."""
  try:
    yield
  except ConfigError:
    raise
  except ValueError as e:
    raise ConfigError(str(e)) from e

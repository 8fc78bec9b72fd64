"""Errors a user can cause with a config value, reported as one sentence (STYLE: "Errors a user can
cause ... produce one clear sentence that names the thing and the fix").

Settings classes refuse their own bad values with a `ValueError` in their `from_config`; the entry points
build them inside `config_errors()`, which turns that sentence into a `ConfigError`, so `main` can print it
and exit with code 2 before anything runs.
"""

from __future__ import annotations

import contextlib


class ConfigError(ValueError):
  """A config value that cannot work."""


@contextlib.contextmanager
def config_errors():
  """Re-raises a ValueError of the settings being built as a ConfigError with the same sentence."""
  try:
    yield
  except ConfigError:
    raise
  except ValueError as e:
    raise ConfigError(str(e)) from e

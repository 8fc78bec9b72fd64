"""The golden data of the official code for the tests (docs/design.md, contract 10): where it lives, and
`udi_jax.parity`'s loaders bound to that place.

The directory is `UDI_GOLDEN_DIR`, by default `../shared/golden` beside the repository. When it is
missing, tests that need it skip on a user's machine and FAIL when the `CI` variable is set.
"""

from __future__ import annotations

import os
import pathlib

import pytest

from udi_jax import parity
from udi_jax.parity import COMPONENTS, small_config  # noqa: F401  (the tests' names for them)

REPO = pathlib.Path(__file__).resolve().parents[1]


def golden_dir() -> pathlib.Path:
  path = pathlib.Path(os.environ.get('UDI_GOLDEN_DIR', REPO.parent / 'shared' / 'golden'))
  if not (path / parity.MARKER).exists():
    message = f'golden data not found in {path}: set UDI_GOLDEN_DIR to the folder holding {parity.MARKER}'
    if os.environ.get('CI'):
      pytest.fail(message)
    pytest.skip(message)
  return path


def load(name: str) -> dict:
  return parity.load(golden_dir(), name)


def load_json(name: str) -> dict:
  return parity.load_json(golden_dir(), name)


def one_step_case() -> dict:
  return parity.one_step_case(golden_dir())


def one_step(case: dict):
  return parity.one_step(case)

"""The evaluation protocols: one module each, found here by name (the names of config.eval.protocols).

A protocol module defines
  NAME                         its name; its settings are the section config.eval.<NAME>
  check(config)                refuses bad values of its section in one sentence, before anything runs
  run(ctx) -> dict             its results on the network of an `EvalContext` (JSON-ready)
  headline(config, results)    {column: cell}: what the report's table shows of it
and may define
  feature_kinds(ctx)           the class-token features it reads (`ctx.features`): extracted once, in one
                               pass per split, for all the protocols of an evaluation
  probe(config)                cheap checks that its data can be opened, before a run trains
  scorer(ctx)                  a dense protocol's (token scores, about): every dense protocol of an evaluation
                               is scored in one pass over the whole validation images (`dense_protocols.py`)
Adding a protocol is adding a module here and its section to the configs.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

REQUIRED = ('NAME', 'check', 'run', 'headline')


def _discovered() -> dict[str, ModuleType]:
  found = {}
  for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
    module = importlib.import_module(f'{__name__}.{info.name}')
    missing = [a for a in REQUIRED if not hasattr(module, a)]
    if missing:
      raise TypeError(f'The evaluation protocol {module.__name__} lacks {missing}; see {__name__}.')
    found[module.NAME] = module
  return found


REGISTRY: dict[str, ModuleType] = _discovered()
NAMES: tuple[str, ...] = tuple(REGISTRY)

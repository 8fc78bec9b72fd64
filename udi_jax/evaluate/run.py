"""Evaluation of a network: the protocols of `protocols/` chosen by name, on one `EvalContext`.

`config.eval` chooses the splits, the network (teacher by default), the feature tokens and the protocols;
each protocol takes its settings from its own section, config.eval.<name> (docs/evaluation.md). Results go
to `workdir/eval/<name>.json`; pictures to `workdir/pictures/`; the report's tables are `report.py`'s.
"""

from __future__ import annotations

import json
import pathlib
import time
from typing import Any, Optional, Sequence

import jax

from udi_jax.data.sources import check_spec, probe_source
from udi_jax.evaluate import features
from udi_jax.evaluate.context import EvalContext
from udi_jax.evaluate.protocols import NAMES, REGISTRY
from udi_jax.evaluate.protocols import diagnostics as diagnostics_protocol
from udi_jax.models.networks import Networks

NETWORKS = ('teacher', 'student')


def check_config(config) -> None:
  """Refuses unknown `config.eval` values (network, tokens, protocols, splits, each protocol's section)
  with one sentence."""
  ev = config.eval
  if ev.network not in NETWORKS:
    raise ValueError(f'config.eval.network={ev.network!r} is not known; use one of {NETWORKS}.')
  unknown = [t for t in ev.tokens if t not in features.TOKEN_KINDS]
  if unknown or not ev.tokens:
    raise ValueError(f'config.eval.tokens holds {list(unknown or ev.tokens)}; choose from {features.TOKEN_KINDS}.')
  unknown = [p for p in ev.protocols if p not in REGISTRY]
  if unknown:
    raise ValueError(f'config.eval.protocols holds {unknown}; choose from {NAMES}.')
  if not ev.resize_ratio >= 1.0:
    raise ValueError(f'config.eval.resize_ratio={ev.resize_ratio} must be at least 1 (256/224 in the official '
                     'protocol; 1.0 keeps the images at the crop size).')
  for field in ('train_source', 'test_source'):
    if ev[field]:
      check_spec(ev[field], f'config.eval.{field}')
  for name, protocol in REGISTRY.items():
    if name not in ev:
      raise ValueError(f'config.eval has no section {name!r} for the {name} protocol; add config.eval.{name} '
                       'with its settings (configs/vits16.py has a section per protocol).')
    protocol.check(config)


def probe_sources(config) -> None:
  """Refuses, before a run trains, evaluation sources that it would fail to open at its k-NN or report
  (checked cheaply: nothing is read, an image folder is not walked)."""
  ev = config.eval
  if not ev.train_source or not ev.test_source:
    raise ValueError('config.eval.train_source and config.eval.test_source must name the splits to '
                     'evaluate on, e.g. mnist5k:train and mnist5k:test (or set config.eval.report=False and '
                     'config.eval.knn_every_epochs=0).')
  for field in ('train_source', 'test_source'):
    probe_source(ev[field], config.data.data_dir or None, f'config.eval.{field}')
  probes = {getattr(p, 'probe') for p in REGISTRY.values() if hasattr(p, 'probe')}
  for probe in probes:
    probe(config)


def evaluated_network(config, state) -> dict:
  """The params `config.eval.network` names, of a TrainState."""
  return state.teacher if config.eval.network == 'teacher' else state.student


def context(config, nets: Networks, params: dict, centres: Optional[dict] = None,
            names: Sequence[str] = ()) -> EvalContext:
  """A context for the protocols `names` on one network's params (its run's `centres`, None at init)."""
  scorers = {n: REGISTRY[n].scorer for n in names if hasattr(REGISTRY[n], 'scorer')}
  return EvalContext(config, nets, params, centres, dense_scorers=scorers)


def results(ctx: EvalContext, names: Sequence[str]) -> dict[str, Any]:
  """{name: results} of the protocols `names` on the context's network, the features they read extracted
  first, once per split."""
  unknown = [n for n in names if n not in REGISTRY]
  if unknown:
    raise ValueError(f'Unknown evaluation protocols {unknown}; choose from {NAMES}.')
  kinds = tuple(dict.fromkeys(k for n in names if hasattr(REGISTRY[n], 'feature_kinds')
                              for k in REGISTRY[n].feature_kinds(ctx)))
  if kinds:
    for split in ('train', 'test'):
      ctx.features(split, kinds)
  return {n: REGISTRY[n].run(ctx) for n in names}


def evaluate(config, nets: Networks, params: dict, workdir: pathlib.Path, name: str,
             protocols: Sequence[str] = NAMES, centres: Optional[dict] = None) -> dict[str, Any]:
  """Runs the protocols on one network's params (with the run's `centres` for the diagnostics); writes
  eval/<name>.json; returns the results."""
  ctx = context(config, nets, params, centres, protocols)
  train, test = ctx.splits()
  found: dict[str, Any] = {'network': config.eval.network, 'train_source': config.eval.train_source,
                           'test_source': config.eval.test_source, 'train_examples': len(train),
                           'test_examples': len(test)}
  started = time.time()
  found.update(results(ctx, protocols))
  found['seconds'] = round(time.time() - started, 1)
  write_json(workdir / 'eval' / f'{name}.json', found)
  return found


def during_training(config, nets: Networks, state) -> tuple[dict[str, Any], dict[str, float]]:
  """k-NN of the evaluated network of a TrainState, per token (`config.eval.knn_every_epochs`), and with
  'diagnostics' in config.eval.protocols the diagnostics' scalars as {'diag/...': value}."""
  names = ('knn',) + (('diagnostics',) if 'diagnostics' in config.eval.protocols else ())
  found = results(context(config, nets, evaluated_network(config, state), state.centres, names), names)
  return found['knn'], diagnostics_protocol.scalars(found['diagnostics']) if len(names) > 1 else {}


def write_json(path: pathlib.Path, payload: dict):
  if jax.process_index() != 0:
    return
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(payload, indent=2, default=float))

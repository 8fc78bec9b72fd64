r"""Ablation sweeps: `python -m udi_jax.sweep --config=configs/demo.py --grid='alpha=0,0.5,1;seed=0,1'`.

`--grid` is `field=v1,v2;field=v1,v2` (the Cartesian product); several products joined by `|` are run
as a union, e.g. one factor at a time around the defaults:
`--grid='seed=0,1;alpha=0,0.5,1 | seed=0,1;sampling=fixed,uniform'`. A field is a dotted config path
(`udi.alpha`) or a unique leaf name (`alpha`); values are parsed to the field's type.

Each point trains into `SWEEP/points/<name>/` (resuming from its checkpoints if interrupted), is evaluated
(`config.eval.tokens` k-NN on the test split, the linear probe, and with `config.eval.dense.source` the dense
linear and k-NN mIoU), and writes `result.json`; finished
points are skipped when the sweep is run again. Then `SWEEP/table.csv`, `table.md` (mean and standard
deviation over seeds) and `plot.png` (every column per setting) are written. Points run
sequentially here; on a cluster run one `--only=NAME` per job through the launchers.
"""

from __future__ import annotations

import csv
import itertools
import json
import pathlib
import statistics
import sys
import time
from typing import Any

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from udi_jax.say import say

FLAGS = flags.FLAGS
# The columns of the table, where every point has them (the dense ones with config.eval.dense.source).
METRICS = {'knn_top1': 'k-NN top-1 %', 'linear_top1': 'linear top-1 %', 'dense_linear_miou': 'dense linear mIoU %',
           'dense_knn_miou': 'dense k-NN mIoU %'}


def _leaf_paths(config, prefix=''):
  for key, value in config.items():
    path = f'{prefix}{key}'
    if hasattr(value, 'items'):
      yield from _leaf_paths(value, path + '.')
    else:
      yield path


def resolve_field(config, name: str) -> str:
  """A dotted path, or the unique path it ends (a leaf name: alpha; or linear.lr) -> the dotted path."""
  paths = list(_leaf_paths(config))
  if name in paths:
    return name
  matches = [p for p in paths if p.endswith('.' + name)]
  if len(matches) == 1:
    return matches[0]
  if not matches:
    raise ValueError(f'--grid names {name!r}, which is no config field; use a dotted path like udi.alpha.')
  raise ValueError(f'--grid name {name!r} is ambiguous ({", ".join(matches)}); use the dotted path.')


def _get(config, path: str):
  for part in path.split('.'):
    config = config[part]
  return config


def _parse(value: str, like: Any):
  if isinstance(like, bool):
    if value.lower() not in ('true', 'false', '1', '0'):
      raise ValueError(f'{value!r} is not a boolean; write true or false.')
    return value.lower() in ('true', '1')
  if isinstance(like, int):
    return int(value)
  if isinstance(like, float):
    return float(value)
  if isinstance(like, tuple):
    return tuple(type(like[0])(v) for v in value.strip('()').split('/'))
  return value


def parse_grid(grid: str, config) -> list[dict[str, Any]]:
  """The points of the grid, each {dotted path: value}, in order, without duplicates."""
  points, seen = [], set()
  for product in grid.split('|'):
    axes = []
    for item in filter(None, (s.strip() for s in product.split(';'))):
      if '=' not in item:
        raise ValueError(f'--grid item {item!r} is not field=v1,v2.')
      name, values = item.split('=', 1)
      path = resolve_field(config, name.strip())
      like = _get(config, path)
      axes.append([(path, _parse(v.strip(), like)) for v in values.split(',') if v.strip()])
    for combo in itertools.product(*axes):
      point = dict(combo)
      key = point_name(point)
      if key not in seen:
        seen.add(key)
        points.append(point)
  if not points:
    raise ValueError('--grid is empty; write e.g. --grid="alpha=0,0.5;seed=0,1".')
  return points


def point_name(point: dict[str, Any]) -> str:
  """'alpha=0.5,linear.lr=0.02' for {'udi.alpha': 0.5, 'eval.linear.lr': 0.02}: the path less its section."""
  return ','.join(f'{k.split(".", 1)[-1]}={v}' for k, v in point.items()) or 'default'


def apply(config, point: dict[str, Any]):
  config = config.copy_and_resolve_references()
  for path, value in point.items():
    *parents, leaf = path.split('.')
    node = config
    for part in parents:
      node = node[part]
    node[leaf] = value
  # The DINO baseline has one class token (docs/method.md §9): follow include_patch unless set explicitly.
  if not config.udi.include_patch and 'model.num_cls_tokens' not in point:
    config.model.num_cls_tokens = 1
  return config


def run_point(config, point: dict[str, Any], directory: pathlib.Path) -> dict[str, Any]:
  from udi_jax.evaluate import run as evaluation
  from udi_jax.evaluate.context import token_kinds
  from udi_jax.evaluate.protocols import knn as knn_protocol
  from udi_jax.train.loop import train_and_evaluate
  result_path = directory / 'result.json'
  if result_path.exists():
    return json.loads(result_path.read_text())
  config = apply(config, point)
  config.eval.report = False
  started = time.time()
  trained = train_and_evaluate(config, str(directory))
  nets = trained.trainer.nets
  network = jax.device_get(evaluation.evaluated_network(config, trained.state))
  dense = ('dense_linear', 'dense_knn') if config.eval.dense.source else ()
  results = evaluation.evaluate(config, nets, network, directory, 'final', protocols=('knn', 'linear') + dense,
                                centres=jax.device_get(trained.state.centres))
  k = knn_protocol.reported_k(config)
  token = token_kinds(config, nets)[0]
  probe = next(iter(results['linear'].values()))       # the first of config.eval.linear.features
  result = {'name': point_name(point), 'point': dict(point), 'knn_top1': results['knn'][token][f'top1@{k}'],
            'knn_token': token, 'k': k, 'linear_top1': probe['top1'], 'linear_best_top1': probe['best_top1'],
            'minutes': round((time.time() - started) / 60, 2)}
  result.update({f'{p}_miou': results[p]['miou'] for p in dense})
  if jax.process_index() == 0:
    result_path.write_text(json.dumps(result, indent=2))
  return result


def summarise(results: list[dict[str, Any]], directory: pathlib.Path) -> str:
  """table.csv (every point), table.md (mean and sd over seeds per setting), plot.png."""
  metrics = [m for m in METRICS if all(m in r for r in results)]
  with open(directory / 'table.csv', 'w', newline='') as f:
    point_fields = sorted({k for r in results for k in r['point']})
    writer = csv.DictWriter(f, fieldnames=point_fields + metrics + ['minutes'])
    writer.writeheader()
    for r in results:
      writer.writerow({**{k: r['point'].get(k, '') for k in point_fields}, **{m: r[m] for m in metrics},
                       'minutes': r['minutes']})
  groups: dict[str, list] = {}
  for r in results:
    setting = point_name({k: v for k, v in r['point'].items() if k != 'seed'})
    groups.setdefault(setting, []).append(r)
  sd = lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0
  lines = ['| setting | seeds | ' + ' | '.join(METRICS[m] for m in metrics) + ' |', '|---|---|' + '---|' * len(metrics)]
  rows = []
  for setting, members in groups.items():
    values = [[m[metric] for m in members] for metric in metrics]
    rows.append((setting, [(statistics.mean(v), sd(v)) for v in values]))
    lines.append(f'| {setting} | {len(members)} | ' +
                 ' | '.join(f'{statistics.mean(v):.1f} ± {sd(v):.1f}' for v in values) + ' |')
  table = '\n'.join(lines)
  (directory / 'table.md').write_text(table + '\n')
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(rows)), 3.5))
  x = range(len(rows))
  for j, (metric, marker) in enumerate(zip(metrics, 'os^v')):
    offset = 0.2 * (j - (len(metrics) - 1) / 2)
    ax.errorbar([i + offset for i in x], [r[1][j][0] for r in rows], yerr=[r[1][j][1] for r in rows],
                fmt=marker, label=METRICS[metric].replace(' %', ''))
  ax.set_xticks(list(x))
  ax.set_xticklabels([r[0] for r in rows], rotation=30, ha='right', fontsize=7)
  ax.set_ylabel('%')
  ax.legend()
  fig.tight_layout()
  fig.savefig(directory / 'plot.png', dpi=110)
  plt.close(fig)
  return table


def sweep(config, grid: str, directory: str | pathlib.Path, only: str = '') -> str:
  directory = pathlib.Path(directory)
  points = parse_grid(grid, config)
  if only:
    points = [p for p in points if point_name(p) == only]
    if not points:
      raise ValueError(f'--only={only} is not a point of the grid.')
  # Every point is checked before the first one trains, so a bad value cannot stop a sweep half-way.
  from udi_jax.train.loop import check_config
  for point in points:
    try:
      check_config(apply(config, point), jax.device_count(), jax.process_count())
    except ValueError as e:
      raise ValueError(f'point {point_name(point)}: {e}') from e
  results = []
  for i, point in enumerate(points):
    name = point_name(point)
    done = (directory / 'points' / name / 'result.json').exists()
    say(f'[{i + 1}/{len(points)}] {name}' + (' (done, skipped)' if done else ''))
    results.append(run_point(config, point, directory / 'points' / name))
  if only or jax.process_index() != 0:      # one job of many: the run without --only tabulates
    return ''
  table = summarise(results, directory)
  say(table)
  say(f'Sweep results: {directory / "table.md"}, {directory / "table.csv"}, {directory / "plot.png"}')
  return table


def _define_flags():
  config_flags.DEFINE_config_file('config', None, 'Base config, e.g. configs/demo.py.', lock_config=False)
  flags.DEFINE_string('grid', None, "The points, e.g. 'alpha=0,0.5;seed=0,1' (see the module docstring).")
  flags.DEFINE_string('workdir', None, 'The sweep directory (default runs/sweep_<config name>).')
  flags.DEFINE_string('only', '', 'Run only this point (one job per point on a cluster).')


def main(argv):
  del argv
  if FLAGS.config is None or not FLAGS.grid:
    raise app.UsageError('--config and --grid are required.')
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  name = pathlib.Path(config_flags.get_config_filename(FLAGS['config']).partition(':')[0]).stem
  try:
    sweep(FLAGS.config, FLAGS.grid, FLAGS.workdir or f'runs/sweep_{name}', FLAGS.only)
  except ValueError as e:
    print(f'Sweep error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  _define_flags()
  app.run(main)

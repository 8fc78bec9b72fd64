r"""The demo recipes tried, each trained and measured: `python benchmarks/demo_recipes.py [--only=NAME,...]`.

Each recipe is `configs/demo.py` with a few overrides (RECIPES, in the order they were tried). A recipe
trains into `WORKDIR/<name>/`, then the k-NN top-1 (k = 20, the demo's protocol: test split against the
training split, 28-px digits at their own size) of the teacher's `cls`, `cls_plus` and `concat` features
is measured at initialisation and after training, with the last logged teacher entropy per level. A
finished recipe is not trained again. The table (`WORKDIR/recipes.md`, also printed) is the one in
benchmarks/RESULTS.md ("Demo recipes"). `train min` is the wall time of `train_and_evaluate` (compilation
and checkpoints included), not the k-NN afterwards.
"""

from __future__ import annotations

import json
import pathlib
import sys
import time

from absl import app, flags, logging

REPO = pathlib.Path(__file__).resolve().parents[1]

flags.DEFINE_string('only', '', 'Comma-separated recipe names (default: all).')
flags.DEFINE_string('workdir', 'runs/demo_recipes', 'Where the recipes train.')
flags.DEFINE_string('seeds', '0', 'Comma-separated seeds.')
FLAGS = flags.FLAGS

# The searched fields at their values before this search (configs/demo.py at f338f6e); every recipe sets
# all of them, so each stays what it was whatever configs/demo.py says now.
BASE = {'optim.lr': 2e-3, 'optim.min_lr': 1e-5, 'log_every_steps': 62, 'udi.teacher_temp': 0.04,
        'udi.warmup_teacher_temp': 0.04,
        'udi.warmup_teacher_temp_epochs': 0, 'udi.momentum_teacher': 0.99, 'model.out_dim': 1024,
        'data.local_scale': (0.05, 0.25), 'data.global_scale': (0.25, 1.0), 'udi.include_patch': True,
        'model.num_cls_tokens': 2, 'data.blur_radius': (0.1, 2.0), 'data.augment': True,
        'model.norm_last_layer': False, 'model.depth': 4, 'epochs': 20, 'batch_size': 64, 'data.flip_prob': 0.5,
        'eval.knn_every_epochs': 0}
DINO = {'udi.include_patch': False, 'model.num_cls_tokens': 1}     # the DINO baseline (docs/method.md §9)

# name -> (what changes, overrides of BASE), in the order they were tried.
RECIPES = {
    'before': ('the demo before this search', {}),
    'tt02': ('teacher temperature 0.02', {'udi.teacher_temp': 0.02, 'udi.warmup_teacher_temp': 0.02}),
    'tt02_lr05': ('T_t 0.02, lr 5e-4 per 256 (the released recipe\'s)',
                  {'udi.teacher_temp': 0.02, 'udi.warmup_teacher_temp': 0.02, 'optim.lr': 5e-4}),
    'tt02_blur': ('T_t 0.02, blur radius (0.1, 0.5): the official (0.1, 2) px is for 224-px images',
                  {'udi.teacher_temp': 0.02, 'udi.warmup_teacher_temp': 0.02, 'data.blur_radius': (0.1, 0.5)}),
    'tt02_noaug': ('T_t 0.02, no photometric augmentation (crops and flips only)',
                   {'udi.teacher_temp': 0.02, 'udi.warmup_teacher_temp': 0.02, 'data.augment': False}),
    'tt02_crops': ('T_t 0.02, larger crops: global (0.4, 1), local (0.15, 0.4)',
                   {'udi.teacher_temp': 0.02, 'udi.warmup_teacher_temp': 0.02, 'data.global_scale': (0.4, 1.0),
                    'data.local_scale': (0.15, 0.4)}),
    'tt02_lr8': ('T_t 0.02, lr 8e-3 per 256 (peak 2e-3)',
                 {'udi.teacher_temp': 0.02, 'udi.warmup_teacher_temp': 0.02, 'optim.lr': 8e-3}),
    'tt01': ('teacher temperature 0.01', {'udi.teacher_temp': 0.01, 'udi.warmup_teacher_temp': 0.01}),
    'tt02_nll': ('T_t 0.02, weight-normalised last layer fixed (model.norm_last_layer)',
                 {'udi.teacher_temp': 0.02, 'udi.warmup_teacher_temp': 0.02, 'model.norm_last_layer': True}),
    'tt02_k256': ('T_t 0.02, K = 256 prototypes',
                  {'udi.teacher_temp': 0.02, 'udi.warmup_teacher_temp': 0.02, 'model.out_dim': 256}),
    'tt02_ema996': ('T_t 0.02, EMA 0.996',
                    {'udi.teacher_temp': 0.02, 'udi.warmup_teacher_temp': 0.02, 'udi.momentum_teacher': 0.996}),
    'tt02_depth2_e40': ('T_t 0.02, 2 blocks for 40 epochs (about the same time)',
                        {'udi.teacher_temp': 0.02, 'udi.warmup_teacher_temp': 0.02, 'model.depth': 2, 'epochs': 40}),
    # Digits are not mirror-symmetric (run after the others; level with tt02_ema996 on seed 0).
    'tt02_ema996_noflip': ('T_t 0.02, EMA 0.996, no horizontal flips (a flipped digit is another shape)',
                           {'udi.teacher_temp': 0.02, 'udi.warmup_teacher_temp': 0.02, 'udi.momentum_teacher': 0.996,
                            'data.flip_prob': 0.0}),
    'dino_tt02_ema996': ('plain DINO (1 token, no patch branch) with T_t 0.02, EMA 0.996',
                         {'udi.teacher_temp': 0.02, 'udi.warmup_teacher_temp': 0.02, 'udi.momentum_teacher': 0.996,
                          **DINO}),
}


def apply(config, overrides: dict):
  for path, value in overrides.items():
    node = config
    *parents, leaf = path.split('.')
    for part in parents:
      node = node[part]
    node[leaf] = value
  return config


def run(name: str, seed: int, root: pathlib.Path) -> dict:
  import jax

  from configs import demo
  from udi_jax.evaluate import run as evaluation
  from udi_jax.evaluate.protocols import knn as knn_protocol
  from udi_jax.train.loop import train_and_evaluate
  directory = root / f'{name}_seed{seed}'
  result_path = directory / 'result.json'
  if result_path.exists():
    return json.loads(result_path.read_text())
  config = apply(demo.get_config(), {**BASE, **RECIPES[name][1]})
  config.seed, config.eval.report = seed, False
  started = time.time()
  trained = train_and_evaluate(config, directory)
  minutes = (time.time() - started) / 60
  nets = trained.trainer.nets
  init = jax.device_get(jax.jit(nets.init)(jax.random.key(config.seed)))
  k = knn_protocol.reported_k(config)
  top1 = lambda params: {t: r[f'top1@{k}'] for t, r in evaluation.results(
      evaluation.context(config, nets, params), ('knn',))['knn'].items()}
  last = {}
  for line in (directory / 'metrics.jsonl').read_text().splitlines():
    last.update(json.loads(line))
  result = {'name': name, 'seed': seed, 'minutes_training': round(minutes, 2), 'init': top1(init),
            'trained': top1(jax.device_get(evaluation.evaluated_network(config, trained.state))),
            'entropy': {level: last.get(f'teacher_entropy/{level}') for level in ('cls', 'cls_plus', 'patch')}}
  result_path.write_text(json.dumps(result, indent=2))
  return result


def table(results: list[dict]) -> str:
  lines = ['| recipe | seed | what changes | init cls / cls+ / concat | trained cls / cls+ / concat '
           '| gain concat (cls for DINO) | final teacher entropy cls / cls+ / patch (ln K = 6.93) | train min |',
           '|---' * 8 + '|']
  for r in results:
    fmt = lambda d: ' / '.join(f'{d[t]:.1f}' for t in ('cls', 'cls_plus', 'concat') if t in d)
    entropy = ' / '.join('-' if v is None else f'{v:.2f}' for v in r['entropy'].values())
    both = 'concat' if 'concat' in r['trained'] else 'cls'        # a 1-token (DINO) model has cls only
    lines.append(f"| {r['name']} | {r['seed']} | {RECIPES[r['name']][0]} | {fmt(r['init'])} | {fmt(r['trained'])} "
                 f"| {r['trained'][both] - r['init'][both]:+.1f} | {entropy} | {r['minutes_training']:.1f} |")
  return '\n'.join(lines)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  names = [n for n in FLAGS.only.split(',') if n] or list(RECIPES)
  unknown = [n for n in names if n not in RECIPES]
  if unknown:
    sys.exit(f'Unknown recipes {unknown}; choose from {list(RECIPES)}.')
  root = pathlib.Path(FLAGS.workdir)
  results = [run(name, int(seed), root) for name in names for seed in FLAGS.seeds.split(',')]
  text = table(results)
  root.mkdir(parents=True, exist_ok=True)
  (root / 'recipes.md').write_text(text + '\n')
  print(text)


if __name__ == '__main__':
  app.run(main)

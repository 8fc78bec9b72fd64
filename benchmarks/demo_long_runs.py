r"""When and why do the demo's features move? `python benchmarks/demo_long_runs.py [--only=NAME,...]`.

Each study is `configs/demo.py` with a few overrides (STUDIES), trained into `WORKDIR/<name>/` with k-NN
every few epochs (k = 20, the demo's protocol) from epoch 0 (the initialisation). The studies separate the
schedule's parts: the same 100 epochs with the learning rate held at its peak after the warm-up, or with
the teacher's momentum held at its start; a 40-epoch schedule that decays fully; and plain DINO at 100
epochs. A finished study is not trained again. The table of curves (`WORKDIR/long_runs.md`, also printed)
and the picture (`WORKDIR/long_runs.png`) are the ones in benchmarks/RESULTS.md ("Demo: long runs").
"""

from __future__ import annotations

import json
import pathlib
import sys
import time

from absl import app, flags, logging

flags.DEFINE_string('only', '', 'Comma-separated study names (default: all).')
flags.DEFINE_string('workdir', 'runs/demo_long_runs', 'Where the studies train.')
flags.DEFINE_string('seeds', '0', 'Comma-separated seeds; seed s > 0 trains into WORKDIR/<name>_s<s>/.')
FLAGS = flags.FLAGS

PEAK_LR = 2e-3 * 64 / 256            # the earlier demo's peak: optim.lr per 256 images x batch 64
# The demo's recipe when these studies were run (20 epochs of batch 64, cosine lr): every study before
# DEFAULT_STUDIES starts from it, whatever configs/demo.py says now.
EARLIER_DEMO = {'batch_size': 64, 'epochs': 20, 'optim.lr': 2e-3, 'optim.min_lr': 1e-5, 'log_every_steps': 62,
                'udi.momentum_teacher_end': 1.0}
DINO = {'udi.include_patch': False}   # one class token follows (sweep.apply)
# name -> (what changes, overrides of configs/demo.py).
STUDIES = {
    'udi_100': ('the demo recipe for 100 epochs', {'epochs': 100, 'eval.knn_every_epochs': 10}),
    'udi_100_constant_lr': ('100 epochs, lr held at its peak after the warm-up',
                            {'epochs': 100, 'eval.knn_every_epochs': 10, 'optim.min_lr': PEAK_LR}),
    'udi_100_fixed_ema': ('100 epochs, teacher momentum held at 0.996',
                          {'epochs': 100, 'eval.knn_every_epochs': 10, 'udi.momentum_teacher_end': 0.996}),
    'udi_40': ('40 epochs (the whole schedule in 40)', {'epochs': 40, 'eval.knn_every_epochs': 5}),
    'dino_100': ('plain DINO (1 token, no patch branch), 100 epochs',
                 {'epochs': 100, 'eval.knn_every_epochs': 10, **DINO}),
    # Runs of the demo's time budget (~8 min here): can the rise come sooner?
    'udi_30_constant_lr': ('30 epochs, lr held at its peak (5e-4)',
                           {'epochs': 30, 'eval.knn_every_epochs': 5, 'optim.min_lr': PEAK_LR}),
    'udi_30_lr1e3': ('30 epochs, lr held at a peak of 1e-3 (2x)',
                     {'epochs': 30, 'eval.knn_every_epochs': 5, 'optim.lr': 4e-3, 'optim.min_lr': 2 * PEAK_LR}),
    'udi_30_batch32': ('30 epochs at batch 32 (2x the steps), lr held at a peak of 5e-4',
                       {'epochs': 30, 'eval.knn_every_epochs': 5, 'batch_size': 32, 'optim.lr': 4e-3,
                        'optim.min_lr': PEAK_LR}),
    'udi_30_digit_augment': ('30 epochs, lr held at 5e-4, augmentations that keep a digit: no flips, turns of up '
                             'to 10°, shifts of up to 0.1', {'epochs': 30, 'eval.knn_every_epochs': 5,
                                                              'optim.min_lr': PEAK_LR, 'data.flip_prob': 0.0,
                                                              'data.rotation_degrees': 10.0,
                                                              'data.translate_fraction': 0.1}),
}
STUDIES = {name: (what, {**EARLIER_DEMO, **changes}) for name, (what, changes) in STUDIES.items()}
# Against configs/demo.py as it is (batch 32, lr and teacher momentum held, 30 epochs; `long`: 40).
DEFAULT_STUDIES = {
    'dino_default': ('plain DINO with the default demo recipe', {**DINO, 'eval.knn_every_epochs': 5}),
    'udi_long': ('configs/demo.py:long (40 epochs)', {'epochs': 40, 'eval.knn_every_epochs': 5}),
    'udi_held_ema': ('the default: batch 32, lr and teacher momentum (0.996) held, 30 epochs',
                     {'udi.momentum_teacher_end': 0.996, 'eval.knn_every_epochs': 5}),
    'udi_held_all': ('the default with the weight decay held too (at 0.04)',
                     {'udi.momentum_teacher_end': 0.996, 'optim.weight_decay_end': 0.04, 'eval.knn_every_epochs': 5}),
}
STUDIES.update(DEFAULT_STUDIES)


def run(name: str, root: pathlib.Path, seed: int = 0) -> dict:
  from configs import demo
  from udi_jax import sweep
  from udi_jax.evaluate.curves import knn_by_epoch, read_metrics
  from udi_jax.train.loop import train_and_evaluate
  directory = root / (name if seed == 0 else f'{name}_s{seed}')
  result_path = directory / 'result.json'
  if result_path.exists():
    return json.loads(result_path.read_text())
  config = sweep.apply(demo.get_config(), STUDIES[name][1])    # (DINO: one class token)
  config.seed = seed
  config.eval.report = False
  started = time.time()
  trained = train_and_evaluate(config, directory)
  curve = knn_by_epoch(read_metrics(directory / 'metrics.jsonl'), trained.trainer.schedules.steps_per_epoch)
  result = {'name': name, 'seed': seed, 'minutes': round((time.time() - started) / 60, 2), 'curve': curve}
  result_path.write_text(json.dumps(result, indent=2))
  return result


def table(results: list[dict]) -> str:
  """Per study, the k-NN top-1 of `concat` (`cls` for DINO) at each evaluated epoch."""
  epochs = sorted({int(e) for r in results for points in r['curve'].values() for e, _ in points})
  lines = ['| study | seed | what changes | token | ' + ' | '.join(f'ep {e}' for e in epochs) + ' | gain | minutes |',
           '|---|---|---|---|' + '---|' * (len(epochs) + 2)]
  for r in results:
    token = 'concat' if 'concat' in r['curve'] else 'cls'
    at = {int(e): v for e, v in r['curve'][token]}
    cells = ' | '.join(f'{at[e]:.1f}' if e in at else '' for e in epochs)
    points = r['curve'][token]
    gain = points[-1][1] - points[0][1]
    lines.append(f"| {r['name']} | {r.get('seed', 0)} | {STUDIES[r['name']][0]} | {token} | {cells} | {gain:+.1f} "
                 f"| {r['minutes']:.1f} |")
  return '\n'.join(lines)


def plot(results: list[dict], path: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4.2))
  for r in results:
    token = 'concat' if 'concat' in r['curve'] else 'cls'
    ax.plot(*zip(*r['curve'][token]), marker='o', markersize=3, label=f"{r['name']} s{r.get('seed', 0)} ({token})")
  ax.set_xlabel('epoch (0: initialisation)')
  ax.set_ylabel('k-NN top-1 % (k = 20)')
  ax.set_title('Demo (MNIST-5k, ViT 4 blocks, patch 7): k-NN during training')
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  names = [n for n in FLAGS.only.split(',') if n] or list(STUDIES)
  unknown = [n for n in names if n not in STUDIES]
  if unknown:
    sys.exit(f'Unknown studies {unknown}; choose from {list(STUDIES)}.')
  root = pathlib.Path(FLAGS.workdir)
  seeds = [int(s) for s in FLAGS.seeds.split(',') if s]
  results = [run(name, root, seed) for name in names for seed in seeds]
  text = table(results)
  root.mkdir(parents=True, exist_ok=True)
  (root / 'long_runs.md').write_text(text + '\n')
  plot(results, root / 'long_runs.png')
  print(text)


if __name__ == '__main__':
  app.run(main)

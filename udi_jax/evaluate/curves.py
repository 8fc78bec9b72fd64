"""Curves from a run's `metrics.jsonl`, drawn as PNG files under `workdir/pictures/`:

- `training_curves.png`: losses per level, teacher entropy, KL, lr and k-NN (if run), against the step;
- `knn_curve.png`: k-NN top-1 of each evaluated token against the epoch (epoch 0: the network at
  initialisation), with horizontal reference lines (raw pixels; published results).
"""

from __future__ import annotations

import json
import pathlib
from typing import Optional

from udi_jax.models.networks import LEVELS


def _pyplot():
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  return plt


def read_metrics(metrics_path: pathlib.Path) -> list[dict]:
  if not metrics_path.exists():
    return []
  return [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]


def _save(plt, fig, path: pathlib.Path) -> pathlib.Path:
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def knn_by_epoch(rows: list[dict], steps_per_epoch: int, k: int = 20) -> dict[str, list[tuple[float, float]]]:
  """{token: [(epoch, top-1 %), ...]} of the k-NN lines of a metrics log."""
  curve: dict[str, list[tuple[float, float]]] = {}
  for row in rows:
    for key, value in row.items():
      if key.startswith('knn/') and key.endswith(f'/top1@{k}'):
        curve.setdefault(key.split('/')[1], []).append((row['step'] / steps_per_epoch, float(value)))
  return curve


def draw_knn_curve(metrics_path: pathlib.Path, path: pathlib.Path, steps_per_epoch: int, k: int = 20,
                   references: Optional[dict[str, float]] = None, title: str = '') -> Optional[pathlib.Path]:
  """k-NN top-1 per token against the epoch, with `references` {label: top-1 %} as horizontal lines; None
  when the run logged no k-NN."""
  curve = knn_by_epoch(read_metrics(metrics_path), steps_per_epoch, k)
  if not curve:
    return None
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6.4, 4))
  for token, points in curve.items():
    ax.plot(*zip(*points), marker='o', markersize=3, label=token)
  for i, (label, value) in enumerate((references or {}).items()):
    ax.axhline(value, linestyle=('--', ':', '-.')[i % 3], color='grey', linewidth=1)
    ax.annotate(f'{label} {value:.1f}', (0, value), textcoords='offset points', xytext=(2, 2), fontsize=7,
                color='dimgrey')
  ax.set_xlabel('epoch (0: initialisation)')
  ax.set_ylabel(f'k-NN top-1 % (k = {k})')
  ax.set_title(title or 'k-NN during training')
  ax.legend(fontsize=8)
  return _save(plt, fig, path)


def draw_curves(metrics_path: pathlib.Path, path: pathlib.Path, k: int = 20) -> Optional[pathlib.Path]:
  """Training curves from `metrics.jsonl` (the k-NN panel at `k` neighbours); None when nothing is logged."""
  rows = read_metrics(metrics_path)
  train = [r for r in rows if 'loss' in r]
  knn_rows = [r for r in rows if any(key.startswith('knn/') for key in r)]
  if not train:
    return None
  plt = _pyplot()
  last = train[-1]
  losses = ['loss'] + [f'loss/{level}' for level in LEVELS]
  panels = [('loss', train, [key for key in losses if key in last]),
            ('teacher entropy', train, [key for key in last if key.startswith('teacher_entropy/')]),
            ('KL(teacher || student)', train, [key for key in last if key.startswith('kl/')]),
            ('learning rate', train, ['lr'])]
  if knn_rows:
    panels.append((f'k-NN top-1 % (k={k})', knn_rows, [key for key in knn_rows[-1] if key.endswith(f'/top1@{k}')]))
  fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3))
  for ax, (title, subset, keys) in zip(axes, panels):
    for key in keys:
      ax.plot([r['step'] for r in subset], [r[key] for r in subset], label=key)
    ax.set_title(title)
    ax.set_xlabel('step')
    if len(keys) > 1:
      ax.legend(fontsize=7)
  return _save(plt, fig, path)

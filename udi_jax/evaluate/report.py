"""The end-of-training report (`config.eval.report`, on in the demo): what a run learned, at a glance.

- The k-NN table: raw pixels, the network at initialisation and the trained network, per token
  (`WORKDIR/eval/knn_table.md`, `.json`).
- The table of the other report protocols for both networks: dense linear and k-NN mIoU when
  config.eval.dense.source is set, and the diagnostics (`WORKDIR/eval/dense_table.md`, `.json`); its
  columns are each protocol's `headline`.
- Attention pictures and training curves (`WORKDIR/pictures/`).
- The teacher exported for timm (`WORKDIR/export/teacher_timm.safetensors`), and where everything is.
"""

from __future__ import annotations

import pathlib
from typing import Any, Optional

import jax
import numpy as np

from udi_jax.data.sources import decode_image
from udi_jax.evaluate import attention, curves, features, knn
from udi_jax.evaluate import run as evaluation
from udi_jax.evaluate.context import EvalContext
from udi_jax.evaluate.protocols import REGISTRY
from udi_jax.evaluate.protocols import knn as knn_protocol
from udi_jax.interop import layouts, torch_files
from udi_jax.models.networks import Networks
from udi_jax.say import say

EXPORT_NAME = 'teacher_timm.safetensors'
DENSE = ('dense_linear', 'dense_knn')


def report_written(workdir: str | pathlib.Path) -> bool:
  """Whether a run's report is complete (its export, the last part written, exists)."""
  return (pathlib.Path(workdir) / 'export' / EXPORT_NAME).is_file()


def table_protocols(config) -> tuple[str, ...]:
  """The protocols of the report's second table: the dense ones with a dense source, and the diagnostics."""
  return (DENSE if config.eval.dense.source else ()) + ('diagnostics',)


def write(workdir: pathlib.Path, name: str, table: str, payload: dict) -> None:
  evaluation.write_json(workdir / 'eval' / f'{name}.json', payload)
  if jax.process_index() == 0:
    (workdir / 'eval' / f'{name}.md').write_text(table + '\n')


def knn_table(config, pixels: dict, rows: list[tuple[str, dict]], train_count: int, test_count: int) -> tuple[
    str, dict]:
  """Markdown and payload of raw pixels' k-NN and each (features, {token: k-NN results}) row."""
  k = knn_protocol.reported_k(config)
  flat = [('raw pixels', '-', pixels)] + [(what, t, r) for what, found in rows for t, r in found.items()]
  lines = [f'k-NN on {config.eval.test_source} ({test_count} images; bank {config.eval.train_source}, '
           f'{train_count} images), k = {k}, T = {knn.TEMPERATURE}', '',
           '| features | token | top-1 % | top-5 % |', '|---|---|---|---|']
  lines += [f'| {what} | {tok} | {r[f"top1@{k}"]:.1f} | {r[f"top5@{k}"]:.1f} |' for what, tok, r in flat]
  return '\n'.join(lines), {'k': k, 'rows': [{'features': w, 'token': t, **r} for w, t, r in flat]}


def protocols_table(config, names: tuple[str, ...], rows: list[tuple[str, dict]]) -> tuple[str, dict]:
  """Markdown and payload of each (features, {protocol: results}) row, one column per headline cell."""
  cells = [{c: v for n in names for c, v in REGISTRY[n].headline(config, found[n]).items()} for _, found in rows]
  columns = list(dict.fromkeys(c for row in cells for c in row))
  lines = []
  first = rows[0][1]
  dense = next((first[n] for n in names if n in DENSE), None)
  if dense is not None:
    lines += [f'Dense: {dense["source"]} ({dense["train_examples"]} training crops of {dense["size"]} px, '
              f'{dense["val_examples"]} whole validation images, {dense["classes"]} classes)']
  if 'diagnostics' in first:
    lines += [f'Diagnostics on {first["diagnostics"]["examples"]} images of {config.eval.test_source}; '
              f'ln K = {np.log(config.model.out_dim):.2f}']
  lines += [''] if lines else []
  lines += ['| features | ' + ' | '.join(columns) + ' |', '|---|' + '---|' * len(columns)]
  lines += [f'| {what} | ' + ' | '.join(row.get(c, '-') for c in columns) + ' |'
            for (what, _), row in zip(rows, cells)]
  return '\n'.join(lines), {'rows': [{'features': what, **found} for what, found in rows]}


def pictures(config, nets: Networks, params: dict, test, workdir: pathlib.Path, steps_per_epoch: int,
             raw_pixels_top1: Optional[float] = None, count: int = 6) -> list[pathlib.Path]:
  """Attention pictures on `count` test images spread over the split, the training curves, and the k-NN
  curve per epoch (when the run logged k-NN) with raw pixels' k-NN as a line."""
  if jax.process_index() != 0:
    return []
  crop = config.data.global_size
  spread = np.unique(np.linspace(0, len(test) - 1, min(count, len(test))).astype(int))   # sorted data: spread out
  images = np.stack([features.center_crop(decode_image(test[int(i)]['image']), crop, config.eval.resize_ratio)
                     for i in spread])
  directory = workdir / 'pictures'
  written = attention.draw_attention(nets, params, images, directory, seed=config.seed,
                                     window=config.udi.global_window)
  k = knn_protocol.reported_k(config)
  drawn = [curves.draw_curves(workdir / 'metrics.jsonl', directory / 'training_curves.png', k),
           curves.draw_knn_curve(workdir / 'metrics.jsonl', directory / 'knn_curve.png', steps_per_epoch, k,
                                 {'raw pixels': raw_pixels_top1} if raw_pixels_top1 is not None else None)]
  return written + [p for p in drawn if p]


def _tables(config, init: EvalContext, trained: EvalContext, workdir: pathlib.Path) -> tuple[str, dict]:
  names = table_protocols(config)
  what = (('initialisation', init), (f'pretrained {config.eval.network}', trained))
  found: list[tuple[str, dict[str, Any]]] = [(label, evaluation.results(ctx, ('knn',) + names)) for label, ctx in what]
  train, test = init.splits()
  knn_md, knn_payload = knn_table(config, knn_protocol.raw_pixels(init), [(w, f['knn']) for w, f in found],
                                  len(train), len(test))
  write(workdir, 'knn_table', knn_md, knn_payload)
  table_md, table_payload = protocols_table(config, names, [(w, {n: f[n] for n in names}) for w, f in found])
  write(workdir, 'dense_table', table_md, table_payload)
  return knn_md + '\n\n' + table_md, knn_payload['rows'][0]


def final_report(config, nets: Networks, state, workdir: str | pathlib.Path, steps_per_epoch: int) -> None:
  """Writes the report of a run's final TrainState and prints where its parts are (process 0)."""
  workdir = pathlib.Path(workdir)
  names = ('knn',) + table_protocols(config)
  init_params = jax.device_get(jax.jit(nets.init)(jax.random.key(config.seed)))   # the run's own initialisation
  trained_params = jax.device_get(evaluation.evaluated_network(config, state))
  init = evaluation.context(config, nets, init_params, None, names)
  trained = evaluation.context(config, nets, trained_params, jax.device_get(state.centres), names)
  tables, pixels = _tables(config, init, trained, workdir)
  drawn = pictures(config, nets, trained_params, trained.splits()[1], workdir, steps_per_epoch,
                   pixels[f'top1@{knn_protocol.reported_k(config)}'])
  if jax.process_index() != 0:
    return
  out = workdir / 'export' / EXPORT_NAME
  torch_files.save(layouts.payload('timm', nets, None, jax.device_get(state.teacher), None), out)
  say('\n' + tables + '\n')
  say(layouts.how_to_load('timm', nets, out, None, 'teacher', int(jax.device_get(state.step))))
  say(f'Everything is in {workdir}:\n  k-NN table   {workdir / "eval" / "knn_table.md"} (and .json)\n'
      f'  dense table  {workdir / "eval" / "dense_table.md"} (and .json)\n'
      f'  pictures     ' + '\n               '.join(str(p) for p in drawn) +
      f'\n  PyTorch      {out} (timm layout)'
      f'\n  checkpoints  {workdir / "checkpoints"}\n  metrics      {workdir / "metrics.jsonl"} '
      f'(TensorBoard: tensorboard --logdir {workdir})')

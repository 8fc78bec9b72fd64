"""The end-of-training report (`config.eval.report`, on in the demo): what a run learned, at a glance.

The k-NN table of raw pixels, the network at initialisation and the trained network per token
(`WORKDIR/eval/knn_table.md`, `.json`), the dense table of both networks (dense linear and k-NN mIoU when
config.eval.dense_source is set, RankMe, CKA, the teacher's levels: `WORKDIR/eval/dense_table.md`, `.json`),
attention pictures and training curves (`WORKDIR/pictures/`), the
teacher exported for timm (`WORKDIR/export/teacher_timm.safetensors`), and where everything is.
"""

from __future__ import annotations

import pathlib

import jax

from udi_jax.evaluate import run as evaluation
from udi_jax.interop import layouts, torch_files
from udi_jax.models.networks import Networks
from udi_jax.say import say

EXPORT_NAME = 'teacher_timm.safetensors'


def report_written(workdir: str | pathlib.Path) -> bool:
  """Whether a run's report is complete (its export, the last part written, exists)."""
  return (pathlib.Path(workdir) / 'export' / EXPORT_NAME).is_file()


def final_report(config, nets: Networks, state, workdir: str | pathlib.Path) -> None:
  """Writes the report of a run's final TrainState and prints where its parts are (process 0)."""
  workdir = pathlib.Path(workdir)
  init = jax.device_get(jax.jit(nets.init)(jax.random.key(config.seed)))   # the run's own initialisation
  trained = jax.device_get(evaluation.evaluated_network(config, state))
  table, _, test_features = evaluation.comparison_table(config, nets, init, trained, workdir)
  dense, _ = evaluation.dense_table(config, nets, init, trained, jax.device_get(state.centres), workdir,
                                    test_features)
  pictures = evaluation.pictures(config, nets, trained, workdir)
  if jax.process_index() != 0:
    return
  out = workdir / 'export' / EXPORT_NAME
  teacher = jax.device_get(state.teacher)
  torch_files.save(layouts.payload('timm', nets, None, teacher, None), out)
  say('\n' + table + '\n\n' + dense + '\n')
  say(layouts.how_to_load('timm', nets, out, None, 'teacher', int(jax.device_get(state.step))))
  say(f'Everything is in {workdir}:\n  k-NN table   {workdir / "eval" / "knn_table.md"} (and .json)\n'
      f'  dense table  {workdir / "eval" / "dense_table.md"} (and .json)\n'
      f'  pictures     ' + '\n               '.join(str(p) for p in pictures) +
      f'\n  PyTorch      {out} (timm layout)'
      f'\n  checkpoints  {workdir / "checkpoints"}\n  metrics      {workdir / "metrics.jsonl"} '
      f'(TensorBoard: tensorboard --logdir {workdir})')

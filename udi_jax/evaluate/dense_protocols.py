"""What the dense protocols share: their data section `config.eval.dense`, the training crops' patch
features, and one scoring pass over the whole validation images for every dense protocol of an evaluation.

A dense protocol (`protocols/dense_linear.py`, `protocols/dense_knn.py`) fits a `scorer` on the training
features; `scored` then runs every scorer of the evaluation in one pass (`dense_whole.py`) and gives each
protocol its mIoU, pixel accuracy and the data it was measured on.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from udi_jax.data import segmentation
from udi_jax.data.sources import limit
from udi_jax.errors import config_errors
from udi_jax.evaluate import dense, dense_whole
from udi_jax.evaluate.context import EvalContext


def check_section(config, protocol: str) -> None:
  """Refuses a `config.eval.dense` that `protocol` cannot run with, when it is asked for."""
  section = config.eval.dense
  if protocol in config.eval.protocols and not section.source:
    raise ValueError(f'config.eval.protocols holds {protocol}, which needs config.eval.dense.source '
                     f'({segmentation.FORMS}).')
  if section.source:
    segmentation.check_spec(section.source)
  if section.blocks not in (1, 4):
    raise ValueError(f'config.eval.dense.blocks={section.blocks} is not supported; use 1 (the last block) or '
                     '4 (the last four, concatenated).')
  size = section.size or config.data.global_size
  if size % config.model.patch_size:
    raise ValueError(f'config.eval.dense.size={size} is not a multiple of config.model.patch_size='
                     f'{config.model.patch_size}; choose a multiple of it.')


def probe(config) -> None:
  section = config.eval.dense
  if section.source:
    segmentation.probe_segmentation(section.source, config.data.data_dir or None, section.num_classes)


def sources(config) -> tuple[Any, Any]:
  """The training and validation splits of config.eval.dense.source, limited by max_*_examples."""
  section = config.eval.dense
  counts = (section.max_train_examples or None, section.max_test_examples or None)
  with config_errors():   # (segdigits makes only the examples used; the others are read lazily)
    opened = [segmentation.open_segmentation(section.source, split, config.data.data_dir or None,
                                             section.num_classes, count)
              for split, count in zip(segmentation.SPLITS, counts)]
  return limit(opened[0], section.max_train_examples), limit(opened[1], section.max_test_examples)


def crop_size(config) -> int:
  return config.eval.dense.size or config.data.global_size


def reduce_zero_label(config) -> bool:
  return segmentation.reduces_zero_label(config.eval.dense.source, config.eval.dense.reduce_zero_label)


def training_features(ctx: EvalContext) -> tuple[np.ndarray, np.ndarray, int]:
  """(features (N, tokens, D) bfloat16, masks (N, size, size), skipped examples) of the training crops,
  extracted once per context."""
  def make():
    train, _ = ctx.shared('dense sources', lambda: sources(ctx.config))
    return dense.extract(ctx.nets, ctx.backbone, train, crop_size(ctx.config), ctx.config.eval.batch_size,
                         ctx.config.eval.dense.blocks, 'dense training features', reduce_zero_label(ctx.config))
  return ctx.shared('dense training features', make)


def num_classes(ctx: EvalContext) -> int:
  train, _ = ctx.shared('dense sources', lambda: sources(ctx.config))
  return int(train.num_classes)


def scored(ctx: EvalContext, name: str) -> dict[str, Any]:
  """The results of the dense protocol `name`: its scorer's (and every other dense protocol's of this
  evaluation, in the same pass) mIoU on the whole validation images, with what its scorer reports."""
  return ctx.shared('dense scores', lambda: _score_all(ctx))[name]


def _score_all(ctx: EvalContext) -> dict[str, dict[str, Any]]:
  config = ctx.config
  _, test = ctx.shared('dense sources', lambda: sources(config))
  _, train_m, skipped_train = training_features(ctx)
  fitted = {name: fit(ctx) for name, fit in ctx.dense_scorers.items()}      # name -> (scorer, about)
  train_examples = len(train_m)
  ctx.forget('dense training features')       # (ADE20K's: ~16 GB, not needed while scoring)
  size, blocks = crop_size(config), config.eval.dense.blocks
  features = dense.PatchFeatures(ctx.nets, ctx.backbone, size, config.eval.batch_size, blocks)
  confusions, scored_examples, skipped_test = dense_whole.whole_image_confusions(
      features, test, {name: scorer for name, (scorer, _) in fitted.items()}, num_classes(ctx),
      reduce_zero_label(config), 'dense validation (whole images)')
  about = {'source': config.eval.dense.source, 'size': size, 'blocks': blocks, 'classes': num_classes(ctx),
           'reduce_zero_label': reduce_zero_label(config), 'train_examples': train_examples,
           'val_examples': scored_examples, 'skipped_examples': skipped_train + skipped_test,
           'scored_on': 'whole validation images at label resolution (sliding windows)'}
  return {name: {**dense.scores(confusions[name]), **fitted[name][1], **about} for name in fitted}

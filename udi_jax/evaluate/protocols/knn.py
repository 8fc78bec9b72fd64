"""k-NN classification on frozen features: DINO's weighted vote of the k nearest training images by cosine
similarity (`evaluate/knn.py`), for each of config.eval.tokens, at each k of config.eval.knn.ks."""

from __future__ import annotations

import numpy as np

from udi_jax.data.sources import decode_image
from udi_jax.evaluate import features, knn
from udi_jax.evaluate.context import EvalContext

NAME = 'knn'


def check(config) -> None:
  ks = tuple(config.eval.knn.ks)
  if not ks or min(ks) < 1:
    raise ValueError(f'config.eval.knn.ks={ks} must list positive neighbour counts.')


def reported_k(config) -> int:
  """The k that tables and summaries report: 20 when it is evaluated, else the first."""
  ks = tuple(config.eval.knn.ks)
  return 20 if 20 in ks else ks[0]


def feature_kinds(ctx: EvalContext) -> tuple[str, ...]:
  return ctx.tokens


def _classes(ctx: EvalContext, *labels: np.ndarray) -> int:
  return int(max([ctx.splits()[0].num_classes] + [int(y.max()) + 1 for y in labels]))


def run(ctx: EvalContext) -> dict[str, dict[str, float]]:
  """{token: {'top1@k': %, 'top5@k': %}} on the test split, the training split as the bank."""
  bank, bank_labels = ctx.features('train', ctx.tokens)
  queries, labels = ctx.features('test', ctx.tokens)
  ks = tuple(ctx.config.eval.knn.ks)
  classes = _classes(ctx, bank_labels, labels)
  return {t: knn.knn_accuracy(bank[t], bank_labels, queries[t], labels, classes, ks) for t in ctx.tokens}


def raw_pixels(ctx: EvalContext) -> dict[str, float]:
  """The same protocol on the evaluation crops' pixels: the baseline any network should beat."""
  crop, ratio = ctx.config.data.global_size, ctx.config.eval.resize_ratio
  train, test = ctx.splits()

  def pixels(source):
    return np.stack([features.center_crop(decode_image(source[i]['image']), crop, ratio).reshape(-1)
                     for i in range(len(source))]).astype(np.float32)

  def labels(source):
    return np.asarray([source[i]['label'] for i in range(len(source))])

  train_y, test_y = labels(train), labels(test)
  return knn.knn_accuracy(pixels(train), train_y, pixels(test), test_y, _classes(ctx, train_y, test_y),
                          tuple(ctx.config.eval.knn.ks))


def headline(config, results) -> dict[str, str]:
  k = reported_k(config)
  return {f'k-NN top-1 @{k} {token} %': f'{r[f"top1@{k}"]:.1f}' for token, r in results.items()}

"""The linear probe: a linear classifier on the frozen features DINO's probe reads (token 0 of the last four
blocks, concatenated), trained with SGD on the training split (`evaluate/linear.py`)."""

from __future__ import annotations

from udi_jax.evaluate import linear
from udi_jax.evaluate.context import EvalContext

NAME = 'linear'
KIND = 'linear'


def check(config) -> None:
  section = config.eval.linear
  if section.epochs < 1 or section.batch_size < 1 or not section.lr > 0:
    raise ValueError(f'config.eval.linear needs epochs >= 1, batch_size >= 1 and lr > 0; it holds '
                     f'epochs={section.epochs}, batch_size={section.batch_size}, lr={section.lr}.')


def feature_kinds(ctx: EvalContext) -> tuple[str, ...]:
  return (KIND,)


def run(ctx: EvalContext) -> dict:
  """{'top1', 'best_top1', ...} of the probe on the test split."""
  train_x, train_y = ctx.features('train', (KIND,))
  test_x, test_y = ctx.features('test', (KIND,))
  section = ctx.config.eval.linear
  settings = linear.ProbeSettings(epochs=section.epochs, batch_size=section.batch_size, lr=section.lr,
                                  seed=ctx.config.seed)
  classes = int(max(ctx.splits()[0].num_classes, train_y.max() + 1))
  return linear.train_classification_probe(train_x[KIND], train_y, test_x[KIND], test_y, classes, settings)


def headline(config, results) -> dict[str, str]:
  return {'linear top-1 %': f'{results["top1"]:.1f}'}

"""The linear probe: a linear classifier on frozen features, trained with SGD on the training split and
scored on the test split (`evaluate/linear.py`). By default on the features DINO's probe reads (`linear`:
token 0 of the last four blocks, concatenated); config.eval.linear.features may list others (cls, cls_plus,
concat, avgpool), each probed on its own."""

from __future__ import annotations

from udi_jax.evaluate import features, linear
from udi_jax.evaluate.context import EvalContext

NAME = 'linear'


def check(config) -> None:
  section = config.eval.linear
  if section.epochs < 1 or section.batch_size < 1 or not section.lr > 0:
    raise ValueError(f'config.eval.linear needs epochs >= 1, batch_size >= 1 and lr > 0; it holds '
                     f'epochs={section.epochs}, batch_size={section.batch_size}, lr={section.lr}.')
  unknown = [k for k in section.features if k not in features.KINDS]
  if unknown or not section.features:
    raise ValueError(f'config.eval.linear.features holds {list(unknown or section.features)}; choose from '
                     f'{features.KINDS}.')


def feature_kinds(ctx: EvalContext) -> tuple[str, ...]:
  """config.eval.linear.features without those a 1-token model lacks."""
  kinds = tuple(ctx.config.eval.linear.features)
  if ctx.nets.backbone.num_cls_tokens < 2:
    kinds = tuple(k for k in kinds if k not in features.TWO_TOKEN_KINDS)
  return kinds


def run(ctx: EvalContext) -> dict:
  """{features: {'top1', 'best_top1', ...}} of one probe per kind of features, on the test split."""
  kinds = feature_kinds(ctx)
  train_x, train_y = ctx.features('train', kinds)
  test_x, test_y = ctx.features('test', kinds)
  section = ctx.config.eval.linear
  settings = linear.ProbeSettings(epochs=section.epochs, batch_size=section.batch_size, lr=section.lr,
                                  seed=ctx.config.seed)
  classes = int(max(ctx.splits()[0].num_classes, train_y.max() + 1))
  return {k: linear.train_classification_probe(train_x[k], train_y, test_x[k], test_y, classes, settings)
          for k in kinds}


def headline(config, results) -> dict[str, str]:
  return {f'linear top-1 {kind} %': f'{r["top1"]:.1f}' for kind, r in results.items()}

"""Low-shot classification: logistic regression on token 0 of a labelled fraction of the training split
(per class, seeded; or SimCLRv2's subset files for ImageNet), scored on the test split
(`evaluate/linear.py`)."""

from __future__ import annotations

import pathlib

from udi_jax.evaluate import linear
from udi_jax.evaluate.context import EvalContext
from udi_jax.models.networks import CLS

NAME = 'lowshot'


def check(config) -> None:
  fractions = tuple(config.eval.lowshot.fractions)
  if not fractions or not all(0 < f <= 1 for f in fractions):
    raise ValueError(f'config.eval.lowshot.fractions={fractions} must list label fractions in (0, 1].')


def feature_kinds(ctx: EvalContext) -> tuple[str, ...]:
  return (CLS,)


def run(ctx: EvalContext) -> dict:
  """{fraction: {'top1', 'lambda', 'per_lambda', 'examples'}}."""
  train_x, train_y = ctx.features('train', (CLS,))
  test_x, test_y = ctx.features('test', (CLS,))
  section = ctx.config.eval.lowshot
  split_files = ({f: str(pathlib.Path(section.split_dir) / f'{f * 100:g}percent.txt') for f in section.fractions}
                 if section.split_dir else None)
  return linear.lowshot(train_x[CLS], train_y, test_x[CLS], test_y, tuple(section.fractions),
                        seed=ctx.config.seed, split_files=split_files, names=getattr(ctx.splits()[0], 'paths', None))


def headline(config, results) -> dict[str, str]:
  return {f'low-shot {float(f) * 100:g} % top-1 %': f'{r["top1"]:.1f}' for f, r in results.items()}

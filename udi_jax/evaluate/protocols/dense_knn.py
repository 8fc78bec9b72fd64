"""Dense k-NN: every validation patch takes the vote of its k nearest training patches (a seeded subsample
of config.eval.dense_knn.bank patches, each labelled by its pixels' majority), scored on whole validation
images (`evaluate/dense.py`, `evaluate/dense_protocols.py`); its data are config.eval.dense."""

from __future__ import annotations

from udi_jax.evaluate import dense, dense_protocols
from udi_jax.evaluate.context import EvalContext

NAME = 'dense_knn'


def check(config) -> None:
  dense_protocols.check_section(config, NAME)
  section = config.eval.dense_knn
  if section.k < 1 or section.bank < section.k:
    raise ValueError(f'config.eval.dense_knn needs k >= 1 and a bank of at least k patches; it holds '
                     f'k={section.k}, bank={section.bank}.')


def probe(config) -> None:
  dense_protocols.probe(config)


def scorer(ctx: EvalContext):
  section = ctx.config.eval.dense_knn
  train_x, train_m, _ = dense_protocols.training_features(ctx)
  bank = dense.patch_bank(train_x, train_m, dense_protocols.num_classes(ctx), ctx.nets.backbone.patch_size,
                          k=section.k, bank_size=section.bank, seed=ctx.config.seed)
  return bank.token_scores, {'k': bank.k, 'bank_patches': int(len(bank.labels))}


def run(ctx: EvalContext) -> dict:
  """{'miou', 'pixel_accuracy', ..., and the data it was measured on}."""
  return dense_protocols.scored(ctx, NAME)


def headline(config, results) -> dict[str, str]:
  return {'k-NN mIoU %': f'{results["miou"]:.1f}'}

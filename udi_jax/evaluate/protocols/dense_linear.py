"""Dense linear probe: a linear classifier per patch token of the frozen patch features, trained on the
training crops with AdamW and scored on whole validation images (`evaluate/dense.py`,
`evaluate/dense_protocols.py`); its data are config.eval.dense."""

from __future__ import annotations

from udi_jax.evaluate import dense, dense_protocols
from udi_jax.evaluate.context import EvalContext

NAME = 'dense_linear'


def check(config) -> None:
  dense_protocols.check_section(config, NAME)
  section = config.eval.dense_linear
  if section.epochs < 1 or section.batch_size < 1 or not section.lr > 0:
    raise ValueError(f'config.eval.dense_linear needs epochs >= 1, batch_size >= 1 and lr > 0; it holds '
                     f'epochs={section.epochs}, batch_size={section.batch_size}, lr={section.lr}.')


def probe(config) -> None:
  dense_protocols.probe(config)


def scorer(ctx: EvalContext):
  section = ctx.config.eval.dense_linear
  settings = dense.DenseProbeSettings(epochs=section.epochs, batch_size=section.batch_size, lr=section.lr,
                                      seed=ctx.config.seed)
  train_x, train_m, _ = dense_protocols.training_features(ctx)
  probe = dense.fit_segmentation_probe(train_x, train_m, dense_protocols.num_classes(ctx), settings)
  return probe.token_scores, {'final_train_loss': probe.final_train_loss, 'epochs': settings.epochs}


def run(ctx: EvalContext) -> dict:
  """{'miou', 'pixel_accuracy', ..., and the data it was measured on}."""
  return dense_protocols.scored(ctx, NAME)


def headline(config, results) -> dict[str, str]:
  return {'linear mIoU %': f'{results["miou"]:.1f}'}

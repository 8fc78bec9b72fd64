"""Representation diagnostics (`evaluate/diagnostics.py`) on the first config.eval.diagnostics.examples test
images: RankMe per class token, CKA between the two class tokens, and the teacher's entropy and prototypes
used per level of the objective (with the context's centres; zero centres at initialisation)."""

from __future__ import annotations

from typing import Any

import numpy as np

from udi_jax.data.sources import decode_image, limit
from udi_jax.evaluate import diagnostics, features
from udi_jax.evaluate.context import EvalContext
from udi_jax.models.networks import CLS, CLS_PLUS

NAME = 'diagnostics'


def check(config) -> None:
  if config.eval.diagnostics.examples < 0:
    raise ValueError(f'config.eval.diagnostics.examples={config.eval.diagnostics.examples} must be a count '
                     '(0: the whole test split).')


def _token_features(ctx: EvalContext, kinds: tuple[str, ...], count: int) -> dict[str, np.ndarray]:
  """The test features of `kinds` on the first `count` images: those other protocols extracted, if any."""
  extracted = ctx.extracted('test', kinds)
  if extracted is None:
    _, test = ctx.splits()
    ev = ctx.config.eval
    extracted, _ = features.extract(ctx.nets, ctx.backbone, limit(test, count), ctx.config.data.global_size,
                                    kinds, ev.batch_size, 'diagnostics features', ev.resize_ratio)
  return {k: v[:count] for k, v in extracted.items()}


def run(ctx: EvalContext) -> dict[str, Any]:
  _, test = ctx.splits()
  config = ctx.config
  count = min(len(test), config.eval.diagnostics.examples or len(test))
  kinds = (CLS, CLS_PLUS) if ctx.nets.backbone.num_cls_tokens > 1 else (CLS,)
  feats = _token_features(ctx, kinds, count)
  out: dict[str, Any] = {'examples': count, 'rankme': {k: diagnostics.rankme(v) for k, v in feats.items()}}
  if CLS_PLUS in feats:
    out['cka_cls_cls_plus'] = diagnostics.linear_cka(feats[CLS], feats[CLS_PLUS])
  crop, ratio = config.data.global_size, config.eval.resize_ratio
  images = np.stack([features.center_crop(decode_image(test[i]['image']), crop, ratio) for i in range(count)])
  out['teacher'] = diagnostics.teacher_levels(config, ctx.nets, ctx.params, ctx.centres, images)
  return out


def scalars(results: dict[str, Any]) -> dict[str, float]:
  """The results as flat {'diag/...': value} for the metrics log."""
  out = {f'diag/rankme/{k}': v for k, v in results['rankme'].items()}
  if 'cka_cls_cls_plus' in results:
    out['diag/cka_cls_cls_plus'] = results['cka_cls_cls_plus']
  for level, values in results['teacher'].items():
    out.update({f'diag/{name}/{level}': v for name, v in values.items()})
  return out


def headline(config, results) -> dict[str, str]:
  levels = ' / '.join(results['teacher'])
  per_level = lambda field: ' / '.join(f'{v[field]:.2f}' for v in results['teacher'].values())
  cka = results.get('cka_cls_cls_plus')
  return {f'RankMe {" / ".join(results["rankme"])}': ' / '.join(f'{v:.1f}' for v in results['rankme'].values()),
          'CKA cls, cls_plus': '-' if cka is None else f'{cka:.2f}',
          f'prototypes used ({levels})': per_level('prototypes_used'),
          f'teacher entropy ({levels})': per_level('entropy')}

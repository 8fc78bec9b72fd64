"""Representation diagnostics: over-compression measured on the evaluation features.

- `rankme`: the effective rank of a feature matrix (Garrido et al., RankMe): exp of the entropy of its
  singular values normalised to sum 1 (plus 1e-7 each, as in the paper). A collapsed representation has
  rank near 1; D independent directions give near D.
- `linear_cka`: linear centred kernel alignment between two feature matrices of the same images (1: the
  same information up to a rotation and scale; near 0: unrelated). Between token 0 and token 1 it says
  how much the second class token adds.
- `teacher_levels`: per level of the objective, the teacher's mean entropy (ln K at a collapse to
  uniform) and the number of prototypes its mean distribution over the images uses (exp of that mean's
  entropy; 1 at a collapse to one prototype), from the teacher's own targets (`objective.teacher_targets`)
  on the evaluation crops taken as both global views, with the run's centres and final teacher temperature.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from udi_jax.data.photometric import preprocess
from udi_jax.method import objective, sampling


def rankme(features: np.ndarray, eps: float = 1e-7) -> float:
  singular = np.linalg.svd(np.asarray(features, np.float64), compute_uv=False)
  p = singular / max(singular.sum(), 1e-300) + eps
  return float(np.exp(-np.sum(p * np.log(p))))


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  x, y = x - x.mean(0), y - y.mean(0)
  cross = np.linalg.norm(y.T @ x) ** 2
  return float(cross / max(np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y), 1e-300))


@functools.lru_cache(maxsize=4)
def _compiled_teacher_sums(nets, settings: objective.ObjectiveSettings, sampling_settings):
  def sums(params, centres, images, temperature, seed):
    rows = objective.Rows(batch=images.shape[0], n_local=0)
    views = preprocess(jnp.stack([images, images], axis=1))               # (B, 2, H, W, 3)
    samples = None
    if objective.PATCH in nets.levels:
      full = jnp.broadcast_to(jnp.asarray([0.0, 0.0, 1.0, 1.0]), (images.shape[0], 2, 4))
      keys = jax.random.split(jax.random.key(seed), images.shape[0])
      samples = sampling.draw_samples(full, keys, sampling_settings)
    targets = objective.teacher_targets(nets, settings, params, centres, objective.view_major(views), samples,
                                        temperature, rows)
    out = {}
    for level, probs in targets.probs.items():
      probs = probs.reshape(-1, probs.shape[-1])      # points of the patch level are its rows
      out[level] = (probs.sum(0), objective.entropy(probs).sum(), probs.shape[0])
    return out
  return jax.jit(sums)


def teacher_levels(config, nets, params: dict, centres: Optional[dict], images: np.ndarray,
                   batch_size: int = 64) -> dict[str, dict[str, float]]:
  """{level: {'entropy', 'prototypes_used'}} of the teacher's targets over `images` (N, S, S, 3) uint8 at
  the global crop size (whole batches of `batch_size`: a last partial batch is left out). `centres` None:
  zero centres (a network at initialisation)."""
  settings = objective.ObjectiveSettings.from_config(config)
  fn = _compiled_teacher_sums(nets, settings, sampling.SamplingSettings.from_config(config))
  if centres is None:
    centres = objective.init_centres(nets)
  temperature = jnp.float32(config.udi.teacher_temp)
  totals: dict[str, Any] = {}
  batch_size = min(batch_size, len(images))
  for start in range(0, len(images) - batch_size + 1, batch_size):   # one compiled shape: whole batches
    chunk = images[start:start + batch_size]
    for level, (mass, ent, count) in fn(params, centres, jnp.asarray(chunk), temperature, start).items():
      m, e, c = totals.get(level, (0.0, 0.0, 0))
      totals[level] = (m + np.asarray(mass, np.float64), e + float(ent), c + int(count))
  result = {}
  for level, (mass, ent, count) in totals.items():
    mean = mass / count
    mean = mean[mean > 0]
    result[level] = {'entropy': ent / count, 'prototypes_used': float(np.exp(-np.sum(mean * np.log(mean))))}
  return result

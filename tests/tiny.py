"""A tiny UDI model with the real token grids (14x14 global, 6x6 local) and random batches for tests."""

from __future__ import annotations

import jax
import ml_collections
import numpy as np


def tiny_config(num_cls_tokens: int = 2, num_local: int = 3) -> ml_collections.ConfigDict:
  from configs import vits16
  config = vits16.get_config()
  config.model.patch_size = 8                     # 112 px -> 14x14, 48 px -> 6x6 as in the real run
  config.model.embed_dim = 32
  config.model.depth = 2
  config.model.num_heads = 2
  config.model.num_cls_tokens = num_cls_tokens
  config.model.head_hidden_dim = 48
  config.model.head_bottleneck_dim = 24
  config.model.out_dim = 64
  config.model.dtype = 'float32'
  config.data.global_size = 112
  config.data.local_size = 48
  config.data.num_local = num_local
  return config


def random_boxes(rng: np.random.Generator, batch: int, num_local: int) -> np.ndarray:
  """Plausible crop boxes (B, 2+n_l, 4): overlapping global views, locals near them, random flips."""
  boxes = []
  for _ in range(batch):
    per_image = []
    for k in range(2 + num_local):
      size = rng.uniform(0.5, 1.0, 2) if k < 2 else rng.uniform(0.2, 0.5, 2)
      start = rng.uniform(0, 1 - size)
      box = np.concatenate([start, start + size])
      if rng.random() < 0.5:
        box[[1, 3]] = box[[3, 1]]
      per_image.append(box)
    boxes.append(per_image)
  return np.asarray(boxes, np.float32)


def random_batch(config, batch: int, seed: int = 0):
  """Normalised-looking crops and boxes for `batch` images."""
  rng = np.random.default_rng(seed)
  n_local, gs, ls = config.data.num_local, config.data.global_size, config.data.local_size
  crops_global = rng.normal(size=(batch, 2, gs, gs, 3)).astype(np.float32)
  crops_local = rng.normal(size=(batch, n_local, ls, ls, 3)).astype(np.float32)
  return crops_global, crops_local, random_boxes(rng, batch, n_local)


def perturbed_teacher(student, seed: int = 1, scale: float = 0.01):
  """A teacher that differs from the student, as after some EMA steps."""
  leaves, tree = jax.tree.flatten(student)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(tree, [x + scale * rng.normal(size=x.shape).astype(np.float32) for x in leaves])

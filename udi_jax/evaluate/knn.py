"""Weighted k-NN classification on frozen features (the DINO protocol, docs/method.md §6).

Features are L2-normalised; each query takes its k most similar training features (cosine), weights
each by exp(similarity / T) with T = 0.07, sums the weights per class and predicts the classes in order
of their summed weight. Computed on the accelerator in chunks of queries, so no N x N similarity matrix
is ever held. Ties: among equally similar training features the one with the lower index comes first
(`lax.top_k`), and among classes with equal weight the lower class id wins.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

KS = (10, 20, 100, 200)
TEMPERATURE = 0.07


def l2_normalize(x: jax.Array) -> jax.Array:
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@functools.partial(jax.jit, static_argnames=('ks', 'num_classes', 'temperature'))
def _chunk_scores(queries, bank, bank_labels, *, ks, num_classes, temperature):
  """Class scores (len(ks), C, num_classes) of one chunk of normalised queries."""
  sims = jnp.dot(queries, bank.T, precision=jax.lax.Precision.HIGHEST)          # (C, N)
  top_sims, top_idx = jax.lax.top_k(sims, max(ks))                             # ordered, ties: lower index
  weights = jnp.exp(top_sims / temperature)
  onehot = jax.nn.one_hot(bank_labels[top_idx], num_classes, dtype=weights.dtype)  # (C, kmax, classes)
  scores = []
  for k in ks:
    scores.append(jnp.einsum('ck,ckn->cn', weights[:, :k], onehot[:, :k], precision=jax.lax.Precision.HIGHEST))
  return jnp.stack(scores)


def knn_predict(bank: np.ndarray, bank_labels: np.ndarray, queries: np.ndarray, num_classes: int,
                ks=KS, temperature: float = TEMPERATURE, chunk: int = 256) -> dict[int, np.ndarray]:
  """Top-5 class predictions (Q, 5) per k, ordered by summed weight (ties: lower class id first)."""
  ks = tuple(k for k in ks if k <= len(bank)) or (len(bank),)
  bank = l2_normalize(jnp.asarray(bank, jnp.float32))
  labels = jnp.asarray(bank_labels, jnp.int32)
  queries = l2_normalize(jnp.asarray(queries, jnp.float32))
  top = {k: [] for k in ks}
  for start in range(0, queries.shape[0], chunk):
    scores = _chunk_scores(queries[start:start + chunk], bank, labels, ks=ks, num_classes=num_classes,
                           temperature=temperature)
    # Stable descending order: lower class id first among equal scores.
    order = jnp.argsort(-scores, axis=-1, stable=True)[..., :min(5, num_classes)]
    for i, k in enumerate(ks):
      top[k].append(np.asarray(order[i]))
  return {k: np.concatenate(v) for k, v in top.items()}


def knn_accuracy(bank: np.ndarray, bank_labels: np.ndarray, queries: np.ndarray, query_labels: np.ndarray,
                 num_classes: int, ks=KS, temperature: float = TEMPERATURE) -> dict[str, float]:
  """{'top1@k': %, 'top5@k': %} for each k (k larger than the bank is dropped)."""
  predictions = knn_predict(bank, bank_labels, queries, num_classes, ks, temperature)
  labels = np.asarray(query_labels)[:, None]
  result = {}
  for k, top in predictions.items():
    result[f'top1@{k}'] = float(100.0 * np.mean(top[:, 0] == labels[:, 0]))
    result[f'top5@{k}'] = float(100.0 * np.mean(np.any(top == labels, axis=1)))
  return result

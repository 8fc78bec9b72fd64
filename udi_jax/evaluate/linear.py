"""Linear probe and low-shot logistic regression on frozen features (docs/method.md §6).

Linear probe (the official protocol): one linear layer, weights N(0, 0.01) and bias 0, trained with SGD
(momentum 0.9, no weight decay), lr = 0.02 x batch/256 with a cosine to 0 over 100 epochs, on the
features of the last 4 blocks' token 0. By default on cached features of the evaluation crops (resize +
centre crop); the official training augmentation differs (docs/method.md §6). Reported: the final and the best
top-1 over the epochs (the official number is the best).

Low-shot (the iBOT protocol): 1 % and 10 % of the training labels (per class, fixed by seed, or SimCLRv2
split files for ImageFolder sources), L2-normalised features, multinomial logistic regression without
intercept for lambda in {0.01, 0.1, 1}/n (scikit-learn's C = 1/(lambda n)); the best lambda is reported.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax


@dataclasses.dataclass(frozen=True)
class ProbeSettings:
  epochs: int = 100
  batch_size: int = 256
  lr: float = 0.02            # per 256 examples
  momentum: float = 0.9
  weight_decay: float = 0.0   # L2 penalty (weight_decay/2)|w|^2 on the weights; official: 0
  seed: int = 0


def _accuracy(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
  return (jnp.mean(top5[:, 0] == labels) * 100.0, jnp.mean(jnp.any(top5 == labels[:, None], -1)) * 100.0)


def train_classification_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                               test_y: np.ndarray, num_classes: int, settings: ProbeSettings = ProbeSettings()
                               ) -> dict:
  """Trains the linear classifier on image features by SGD (the official probe); returns {'top1', 'top5'
  (final), 'best_top1', 'best_epoch', 'curve'}."""
  n, dim = train_x.shape
  batch = min(settings.batch_size, n)
  steps_per_epoch = n // batch
  total = steps_per_epoch * settings.epochs
  lr = settings.lr * batch / 256.0
  tx = optax.sgd(optax.cosine_decay_schedule(lr, total), momentum=settings.momentum)
  key = jax.random.key(settings.seed)
  params = {'w': 0.01 * jax.random.normal(key, (dim, num_classes)), 'b': jnp.zeros((num_classes,))}
  opt_state = tx.init(params)
  xs, ys = jnp.asarray(train_x, jnp.float32), jnp.asarray(train_y, jnp.int32)
  tx_test, ty_test = jnp.asarray(test_x, jnp.float32), jnp.asarray(test_y, jnp.int32)

  def loss_fn(p, x, y):
    logits = x @ p['w'] + p['b']
    penalty = 0.5 * settings.weight_decay * jnp.sum(jnp.square(p['w']))
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean() + penalty

  @jax.jit
  def epoch(carry, epoch_index):
    p, s = carry
    order = jax.random.permutation(jax.random.fold_in(key, epoch_index), n)[:steps_per_epoch * batch]

    def step(c, idx):
      p, s = c
      grads = jax.grad(loss_fn)(p, xs[idx], ys[idx])
      updates, s = tx.update(grads, s, p)
      return (optax.apply_updates(p, updates), s), None

    (p, s), _ = jax.lax.scan(step, (p, s), order.reshape(steps_per_epoch, batch))
    return (p, s), _accuracy(tx_test @ p['w'] + p['b'], ty_test)

  (params, _), (top1, top5) = jax.lax.scan(epoch, (params, opt_state), jnp.arange(settings.epochs))
  top1, top5 = np.asarray(top1), np.asarray(top5)
  best = int(np.argmax(top1))
  return {'top1': float(top1[-1]), 'top5': float(top5[-1]), 'best_top1': float(top1[best]),
          'best_epoch': best + 1, 'curve': top1.tolist()}


def lowshot_indices(labels: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
  """round(fraction x count) examples of every class (at least 1), drawn with a seeded generator."""
  rng = np.random.default_rng([seed, int(round(fraction * 1e6))])
  chosen = []
  for c in np.unique(labels):
    members = np.flatnonzero(labels == c)
    take = max(1, int(round(fraction * len(members))))
    chosen.append(np.sort(rng.choice(members, take, replace=False)))
  return np.sort(np.concatenate(chosen))


def indices_from_split_file(path: str, names: Sequence[str]) -> np.ndarray:
  """A SimCLRv2 subset file (one image file name per line) -> indices into `names` (file names)."""
  wanted = [line.strip() for line in pathlib.Path(path).read_text().splitlines() if line.strip()]
  position = {pathlib.Path(name).name: i for i, name in enumerate(names)}
  missing = [w for w in wanted if w not in position]
  if missing:
    raise ValueError(f'{len(missing)} files of the split file {path} are not in the training source '
                     f'(e.g. {missing[0]}); point it at the matching ImageFolder.')
  return np.sort(np.asarray([position[w] for w in wanted]))


def logistic_regression(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                        lambdas: Sequence[float] = (0.01, 0.1, 1.0)) -> dict:
  """{'top1' (best lambda), 'lambda', 'per_lambda'}: L2-normalised features, no intercept.

  `lambdas` are lambda x n_train: cyanure's objective (1/n) sum loss + (lambda/2)|w|^2 is scikit-learn's
  with C = 1/(lambda n)."""
  from sklearn.linear_model import LogisticRegression
  normalise = lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
  train_x, test_x = normalise(train_x), normalise(test_x)
  per_lambda = {}
  for lam in lambdas:
    model = LogisticRegression(C=1.0 / lam, fit_intercept=False, max_iter=1000)
    model.fit(train_x, train_y)
    per_lambda[lam] = float(100.0 * np.mean(model.predict(test_x) == test_y))
  best = max(per_lambda, key=per_lambda.get)
  return {'top1': per_lambda[best], 'lambda': best, 'per_lambda': per_lambda}


def lowshot(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
            fractions: Sequence[float] = (0.01, 0.1), seed: int = 0,
            split_files: Optional[dict[float, str]] = None, names: Optional[Sequence[str]] = None) -> dict:
  """Low-shot top-1 per label fraction (lambda in {0.01, 0.1, 1}/n_train, i.e. C = 1/(lambda n))."""
  results = {}
  for fraction in fractions:
    if split_files and fraction in split_files:
      if names is None:
        raise ValueError('SimCLRv2 split files need an ImageFolder training source (file names).')
      idx = indices_from_split_file(split_files[fraction], names)
    else:
      idx = lowshot_indices(train_y, fraction, seed)
    result = logistic_regression(train_x[idx], train_y[idx], test_x, test_y)
    results[f'{fraction:g}'] = {**result, 'examples': len(idx)}
  return results


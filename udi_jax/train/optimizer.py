"""The official optimiser as an optax chain (docs/method.md §5, golden `udi_golden_optim`).

    per-tensor clipping at 3.0  ->  AdamW, per group:  'rest'        Adam, decay, -lr
                                                       'last_layer'  the same, frozen in epoch 0

- Clipping: g <- g * 3/(||g|| + 1e-6) when that factor is < 1, for each parameter tensor (the torch tensor
  boundaries: fused qkv, both class tokens in one tensor, weight_g and weight_v apart), before the freeze.
- Weight decay is decoupled (p <- p - lr*wd*p, then the Adam step) and only on the official decay group:
  tensors of more than one dimension that are not biases (cls_token, pos_embed and the head's g included).
- While frozen, the last layer gets no update, no decay and no moment change, and its Adam count does not
  advance: its own count starts when it unfreezes, as torch's per-tensor count does.
- lr, weight decay and the freeze are read from the global step, passed as the `step` extra argument
  (docs/design.md, contract 6), never from the optimiser's own counters.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

CLIP_EPS = 1e-6


def _leaf_name(path) -> str:
  last = path[-1]
  return str(getattr(last, 'key', getattr(last, 'name', last)))


def in_decay_group(path, param) -> bool:
  """Official `get_params_groups`: decay when the tensor has ndim > 1 and is not a bias."""
  return param.ndim > 1 and _leaf_name(path) != 'bias'


def group_labels(params):
  """'last_layer' for the weight-normed last layer of the head(s), 'rest' otherwise."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: 'last_layer' if any('last_layer' == str(getattr(k, 'key', k)) for k in path)
      else 'rest', params)


def clip_per_tensor(max_norm: float) -> optax.GradientTransformation:
  def update(updates, state, params=None):
    del params
    def clip(g):
      norm = jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float32))))
      return g * jnp.minimum(1.0, max_norm / (norm + CLIP_EPS)).astype(g.dtype)
    return jax.tree.map(clip, updates), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def decoupled_weight_decay(weight_decay: Callable) -> optax.GradientTransformationExtraArgs:
  """u <- u + wd(step) * p on the decay group."""
  def update(updates, state, params, *, step, **extra):
    del extra
    wd = weight_decay(step)
    decayed = jax.tree_util.tree_map_with_path(
        lambda path, u, p: u + wd * p if in_decay_group(path, p) else u, updates, params)
    return decayed, state
  return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)


def scale_by_step_lr(learning_rate: Callable) -> optax.GradientTransformationExtraArgs:
  """u <- -lr(step) * u."""
  def update(updates, state, params=None, *, step, **extra):
    del params, extra
    lr = learning_rate(step)
    return jax.tree.map(lambda u: -lr * u, updates), state
  return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)


def frozen_until(inner: optax.GradientTransformation, trainable: Callable) -> optax.GradientTransformationExtraArgs:
  """While `trainable(step)` is False: zero updates and the inner state left exactly as it was."""
  inner = optax.with_extra_args_support(inner)

  def update(updates, state, params=None, *, step, **extra):
    new_updates, new_state = inner.update(updates, state, params, step=step, **extra)
    on = trainable(step)
    new_updates = jax.tree.map(lambda u: jnp.where(on, u, jnp.zeros_like(u)), new_updates)
    new_state = jax.tree.map(lambda n, o: jnp.where(on, n, o), new_state, state)
    return new_updates, new_state
  return optax.GradientTransformationExtraArgs(inner.init, update)


class OptimizerSettings(NamedTuple):
  clip_grad: float = 3.0
  clip_mode: str = 'per_tensor'      # or 'global'
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8

  @classmethod
  def from_config(cls, config) -> 'OptimizerSettings':
    o = config.optim
    if o.clip_mode not in ('per_tensor', 'global'):
      raise ValueError(f"config.optim.clip_mode={o.clip_mode!r} is not known; use 'per_tensor' (official) "
                       "or 'global'.")
    return cls(clip_grad=o.clip_grad, clip_mode=o.clip_mode)


def make_optimizer(settings: OptimizerSettings, learning_rate: Callable, weight_decay: Callable,
                   last_layer_trainable: Callable) -> optax.GradientTransformationExtraArgs:
  """The chain; call `update(grads, state, params, step=global_step)`."""
  def adamw():
    return optax.chain(optax.scale_by_adam(settings.b1, settings.b2, settings.eps),
                       decoupled_weight_decay(weight_decay), scale_by_step_lr(learning_rate))

  clip = []
  if settings.clip_grad > 0:
    clip = [clip_per_tensor(settings.clip_grad) if settings.clip_mode == 'per_tensor'
            else optax.clip_by_global_norm(settings.clip_grad)]
  groups = optax.partition({'rest': adamw(), 'last_layer': frozen_until(adamw(), last_layer_trainable)},
                           group_labels)
  return optax.chain(*clip, groups)

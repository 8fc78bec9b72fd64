"""Learning rate, weight decay, teacher momentum and teacher temperature as functions of the step.

The official `utils.cosine_scheduler` (docs/method.md §5), evaluated from the traced global step instead of a
precomputed table: a linear warm-up `linspace(0, base, W)` that includes both ends (so the base value
appears at steps W-1 and W), then `final + (base - final)(1 + cos(pi (t - W)/(T - W)))/2` for t >= W,
which never quite reaches `final`. The teacher temperature is indexed by EPOCH:
`linspace(warm, final, We)[e]` for e < We, then `final`.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp


def cosine_schedule(step, base: float, final: float, total_steps: int, warmup_steps: int = 0,
                    warmup_start: float = 0.0):
  """Official `cosine_scheduler` at `step` (int or traced int), float32."""
  t = jnp.asarray(step, jnp.float32)
  cosine_len = max(total_steps - warmup_steps, 1)
  phase = jnp.maximum(t - warmup_steps, 0.0) / cosine_len
  cosine = final + 0.5 * (base - final) * (1.0 + jnp.cos(jnp.pi * phase))
  if warmup_steps <= 0:
    return cosine
  ramp = warmup_start + (base - warmup_start) * t / max(warmup_steps - 1, 1)
  if warmup_steps == 1:
    ramp = jnp.full_like(t, warmup_start)
  return jnp.where(t < warmup_steps, ramp, cosine)


def linear_then_constant(index, start: float, final: float, ramp_len: int):
  """`concatenate(linspace(start, final, ramp_len), final...)[index]`, float32."""
  i = jnp.asarray(index, jnp.float32)
  if ramp_len <= 1:
    return jnp.where(i < ramp_len, start, final) if ramp_len == 1 else jnp.full_like(i, final)
  return jnp.where(i < ramp_len, start + (final - start) * i / (ramp_len - 1), final)


@dataclasses.dataclass(frozen=True)
class Schedules:
  """All schedules of a run, from its config and its number of steps per epoch."""
  steps_per_epoch: int
  epochs: int
  lr: float                 # peak, already scaled by batch/256
  min_lr: float
  warmup_epochs: int
  weight_decay: float
  weight_decay_end: float
  momentum_teacher: float
  warmup_teacher_temp: float
  teacher_temp: float
  warmup_teacher_temp_epochs: int
  freeze_last_layer_epochs: int
  momentum_teacher_end: float = 1.0      # where the EMA's cosine ends (official: 1)

  def __post_init__(self):
    if self.epochs <= 0:
      raise ValueError(f'config.epochs={self.epochs} must be positive.')
    if self.warmup_epochs > self.epochs:
      raise ValueError(f'config.optim.warmup_epochs={self.warmup_epochs} exceeds config.epochs={self.epochs}; '
                       'shorten the warm-up.')
    if not 0 <= self.momentum_teacher <= 1 or not 0 <= self.momentum_teacher_end <= 1:
      raise ValueError(f'The teacher momentum (config.udi.momentum_teacher={self.momentum_teacher}, '
                       f'momentum_teacher_end={self.momentum_teacher_end}) must lie in [0, 1].')
    if self.teacher_temp <= 0 or self.warmup_teacher_temp <= 0:
      raise ValueError(f'The teacher temperatures (config.udi.warmup_teacher_temp={self.warmup_teacher_temp}, '
                       f'teacher_temp={self.teacher_temp}) must be positive.')

  @classmethod
  def from_config(cls, config, steps_per_epoch: int) -> 'Schedules':
    o, u = config.optim, config.udi
    return cls(steps_per_epoch=steps_per_epoch, epochs=config.epochs,
               lr=o.lr * config.batch_size / 256.0, min_lr=o.min_lr, warmup_epochs=o.warmup_epochs,
               weight_decay=o.weight_decay, weight_decay_end=o.weight_decay_end,
               momentum_teacher=u.momentum_teacher, warmup_teacher_temp=u.warmup_teacher_temp,
               teacher_temp=u.teacher_temp, warmup_teacher_temp_epochs=u.warmup_teacher_temp_epochs,
               freeze_last_layer_epochs=o.freeze_last_layer_epochs, momentum_teacher_end=u.momentum_teacher_end)

  @property
  def total_steps(self) -> int:
    return self.epochs * self.steps_per_epoch

  def learning_rate(self, step):
    return cosine_schedule(step, self.lr, self.min_lr, self.total_steps,
                           self.warmup_epochs * self.steps_per_epoch)

  def weight_decay_at(self, step):
    return cosine_schedule(step, self.weight_decay, self.weight_decay_end, self.total_steps)

  def momentum(self, step):
    return cosine_schedule(step, self.momentum_teacher, self.momentum_teacher_end, self.total_steps)

  def epoch(self, step):
    return jnp.asarray(step) // self.steps_per_epoch

  def teacher_temperature(self, step):
    return linear_then_constant(self.epoch(step), self.warmup_teacher_temp, self.teacher_temp,
                                self.warmup_teacher_temp_epochs)

  def last_layer_trainable(self, step):
    return jnp.asarray(step) >= self.freeze_last_layer_epochs * self.steps_per_epoch

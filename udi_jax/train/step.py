"""One training step: written once as per-device code, mapped with shard_map (default) or pmap.

Per device (docs/design.md, one training step): the crops cut from the canvases when the geometry runs
on the device (`data/device_crops.py`), photometric augmentation of the uint8 crops, stratified
sampling and correspondences from the boxes, the objective (teacher once, student, three levels), the
gradient of this device's share of the loss summed over devices, the optimiser (per-tensor clipping,
AdamW, frozen last layer), the EMA teacher and the new centres. Every random draw is folded from
(seed, step, example index) (docs/design.md, contract 2), so the result does not depend on the device count.

The body takes gradients itself and sums them with `psum`; the shard_map therefore runs with
`check_vma=False` (with it on, JAX would already sum the gradient of replicated params and the explicit
psum would double it). Tests compare the gradients of 1 device, 8 devices and pmap at every step.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from udi_jax import rng
from udi_jax.data import device_crops, geometric, photometric
from udi_jax.data.crops import CropSettings
from udi_jax.mesh import DATA_AXIS
from udi_jax.method.objective import ObjectiveSettings, udi_objective
from udi_jax.method.sampling import SamplingSettings, draw_samples
from udi_jax.method.schedules import Schedules
from udi_jax.models.networks import PATCH, Networks, build_networks
from udi_jax.train.optimizer import OptimizerSettings, make_optimizer
from udi_jax.train.state import TrainState

PARALLEL = ('shard_map', 'pmap')


@dataclasses.dataclass(frozen=True)
class Trainer:
  """Everything static that a step needs."""
  nets: Networks
  objective: ObjectiveSettings
  sampling: SamplingSettings
  schedules: Schedules
  tx: optax.GradientTransformationExtraArgs
  seed: int
  photometric: Optional[photometric.PhotometricSettings] = photometric.PhotometricSettings()
  crop_sizes: Optional[tuple[int, int]] = None   # (global, local) sides: cut from 'canvas' on the device
  geometric: Optional[geometric.GeometricSettings] = None   # small turns and shifts (off: the released recipe)

  @classmethod
  def from_config(cls, config, steps_per_epoch: int) -> 'Trainer':
    """Every setting of a step from the config; each refuses its own impossible values (ValueError)."""
    schedules = Schedules.from_config(config, steps_per_epoch)
    tx = make_optimizer(OptimizerSettings.from_config(config), schedules.learning_rate,
                        schedules.weight_decay_at, schedules.last_layer_trainable)
    augment = photometric.PhotometricSettings.from_config(config) if config.data.augment else None
    crops = CropSettings.from_config(config)
    turns = geometric.GeometricSettings.from_config(config)
    return cls(nets=build_networks(config), objective=ObjectiveSettings.from_config(config),
               sampling=SamplingSettings.from_config(config), schedules=schedules, tx=tx, seed=config.seed,
               photometric=augment,
               crop_sizes=(crops.global_size, crops.local_size) if crops.canvas_size else None,
               geometric=turns if turns.active else None)


def _crop_keys(keys: jax.Array, first_crop: int, views: int) -> jax.Array:
  """Keys (B * V,): crop v of example b draws from fold_in(key_b, first_crop + v)."""
  return jax.vmap(lambda k: jax.vmap(lambda v: jax.random.fold_in(k, first_crop + v))(
      jnp.arange(views)))(keys).reshape(-1)


def _augment(images: jax.Array, keys: dict[str, jax.Array], first_crop: int, t: 'Trainer') -> jax.Array:
  """uint8 (B, V, H, W, 3) -> float (B, V, H, W, 3): turns and shifts if asked, then the photometric ops."""
  batch, views = images.shape[:2]
  flat = images.reshape((batch * views,) + images.shape[2:])
  if t.geometric is not None:
    flat = geometric.augment(flat, _crop_keys(keys['geometric'], first_crop, views), t.geometric)
  if t.photometric is None:
    return photometric.preprocess(flat).reshape(images.shape)
  return photometric.augment(flat, _crop_keys(keys['photometric'], first_crop, views),
                             t.photometric).reshape(images.shape)


def global_norm(tree) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def step_body(t: Trainer, state: TrainState, batch: dict[str, jax.Array],
              axis_name: Optional[str] = None) -> tuple[TrainState, dict[str, Any]]:
  gsum = (lambda x: jax.lax.psum(x, axis_name)) if axis_name else (lambda x: x)
  keys = rng.example_keys(t.seed, state.step, batch['index'])
  augment_keys = {name: rng.stream(keys, name) for name in ('geometric', 'photometric')}
  if t.crop_sizes is None:
    pixels_global, pixels_local = batch['global'], batch['local']
  else:
    pixels_global, pixels_local = device_crops.cut_batch(batch['canvas'], batch['windows'], *t.crop_sizes)
  crops_global = _augment(pixels_global, augment_keys, 0, t)
  crops_local = _augment(pixels_local, augment_keys, 2, t) if pixels_local.shape[1] else None
  samples = (draw_samples(batch['boxes'], rng.stream(keys, 'sampling'), t.sampling)
             if PATCH in t.nets.levels else None)
  temperature = t.schedules.teacher_temperature(state.step)

  def loss_fn(student):
    return udi_objective(t.nets, t.objective, student, state.teacher, state.centres, crops_global,
                         crops_local, samples, temperature, drop_path_keys=rng.stream(keys, 'drop_path'),
                         axis_name=axis_name)

  (_, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.student)
  grads = gsum(grads)
  updates, opt = t.tx.update(grads, state.opt, state.student, step=state.step)
  student = optax.apply_updates(state.student, updates)
  momentum = t.schedules.momentum(state.step)
  teacher = jax.tree.map(lambda p_t, p_s: p_t * momentum + (1.0 - momentum) * p_s, state.teacher, student)

  metrics = {'loss': out.loss,
             **{f'loss/{k}': v for k, v in out.levels.items()},
             **{f'loss/{k}': v for k, v in out.components.items()},
             **out.metrics,
             **{f'centre_norm/{k}': jnp.linalg.norm(v) for k, v in out.centres.items()},
             'lr': t.schedules.learning_rate(state.step), 'weight_decay': t.schedules.weight_decay_at(state.step),
             'momentum': momentum, 'teacher_temp': temperature,
             'grad_norm': global_norm(grads), 'update_norm': global_norm(updates),
             'param_norm': global_norm(student),
             'skipped_images': gsum(jnp.sum(batch['skipped'])) if 'skipped' in batch else jnp.zeros(())}
  new_state = TrainState(step=state.step + 1, student=student, teacher=teacher, opt=opt, centres=out.centres)
  return new_state, metrics


def make_train_step(t: Trainer, mesh: Mesh, parallel: str = 'shard_map', donate: bool = True):
  """(state, batch) -> (state, metrics). `batch` holds global arrays sharded on `data` (shard_map) or
  this process's rows (pmap, one process)."""
  if parallel not in PARALLEL:
    raise ValueError(f'config.parallel={parallel!r} is not known; use one of {PARALLEL}.')
  body = functools.partial(step_body, t, axis_name=DATA_AXIS)
  if parallel == 'shard_map':
    mapped = jax.shard_map(body, mesh=mesh, in_specs=(P(), P(DATA_AXIS)), out_specs=(P(), P()),
                           check_vma=False)
    return jax.jit(mapped, donate_argnums=(0,) if donate else ())
  devices = mesh.devices.size
  pmapped = jax.pmap(body, axis_name=DATA_AXIS, in_axes=(None, 0), out_axes=(None, None),
                     devices=list(mesh.devices.flat))

  def run(state, batch):
    split = {k: np.asarray(v).reshape((devices, -1) + v.shape[1:]) for k, v in batch.items()}
    return pmapped(state, split)
  return run

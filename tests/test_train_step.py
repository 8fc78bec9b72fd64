"""The compiled training step: 8 devices, 1 device and pmap agree step by step; bf16 tracks fp32.

Real bundled images through the real pipeline; drop path, stratified sampling and photometric
augmentation on. Gradients are compared at every step, not only parameters: AdamW would hide a gradient
summed twice across devices. They are read from the optimiser state of a pass-through transformation
chained in front of the real optimiser (`helpers.keep_gradients`).
"""

import dataclasses

import jax
import numpy as np
import optax
import pytest
from absl import flags

from tests import tiny_train_config
from tests.helpers import compare_student, keep_gradients, rel
from udi_jax.data.pipeline import InputPipeline, settings_from_config
from udi_jax.data.sources import training_source
from udi_jax.mesh import batch_sharding, data_mesh
from udi_jax.train.state import create_state
from udi_jax.train.step import Trainer, make_train_step

flags.FLAGS.mark_as_parsed()
STEPS = 3           # compared across devices
BF16_STEPS = 20     # bf16 against fp32
DEVICE_CROP_STEPS = 8   # crops cut on the device against host crops


def config_of_20_steps():
  config = tiny_train_config.get_config()
  config.epochs = 5              # 4 steps per epoch
  return config


def run(config, devices, parallel, steps):
  """(the state after each step, per-step metrics, per-step summed gradients) of `steps` steps."""
  source = training_source(config)
  pipe = InputPipeline(source, settings_from_config(config), num_steps=steps, process_index=0,
                       process_count=1)
  trainer = Trainer.from_config(config, len(source) // config.batch_size)
  trainer = dataclasses.replace(trainer, tx=optax.chain(keep_gradients(), trainer.tx))
  mesh = data_mesh(devices)
  state = create_state(trainer.nets, trainer.tx, jax.random.key(config.seed), mesh)
  step = make_train_step(trainer, mesh, parallel, donate=False)
  states, history, grads = [], [], []
  for batch in pipe:
    if parallel == 'shard_map':
      batch = {k: jax.device_put(v, batch_sharding(mesh)) for k, v in batch.items()}
    state, metrics = step(state, batch)
    states.append(jax.device_get(state))
    history.append(jax.device_get(metrics))
    grads.append(states[-1].opt[0].grads)
  return states, history, grads


@pytest.fixture(scope='module')
def one_device():
  """20 fp32 steps on one device; the first 3 are the reference of the device comparison."""
  return run(config_of_20_steps(), jax.devices()[:1], 'shard_map', BF16_STEPS)


@pytest.mark.parametrize('parallel', ['shard_map', 'pmap'])
def test_eight_devices_equal_one_device_at_every_step(one_device, parallel):
  config = config_of_20_steps()
  states, history, grads = run(config, jax.devices(), parallel, STEPS)
  state = states[-1]
  ref_states, ref_history, ref_grads = one_device
  ref_state = ref_states[STEPS - 1]
  worst = {'loss': 0.0, 'grad': 0.0, 'param': 0.0}
  for got, want, got_grads, want_grads in zip(history, ref_history, grads, ref_grads):
    worst['loss'] = max(worst['loss'], rel(got['loss'], want['loss']))
    worst['grad'] = max(worst['grad'], max(jax.tree.leaves(jax.tree.map(rel, got_grads, want_grads))))
    assert got['loss/patch'] == pytest.approx(want['loss/patch'], rel=1e-5)
  worst['param'], key_bias_grad = compare_student(state.student, ref_state.student, ref_grads[:STEPS])
  # The teacher (an EMA started from the student) is compared on the scale of the whole tree: per tensor
  # it is ill-conditioned early on, e.g. the attention key bias, whose true gradient is exactly zero
  # (softmax is invariant to it), holds only rounding noise of size ~1e-9 in both runs.
  for name in ('teacher', 'centres'):
    diff = max(jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()),
                                            getattr(state, name), getattr(ref_state, name))))
    scale = max(jax.tree.leaves(jax.tree.map(lambda b: float(np.abs(b).max()), getattr(ref_state, name))))
    worst[name] = diff / scale
  print(f'{parallel} on 8 devices vs 1 device over {STEPS} steps, worst relative errors: {worst}, '
        f'key-bias gradient / q,v gradient: {key_bias_grad:.1e}')
  assert key_bias_grad <= 1e-4
  assert max(worst.values()) <= 1e-5
  assert int(state.step) == STEPS
  # The last layer is frozen in epoch 0: its student values have not moved.
  trainer = Trainer.from_config(config, 4)
  init = create_state(trainer.nets, trainer.tx, jax.random.key(config.seed), data_mesh(jax.devices()[:1]))
  np.testing.assert_array_equal(state.student['head']['last_layer']['weight_v'],
                                init.student['head']['last_layer']['weight_v'])


def test_bfloat16_tracks_float32_over_20_steps(one_device):
  config = config_of_20_steps()
  config.model.dtype = 'bfloat16'
  _, bf16, _ = run(config, jax.devices()[:1], 'shard_map', BF16_STEPS)
  _, fp32, _ = one_device
  losses32 = np.array([m['loss'] for m in fp32])
  losses16 = np.array([m['loss'] for m in bf16])
  assert len(losses16) == len(losses32) == BF16_STEPS and np.all(np.isfinite(losses16))
  gap = np.abs(losses16 - losses32) / losses32
  print(f'bf16 vs fp32 loss over {BF16_STEPS} steps: max relative gap {gap.max():.4f}')
  assert gap.max() <= 0.02


def test_crops_cut_on_the_device_track_host_crops(one_device):
  """The same boxes, flips and randomness; only the resampling moves from PIL to the step (mean 0.03 of
  255 apart on these digits, tests/test_device_crops.py): the loss follows the host-crop run."""
  config = config_of_20_steps()
  config.data.crops_on = 'device'
  _, device, _ = run(config, jax.devices()[:1], 'shard_map', DEVICE_CROP_STEPS)
  _, host, _ = one_device
  gap = np.array([abs(d['loss'] - h['loss']) / h['loss'] for d, h in zip(device, host)])
  print(f'device vs host crops, loss over {DEVICE_CROP_STEPS} steps: max relative gap {gap.max():.2e}')
  assert Trainer.from_config(config, 4).crop_sizes == (16, 8)      # the step cut them from canvases
  assert len(gap) == DEVICE_CROP_STEPS and 0 < gap.max() <= 1e-3

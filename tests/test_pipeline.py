"""The host pipeline's contracts (docs/design.md, contracts 1–4): global batches, per-example randomness,
resumable state."""

import dataclasses

import jax
import ml_collections
import numpy as np
import pytest
from absl import flags

from udi_jax.data import sources
from udi_jax.data.crops import CropSettings
from udi_jax.data.pipeline import InputPipeline, PipelineSettings, batch_shapes
from udi_jax.mesh import batch_sharding, data_mesh

flags.FLAGS.mark_as_parsed()
CROPS = CropSettings(global_size=16, local_size=8, num_local=3)


@pytest.fixture(scope='module')
def digits():
  return sources.open_source('digits:train')    # 1 438 images: 89 steps of 16 per epoch


def run(source, steps, seed=0, batch=16, start=0, **kwargs):
  pipe = InputPipeline(source, PipelineSettings(seed=seed, global_batch=batch, crops=CROPS), num_steps=steps,
                       start_step=start, **kwargs)
  return [b for b in pipe]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_two_processes_feed_the_rows_of_one(digits):
  """Process p builds rows [p*B/P, (p+1)*B/P) of the same global batch: crops and boxes included."""
  one = run(digits, 3, process_index=0, process_count=1)
  halves = [run(digits, 3, process_index=p, process_count=2) for p in (0, 1)]
  joined = [{k: np.concatenate([h0[k], h1[k]]) for k in h0} for h0, h1 in zip(*halves)]
  assert_batches_equal(joined, one)


def test_same_seed_same_batches_and_epochs_are_permutations(digits):
  steps_per_epoch = len(digits) // 16
  first = run(digits, steps_per_epoch + 2, process_index=0, process_count=1)
  again = run(digits, 3, process_index=0, process_count=1)
  assert_batches_equal(first[:3], again)
  other = run(digits, 1, seed=1, process_index=0, process_count=1)
  assert not np.array_equal(other[0]['index'], first[0]['index'])
  epoch0 = np.concatenate([b['index'] for b in first[:steps_per_epoch]])
  assert len(set(epoch0.tolist())) == len(epoch0)          # no repeats within an epoch
  epoch1 = first[steps_per_epoch]['index']
  assert not np.array_equal(epoch1, first[0]['index'])     # a new permutation each epoch
  np.testing.assert_array_equal(first[0]['label'], digits.labels[first[0]['index']])


def test_restored_iterator_continues_with_the_next_batch(digits):
  """Across an epoch boundary, and into a pipeline split over another number of processes."""
  steps_per_epoch = len(digits) // 16
  settings = PipelineSettings(seed=3, global_batch=16, crops=CROPS)
  total = steps_per_epoch + 3
  full = run(digits, total, seed=3, process_index=0, process_count=1)
  pipe = InputPipeline(digits, settings, num_steps=total, process_index=0, process_count=1)
  for _ in range(steps_per_epoch - 1):
    next(pipe)
  state = pipe.get_state()
  assert state == {'seed': 3, 'global_batch': 16, 'num_examples': len(digits),
                   'step': steps_per_epoch - 1, 'epoch': 0}
  resumed = InputPipeline(digits, settings, num_steps=total, process_index=1, process_count=2)
  resumed.set_state(state)
  rest = list(resumed)
  assert len(rest) == 4
  for got, want in zip(rest, full[steps_per_epoch - 1:]):
    np.testing.assert_array_equal(got['global'], want['global'][8:])
    np.testing.assert_array_equal(got['boxes'], want['boxes'][8:])
  with pytest.raises(ValueError, match='global_batch=16'):
    InputPipeline(digits, PipelineSettings(seed=3, global_batch=32, crops=CROPS), num_steps=2,
                  process_index=0, process_count=1).set_state(state)


def test_worker_processes_give_the_same_batches(digits):
  settings = PipelineSettings(seed=0, global_batch=16, crops=CROPS, num_workers=2, num_threads=1)
  pipe = InputPipeline(digits, settings, num_steps=3, process_index=0, process_count=1)
  with_workers = list(pipe)
  pipe.close()
  assert_batches_equal(with_workers, run(digits, 3, process_index=0, process_count=1))


def test_batches_become_global_arrays_sharded_on_data(digits):
  """Placed on the devices two batches ahead (the default), the same batches in order; the saved step
  counts the batches handed out, so a resume repeats none and skips none."""
  sharding = batch_sharding(data_mesh())
  host = run(digits, 4)
  pipe = InputPipeline(digits, PipelineSettings(seed=0, global_batch=16, crops=CROPS), num_steps=4,
                       sharding=sharding)
  first = next(pipe)
  assert first['global'].shape == (16, 2, 16, 16, 3) and first['global'].sharding == sharding
  assert len(first['boxes'].addressable_shards) == 8
  assert len(pipe._placed) == 2 and pipe.get_state()['step'] == 1
  resumed = InputPipeline(digits, PipelineSettings(seed=0, global_batch=16, crops=CROPS, device_prefetch=0),
                          num_steps=4, sharding=sharding)
  resumed.set_state(pipe.get_state())
  for placed, want in zip([first, *pipe], host):
    assert_batches_equal([jax.tree.map(np.asarray, placed)], [want])
  assert_batches_equal([jax.tree.map(np.asarray, b) for b in resumed], host[1:])


def test_batch_schema(digits):
  """Host crops, and the canvas form when the device cuts them: the same boxes, index and labels."""
  host = run(digits, 1)[0]
  expect = {'global': ((16, 2, 16, 16, 3), np.uint8), 'local': ((16, 3, 8, 8, 3), np.uint8),
            'boxes': ((16, 5, 4), np.float32), 'index': ((16,), np.int32), 'label': ((16,), np.int32),
            'skipped': ((16,), np.int32)}
  assert {k: (v.shape, v.dtype) for k, v in host.items()} == expect
  config = ml_collections.ConfigDict({'data': {'global_size': 16, 'local_size': 8, 'num_local': 3,
                                               'crops_on': 'host', 'canvas_size': 12}})
  assert batch_shapes(config, 16) == expect        # the schema as the abstract (lowering) inputs use it

  pipe = InputPipeline(digits, PipelineSettings(seed=0, global_batch=16, crops=dataclasses.replace(
      CROPS, canvas_size=12)), num_steps=1)
  device = next(pipe)
  config.data.crops_on = 'device'
  assert {k: (v.shape, v.dtype) for k, v in device.items()} == batch_shapes(config, 16)
  assert device['canvas'].shape == (16, 12, 12, 3) and device['windows'].shape == (16, 5, 5)
  for key in ('boxes', 'index', 'label', 'skipped'):
    np.testing.assert_array_equal(device[key], host[key], err_msg=key)
  # The 8x8 digits sit top-left, unscaled; windows are the boxes in pixels, with the flips.
  assert np.all(device['canvas'][:, 8:] == 0) and np.all(device['canvas'][:, :, 8:] == 0)
  flipped = device['boxes'][..., 1] > device['boxes'][..., 3]
  np.testing.assert_array_equal(device['windows'][..., 4] == 1, flipped)
  np.testing.assert_allclose(device['windows'][..., 0], device['boxes'][..., 0] * 7, atol=1e-5)


def test_too_small_dataset_or_uneven_batch_is_refused(digits):
  with pytest.raises(ValueError, match='fewer than one global batch'):
    run(digits, 1, batch=4096, process_index=0, process_count=1)
  with pytest.raises(ValueError, match='does not split over 3 processes'):
    run(digits, 1, batch=16, process_index=0, process_count=3)

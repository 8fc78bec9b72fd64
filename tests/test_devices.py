"""The objective on 8 simulated devices equals the 1-device value, with per-example randomness on.

Drop path (student) and the stratified sampling draw from keys folded from the global example index
(docs/design.md, contract 2); losses, centres and metrics are pooled with psum (docs/method.md §8.3, §8.8). Gradients:
each device differentiates its share of the loss, and the shares' gradients sum to the global gradient.
Tolerances: float32 summation order only (relative 1e-5 for losses and centres, 1e-4 for gradients).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from tests.helpers import centre_table, init_params, max_rel, perturbed_teacher, random_batch, rel, tiny_config
from udi_jax import rng
from udi_jax.interop.official import centres_from_official
from udi_jax.mesh import data_mesh
from udi_jax.method.objective import ObjectiveSettings, udi_objective
from udi_jax.method.sampling import SamplingSettings, draw_samples
from udi_jax.models.networks import build_networks

BATCH = 16


@pytest.fixture(scope='module')
def setup():
  assert jax.device_count() == 8, 'tests/conftest.py sets 8 simulated CPU devices'
  config = tiny_config(num_local=2)
  config.model.drop_path_rate = 0.3
  nets = build_networks(config)
  student = init_params(nets)
  teacher = perturbed_teacher(student)
  crops_global, crops_local, boxes = random_batch(config, BATCH, seed=5)
  table = centre_table(config.model.out_dim)
  centres = centres_from_official(table, nets.levels)
  index = np.arange(100, 100 + BATCH, dtype=np.int32)           # global example indices

  def per_device(student, centres, crops_global, crops_local, boxes, index, axis_name=None):
    keys = rng.example_keys(0, 7, index)
    samples = draw_samples(boxes, rng.stream(keys, 'sampling'), SamplingSettings.from_config(config))
    loss = lambda s: udi_objective(nets, ObjectiveSettings.from_config(config), s, teacher, centres,
                                   crops_global, crops_local, samples, 0.05,
                                   drop_path_keys=rng.stream(keys, 'drop_path'), axis_name=axis_name)
    (_, out), grads = jax.value_and_grad(loss, has_aux=True)(student)
    # Targets are per-example rows, view-major (2B, K): split off the view axis so that the batch
    # axis can be gathered over devices; everything else in `out` is pooled (replicated).
    targets = {k: v.reshape(2, -1, v.shape[-1]) for k, v in out.targets.items()}
    return dataclasses.replace(out, targets={}), targets, grads

  inputs = (student, centres, crops_global, crops_local, boxes, index)
  single = jax.jit(per_device)(*inputs)
  return per_device, inputs, single


def assert_same(result, single):
  (out, targets, grads), (ref, ref_targets, ref_grads) = result, single
  assert rel(out.loss, ref.loss) <= 1e-5
  assert sorted(targets) == sorted(ref_targets) == ['cls', 'cls_plus']
  for k in ref_targets:
    assert rel(targets[k], ref_targets[k]) <= 1e-5, k
  for tree, ref_tree in ((out.components, ref.components), (out.levels, ref.levels),
                         (out.metrics, ref.metrics)):
    for k in ref_tree:
      assert rel(tree[k], ref_tree[k]) <= 1e-5, k
  for k in ref.centres:
    assert max_rel(out.centres[k], ref.centres[k]) <= 1e-5, k
  worst = max(jax.tree.leaves(jax.tree.map(rel, grads, ref_grads)))
  assert worst <= 1e-4, worst
  return worst


def test_shard_map_with_vma_equals_one_device(setup):
  """Default mapping: under check_vma the gradient w.r.t. replicated params is summed by JAX."""
  per_device, inputs, single = setup
  mesh = data_mesh()
  mapped = jax.jit(jax.shard_map(functools.partial(per_device, axis_name='data'), mesh=mesh,
                                 in_specs=(P(), P(), P('data'), P('data'), P('data'), P('data')),
                                 out_specs=(P(), P(None, 'data'), P())))
  print('shard_map worst gradient error', assert_same(mapped(*inputs), single))


def test_pmap_with_explicit_gradient_sum_equals_one_device(setup):
  per_device, inputs, single = setup

  def body(*args):
    out, targets, grads = per_device(*args, axis_name='data')
    return out, targets, jax.lax.psum(grads, 'data')

  student, centres, *batch = inputs
  split = [np.reshape(x, (8, -1) + x.shape[1:]) for x in batch]
  out, targets, grads = jax.pmap(body, axis_name='data', in_axes=(None, None, 0, 0, 0, 0))(
      student, centres, *split)
  first = lambda tree: jax.tree.map(lambda x: x[0], tree)
  # (device, view, B/8, K) -> (view, B, K), the order the 1-device run returns.
  targets = {k: jnp.moveaxis(v, 0, 1).reshape(2, BATCH, -1) for k, v in targets.items()}
  print('pmap worst gradient error', assert_same((first(out), targets, first(grads)), single))


def test_randomness_is_per_example(setup):
  """Samples and drop path of an example do not depend on the rest of the batch."""
  per_device, (student, centres, crops_global, crops_local, boxes, index), _ = setup
  config = tiny_config(num_local=2)
  keys = rng.example_keys(0, 7, index)
  settings = SamplingSettings.from_config(config)
  draw = jax.jit(lambda b, k: draw_samples(b, rng.stream(k, 'sampling'), settings))
  full, part = draw(boxes, keys), draw(boxes[3:5], keys[3:5])
  np.testing.assert_array_equal(full.student_idx[3:5], part.student_idx[:2])
  assert not np.array_equal(rng.stream(keys, 'sampling')[0], rng.stream(keys, 'drop_path')[0])
  other_step = rng.example_keys(0, 8, index)
  assert not np.array_equal(jax.random.key_data(keys), jax.random.key_data(other_step))

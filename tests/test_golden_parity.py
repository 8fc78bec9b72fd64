"""Parity with one training step of the official code (`udi_golden_small.npz`), float32, one device.

The golden crops and the official sampling maps are fed through the injectable `samples` argument; the
criteria are those of the golden README §3, verbatim.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import golden
from tests.helpers import max_rel, rel
from tests.reference_udi import reference_loss
from udi_jax.interop import official
from udi_jax.models.vit import resize_pos_embed


@pytest.fixture(scope='module')
def case():
  return golden.one_step_case()


@pytest.fixture(scope='module')
def result(case):
  return golden.one_step(case)


def test_loss_components_match_official(result, case):
  out, _ = result
  g = case['g']
  errors = {name: rel(out.components[ours], g[f'loss/{name}']) for ours, name in golden.COMPONENTS.items()}
  errors['total'] = rel(out.loss, g['loss/total'])
  print('relative loss errors:', errors)
  assert max(errors.values()) <= 1e-5, errors


def test_centres_match_official(result, case):
  out, _ = result
  ref = case['g']['center_new']
  error = max_rel(official.centres_to_official(out.centres), ref)
  print('centres max|d| / max|ref|:', error)
  assert error <= 1e-5


def test_gradients_match_official(result, case):
  _, grads = result
  ours = official.to_official(grads)
  assert len(case['grad_names']) == 46
  worst = {}
  for name in case['grad_names']:
    got, ref = ours[name], case['g'][f'grad/{name}']
    worst[name] = (rel(got, ref), max_rel(got, ref))
    assert max(worst[name]) <= 1e-4, (name, worst[name])
  print('worst gradient errors (norm, max):', max(v[0] for v in worst.values()),
        max(v[1] for v in worst.values()))


def test_intermediates_match_official(case):
  """The forward pieces the golden README lists for localising a mismatch."""
  g, nets = case['g'], case['nets']
  student = case['student']
  pos = resize_pos_embed(jnp.asarray(student['backbone']['pos_embed']), 2, (6, 6))
  np.testing.assert_allclose(pos, g['inter/student_pos_embed_local'], atol=2e-7, rtol=0)
  views = jnp.concatenate([case['crops_global'][:, 0], case['crops_global'][:, 1]])
  out = nets.backbone.apply({'params': student['backbone']}, views)
  np.testing.assert_allclose(out.cls, g['inter/student_backbone_global_cls'], atol=2e-5, rtol=0)


def test_reference_implementation_matches_official(case):
  """The test-side straightforward form is itself checked against the official numbers."""
  g = case['g']
  maps = {k: jnp.asarray(v) for k, v in g.items() if k.startswith(('src_maps/', 'tgt_maps/'))}
  total, comps, table = jax.jit(lambda s: reference_loss(
      case['nets'], s, case['teacher'], g['center_init'], case['crops_global'], case['crops_local'],
      maps, case['teacher_temp']))(case['student'])
  assert rel(total, g['loss/total']) <= 1e-5
  for name, value in comps.items():
    assert rel(value, g[f'loss/{name}']) <= 1e-5, name
  assert max_rel(table, g['center_new']) <= 1e-5

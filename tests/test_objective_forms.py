"""The objective's exact rewrites equal the straightforward official form on random inputs.

Rewrites (docs/method.md §8.1, §8.6, §8.7): teacher backbone once with all read-out points in one call, cls+
targets and the patch centre in the 256-d bottleneck space, sparse bilinear read-out with unpacked rows.
The reference (`reference_udi.py`) runs the teacher twice, projects every read-out to K logits and uses
dense maps, as the official code does; it is itself checked against the golden numbers.
"""

import jax
import pytest

from tests.helpers import centre_table, draw, init_params, perturbed_teacher, random_batch, rel, tiny_config
from tests.reference_udi import official_maps, reference_loss
from udi_jax.interop.official import centres_from_official, centres_to_official
from udi_jax.method.objective import ObjectiveSettings, udi_objective
from udi_jax.models.networks import build_networks

NAMES = {'g_cls': 'g_cl', 'g_cls_plus': 'g_mcl', 'g_patch': 'g_pch', 'l_cls': 'l_cl', 'l_cls_plus': 'l_mcl'}


@pytest.mark.parametrize('num_cls_tokens', [2, 1])
def test_optimised_objective_equals_straightforward_form(num_cls_tokens):
  config = tiny_config(num_cls_tokens=num_cls_tokens)
  config.udi.alpha = 0.3
  nets = build_networks(config)
  batch, n_local = 3, config.data.num_local
  student = init_params(nets)
  teacher = perturbed_teacher(student)
  crops_global, crops_local, boxes = random_batch(config, batch)
  samples = draw(config, boxes)
  assert 0 < float(samples.student_mask.mean()) < 1                 # valid and invalid rows both occur
  table = centre_table(config.model.out_dim)
  centres = centres_from_official(table, nets.levels)
  settings = ObjectiveSettings.from_config(config)
  temp = 0.05

  def ours(s):
    return udi_objective(nets, settings, s, teacher, centres, crops_global, crops_local, samples, temp)

  maps = official_maps(samples, batch, n_local, 14, 6)

  def reference(s):
    return reference_loss(nets, s, teacher, table, crops_global, crops_local, maps, temp,
                          alpha=config.udi.alpha)

  (_, out), grads = jax.jit(jax.value_and_grad(ours, has_aux=True))(student)
  (ref_total, (ref_comps, ref_table)), ref_grads = jax.jit(jax.value_and_grad(
      lambda s: (lambda t, c, n: (t, (c, n)))(*reference(s)), has_aux=True))(student)

  assert rel(out.loss, ref_total) <= 1e-5
  for ours_name, value in out.components.items():
    assert rel(value, ref_comps[NAMES[ours_name]]) <= 1e-5, ours_name
  assert set(NAMES[k] for k in out.components) == set(ref_comps)
  new_table = centres_to_official(out.centres)
  for level in nets.levels:
    row = ['cls', 'cls_plus', 'patch'].index(level)
    assert rel(new_table[row], ref_table[row]) <= 1e-5, level
  errors = jax.tree.map(rel, grads, ref_grads)
  worst = max(jax.tree.leaves(errors))
  print(f'{num_cls_tokens} tokens: worst gradient relative error {worst:.2e}')
  assert worst <= 1e-5

"""Ablation switches (docs/method.md §9): each changes what it should and nothing else; the sweep command."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import centre_table, draw, init_params, perturbed_teacher, random_batch, tiny_config
from udi_jax.interop.official import centres_from_official
from udi_jax.method.objective import ObjectiveSettings, udi_objective
from udi_jax.method.sampling import draw_cells
from udi_jax.models.networks import build_networks


def evaluate(config, batch=3, seed=0, table=None):
  nets = build_networks(config)
  student = init_params(nets)
  teacher = perturbed_teacher(student)
  crops_global, crops_local, boxes = random_batch(config, batch, seed)
  samples = draw(config, boxes) if 'patch' in nets.levels else None
  table = centre_table(config.model.out_dim) if table is None else table
  centres = centres_from_official(table, nets.levels)
  _, out = jax.jit(lambda s: udi_objective(nets, ObjectiveSettings.from_config(config), s, teacher, centres,
                                           crops_global, crops_local, samples, 0.05))(student)
  return nets, student, teacher, (crops_global, crops_local), out


def test_without_patch_branch_it_is_exactly_the_dino_loss():
  """DINO's own averaging: every (teacher global view, student crop != that view) pair, mean over pairs."""
  config = tiny_config(num_cls_tokens=1)
  config.udi.include_patch = False
  nets, student, teacher, (crops_global, crops_local), out = evaluate(config)
  assert nets.levels == ('cls',) and set(out.components) == {'g_cls', 'l_cls'}
  apply = lambda p, x: nets.project(p, 'cls', nets.embed(p, 'cls', nets.backbone.apply(
      {'params': p['backbone']}, x).cls[:, 0]))
  table = centre_table(config.model.out_dim)

  @jax.jit
  def dino_loss(student, teacher):
    teacher_probs = [jax.nn.softmax((apply(teacher, crops_global[:, v]) - table[0]) / 0.05) for v in range(2)]
    student_crops = ([crops_global[:, 0], crops_global[:, 1]]
                     + [crops_local[:, k] for k in range(crops_local.shape[1])])
    total, terms = 0.0, 0
    for iq, q in enumerate(teacher_probs):
      for v, crop in enumerate(student_crops):
        if v == iq:
          continue
        total += jnp.mean(jnp.sum(-q * jax.nn.log_softmax(apply(student, crop) / 0.1), -1))
        terms += 1
    return total / terms

  np.testing.assert_allclose(out.loss, dino_loss(student, teacher), rtol=1e-5)


def test_alpha_zero_makes_the_cls_plus_target_the_cls_target():
  config = tiny_config()
  config.udi.alpha = 0.0
  table = centre_table(config.model.out_dim)
  table[1] = table[0]                                    # same centre, so the same distribution
  _, _, _, _, out = evaluate(config, table=table)
  np.testing.assert_allclose(out.targets['cls_plus'], out.targets['cls'], atol=1e-6)
  config.udi.alpha = 0.5
  _, _, _, _, out = evaluate(config, table=table)
  assert np.abs(out.targets['cls_plus'] - out.targets['cls']).max() > 1e-3


def test_probability_mixing_is_the_arithmetic_mixture():
  """alpha T_patch + (1 - alpha) T_cls: linear in alpha, T(0) = T_cls, each row sums to 1, and rows
  without a valid sample keep T_cls."""
  config = tiny_config()
  config.udi.target_mixing = 'prob'
  results = {}
  for alpha in (0.0, 0.3, 1.0):
    config.udi.alpha = alpha
    _, _, _, _, results[alpha] = evaluate(config, batch=4, seed=1)
  t0, t03, t1 = (results[a].targets['cls_plus'] for a in (0.0, 0.3, 1.0))
  np.testing.assert_allclose(t0, results[0.0].targets['cls'], atol=1e-6)
  np.testing.assert_allclose(t03, 0.3 * t1 + 0.7 * t0, atol=1e-6)
  np.testing.assert_allclose(np.sum(t03, -1), 1.0, atol=1e-5)
  assert np.abs(t1 - t0).max() > 1e-3
  # The mixture has no cls+ logits to centre: c1 is carried unchanged while c0 and c2 move.
  table = centre_table(config.model.out_dim)
  np.testing.assert_array_equal(results[0.3].centres['cls_plus'], table[1])
  assert np.abs(results[0.3].centres['cls'] - table[0]).max() > 1e-4


def test_local_patch_loss_adds_a_local_term_to_the_patch_level_only():
  config = tiny_config()
  _, _, _, _, off = evaluate(config)
  config.udi.local_patch_loss = True
  _, _, _, _, on = evaluate(config)
  assert 'l_patch' in on.components and 'l_patch' not in off.components
  for level in ('cls', 'cls_plus'):
    np.testing.assert_allclose(on.levels[level], off.levels[level], rtol=1e-6)
  n_local = config.data.num_local
  expect = (2 * on.components['g_patch'] + 2 * n_local * on.components['l_patch']) / (2 + 2 * n_local)
  np.testing.assert_allclose(on.levels['patch'], expect, rtol=1e-6)
  np.testing.assert_allclose(on.components['g_patch'], off.components['g_patch'], rtol=1e-6)


def test_uniform_sampling_is_uniform_over_the_grid_and_fixed_takes_first_cells():
  """Chi-square over the 196 tokens, 4 000 images x 16 samples, p = 0.001 bound 262.6 (195 dof)."""
  keys = jax.random.split(jax.random.key(0), 4000)
  cells, _ = draw_cells(keys, 14, 6, 3, 2, mode='uniform')
  cells = np.asarray(cells)
  assert all(len(set(row)) == 16 for row in cells[:200])          # distinct tokens per image
  counts = np.bincount(cells.ravel(), minlength=196)
  chi2 = ((counts - counts.mean()) ** 2 / counts.mean()).sum()
  assert chi2 < 262.6, chi2
  fixed, _ = draw_cells(keys[:50], 14, 6, 3, 2, mode='fixed')
  fixed = np.asarray(fixed)
  rows, cols = fixed // 14, fixed % 14
  assert np.all(rows % 3 == rows[:, :1] % 3) and np.all(cols % 3 == cols[:, :1] % 3)   # one cell per window
  assert set(zip(rows[:, 0] % 3, cols[:, 0] % 3)) <= {(0, 0), (0, 2), (2, 0), (2, 2)}


def test_separate_heads_one_per_active_level():
  for tokens, include_patch, levels in ((2, True, {'cls', 'cls_plus', 'patch'}), (1, True, {'cls', 'patch'}),
                                        (1, False, {'cls'})):
    config = tiny_config(num_cls_tokens=tokens)
    config.udi.include_patch = include_patch
    config.model.shared_head = False
    params = jax.eval_shape(build_networks(config).init, jax.random.key(0))
    assert set(params['heads']) == levels and 'head' not in params


def test_bad_switch_values_are_refused():
  from udi_jax.errors import ConfigError
  from udi_jax.train.loop import check_config as validate
  for field, value, message in (('sampling', 'random', "config.udi.sampling='random'"),
                                ('target_mixing', 'mean', "config.udi.target_mixing='mean'")):
    config = tiny_config()
    config.udi[field] = value
    with pytest.raises(ConfigError, match=message):
      validate(config, num_devices=8)
  config = tiny_config()
  config.udi.include_patch, config.model.num_cls_tokens = False, 1
  config.udi.local_patch_loss = True
  with pytest.raises(ConfigError, match='local_patch_loss=True needs the patch branch'):
    validate(config, num_devices=8)
  config = tiny_config()
  config.udi.include_patch = False
  with pytest.raises(ConfigError, match='num_cls_tokens=1'):
    validate(config, num_devices=8)
  from configs import demo
  config = demo.get_config()
  validate(config, num_devices=8)
  config.eval.tokens = ('cls', 'cls+')
  with pytest.raises(ConfigError, match=r"config.eval.tokens holds \['cls\+'\]"):
    validate(config, num_devices=8)
  config = demo.get_config()
  config.eval.network = 'techer'
  with pytest.raises(ConfigError, match="config.eval.network='techer' is not known"):
    validate(config, num_devices=8)


def test_two_point_sweep_resumes_and_writes_table_and_plot(tiny_run, tmp_path, monkeypatch):
  """Two points that train the shared run's config (the grid varies the linear probe, so both points
  reuse its compiled step): the first finishes, the sweep is interrupted, and run again it skips the
  finished point, trains the second and tabulates both."""
  from tests import tiny_train_config
  from udi_jax import sweep
  config = tiny_train_config.get_config()
  config.log_every_steps = 4
  config.checkpoint_every_steps = 0
  grid = 'linear.lr=0.01,0.02'
  calls = []
  real = sweep.run_point

  def interrupted_after_first(cfg, point, directory):
    if calls:
      raise KeyboardInterrupt('interrupted')
    calls.append(point)
    return real(cfg, point, directory)

  monkeypatch.setattr(sweep, 'run_point', interrupted_after_first)
  with pytest.raises(KeyboardInterrupt):
    sweep.sweep(config, grid, tmp_path)
  monkeypatch.setattr(sweep, 'run_point', real)
  first = tmp_path / 'points' / 'linear.lr=0.01' / 'result.json'
  stamp = first.stat().st_mtime
  assert not (tmp_path / 'points' / 'linear.lr=0.02').exists()
  table = sweep.sweep(config, grid, tmp_path)
  assert first.stat().st_mtime == stamp                      # the finished point was not redone
  assert 'linear.lr=0.01' in table and 'linear.lr=0.02' in table
  rows = (tmp_path / 'table.csv').read_text().splitlines()
  assert len(rows) == 3 and rows[0].startswith('eval.linear.lr')
  assert (tmp_path / 'plot.png').stat().st_size > 1000
  result = json.loads((tmp_path / 'points' / 'linear.lr=0.02' / 'result.json').read_text())
  assert 0 <= result['knn_top1'] <= 100 and 0 <= result['linear_top1'] <= 100
  assert 0 < result['dense_linear_miou'] <= 100 and 0 < result['dense_knn_miou'] <= 100   # segdigits
  assert '| dense linear mIoU % | dense k-NN mIoU % |' in table.splitlines()[0]


def test_grid_syntax(tmp_path):
  from configs import demo
  from udi_jax import sweep
  config = demo.get_config()
  points = sweep.parse_grid('seed=0,1;alpha=0,0.5 | seed=0,1;sampling=uniform;include_patch=false', config)
  assert len(points) == 6
  assert points[0] == {'seed': 0, 'udi.alpha': 0.0}
  assert points[-1] == {'seed': 1, 'udi.sampling': 'uniform', 'udi.include_patch': False}
  assert sweep.apply(config, points[-1]).model.num_cls_tokens == 1     # the DINO baseline
  with pytest.raises(ValueError, match='no config field'):
    sweep.parse_grid('gamma=1', config)
  # A bad value anywhere in the grid is refused before the first point trains.
  with pytest.raises(ValueError, match=r'point alpha=2.0: config.udi.alpha=2.0 is outside \[0, 1\]'):
    sweep.sweep(config, 'alpha=0.5,2', tmp_path)
  assert not (tmp_path / 'points').exists()

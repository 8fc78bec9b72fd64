"""The optimiser step and the schedules against the official code (`udi_golden_optim`, `schedules`)."""

import jax
import numpy as np
import optax
import pytest

from tests import golden
from tests.helpers import adam_moments, max_rel, rel
from udi_jax.interop import official
from udi_jax.method.schedules import Schedules
from udi_jax.models.networks import build_networks
from udi_jax.train.optimizer import OptimizerSettings, in_decay_group, make_optimizer

# The toy run of the golden file: 20 epochs x 2 iterations, warm-up 3, base lr 5e-4 * 1024/256.
TOY = dict(epochs=20, lr=2e-3, min_lr=1e-5, warmup_epochs=3, weight_decay=0.04, weight_decay_end=0.1,
           momentum_teacher=0.996, warmup_teacher_temp=0.04, teacher_temp=0.07, freeze_last_layer_epochs=1)
SUBSAMPLED = {'backbone.backbone.patch_embed.proj.weight', 'backbone.backbone.blocks.0.attn.qkv.weight',
              'backbone.attn.qkv.weight', 'head.0.last_layer.weight_v'}


def test_schedules_equal_the_official_ones():
  ref = golden.load('schedules')
  s = Schedules(steps_per_epoch=7, warmup_teacher_temp_epochs=5, **TOY)
  steps = np.arange(140)
  ours = {'lr': s.learning_rate(steps), 'wd': s.weight_decay_at(steps), 'momentum': s.momentum(steps),
          'teacher_temp': s.teacher_temperature(np.arange(20) * 7)}
  long = Schedules(steps_per_epoch=1, **{**TOY, 'epochs': 300}, warmup_teacher_temp_epochs=30)
  ours['teacher_temp_300ep_default'] = long.teacher_temperature(np.arange(300))
  for key, value in ours.items():
    error = max_rel(value, ref[key])
    print(f'{key}: max|d|/max|ref| = {error:.1e}')
    assert error <= 1e-6, key
  assert float(s.learning_rate(0)) == 0.0
  assert float(s.learning_rate(20)) == float(s.learning_rate(21)) == pytest.approx(2e-3)   # base twice


def test_optimiser_steps_equal_the_official_ones():
  """Clipping, decay groups, frozen last layer with its own Adam count, EMA: 3 iterations."""
  g, meta = golden.load('udi_golden_optim'), golden.load_json('udi_golden_optim')
  small = golden.load('udi_golden_small')
  nets = build_networks(golden.small_config())
  like = jax.eval_shape(nets.init, jax.random.key(0))
  names = [k[len('student/'):] for k in small if k.startswith('student/')]
  tree = lambda values: official.from_official(values, like)
  student = tree({n: g.get(f'init/student/{n}', small[f'student/{n}']) for n in names})
  teacher = tree({n: g.get(f'init/teacher/{n}', small[f'teacher/{n}']) for n in names})
  sched = Schedules(steps_per_epoch=2, warmup_teacher_temp_epochs=5, **TOY)
  for it, row in enumerate(meta['schedules']['per_iteration']):
    assert abs(float(sched.learning_rate(it)) - row['lr']['value']) <= 1e-6 * 2e-3
    assert abs(float(sched.momentum(it)) - row['momentum']['value']) <= 1e-7
  tx = make_optimizer(OptimizerSettings(), sched.learning_rate, sched.weight_decay_at,
                      sched.last_layer_trainable)

  @jax.jit
  def step(student, teacher, opt, grads, it):
    updates, opt = tx.update(grads, opt, student, step=it)
    student = optax.apply_updates(student, updates)
    m = sched.momentum(it)
    return student, jax.tree.map(lambda t, s: t * m + (1 - m) * s, teacher, student), opt

  opt = tx.init(student)
  worst = {}
  for it in range(3):
    # The 8 tensors the golden file does not store get any gradient (every op acts per tensor).
    grads = tree({n: g.get(f'grad/{it}/{n}', np.zeros_like(small[f'student/{n}'])) for n in names})
    student, teacher, opt = step(student, teacher, opt, grads, it)
    mu, nu, count = adam_moments(opt, student)
    ours = {'student': student, 'teacher': teacher, 'exp_avg': mu, 'exp_avg_sq': nu}
    ours = {kind: official.to_official(t) for kind, t in ours.items()}
    counts = {k: float(np.ravel(v)[0]) for k, v in official.to_official(
        jax.tree.map(lambda c: np.asarray(c, np.float32), count)).items()}
    for name in meta['subset']['stored_tensors']:
      assert counts[name] == float(g[f'iter{it}/adam_step/{name}']), (it, name)
      for kind, values in ours.items():
        ref = g[f'iter{it}/{kind}/{name}']
        got = values[name].reshape(-1)[::31] if name in SUBSAMPLED else values[name]
        if not np.any(ref):
          assert not np.any(got), (it, kind, name)      # no state yet: exactly zero
          continue
        error = rel(got, ref)
        worst[kind] = max(worst.get(kind, 0.0), error)
        assert error <= 1e-6, (it, kind, name, error)
  print('worst relative error per kind:', worst)


def test_decay_group_is_the_official_one():
  nets = build_networks(golden.small_config())
  params = jax.eval_shape(nets.init, jax.random.key(0))
  decayed = {'/'.join(str(getattr(k, 'key', k)) for k in path)
             for path, p in jax.tree_util.tree_flatten_with_path(params)[0] if in_decay_group(path, p)}
  meta = golden.load_json('udi_golden_optim')
  official_decayed = {n for n, info in meta['groups']['per_tensor'].items() if info['weight_decay']}
  marks = official.to_official(jax.tree_util.tree_map_with_path(
      lambda path, p: np.full(p.shape, float(in_decay_group(path, p)), np.float32), params))
  ours = {k for k, v in marks.items() if k.startswith(('backbone', 'head.0')) and np.all(v == 1)}
  assert ours == official_decayed
  assert 'head/last_layer/weight_g' in decayed and 'backbone/cls_token' in decayed

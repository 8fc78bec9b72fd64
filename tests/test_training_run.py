"""The training system end to end: workdir contents, SIGTERM, exact resume after SIGKILL, bad configs,
NaN stop, init_from, and a real 2-process run over localhost.

The uninterrupted reference is the shared tiny run (conftest `tiny_run`, 8 devices, in this process).
Subprocess runs use the same config on 8 devices, so they compile the same step (the persistent
compilation cache of the session) and must reproduce it.
"""

import concurrent.futures
import dataclasses
import json
import re
import shutil
import signal
import socket
import time

import jax
import numpy as np
import pytest

from tests import tiny_train_config
from tests.helpers import (
  checkpoint_steps,
  compare_student,
  damage,
  finish,
  identity_step,
  init_config,
  metrics_by_step,
  restore,
  start,
  state_handed_to_the_step,
  wait_for_checkpoint,
)
from udi_jax.train import loop
from udi_jax.train.loop import train_and_evaluate

TOTAL_STEPS = 12      # tiny_train_config: 3 epochs of 4 steps


def test_workdir_holds_config_metrics_events_and_checkpoints(tiny_run):
  config, workdir = tiny_run
  assert json.loads((workdir / 'config.json').read_text())['batch_size'] == config.batch_size
  assert list(workdir.glob('events.out.tfevents.*'))
  logged = metrics_by_step(workdir)
  assert sorted(logged) == list(range(0, TOTAL_STEPS + 1))      # step 0: k-NN of the network at initialisation
  assert 'loss' not in logged[0] and 'knn/cls/top1@20' in logged[0]
  for key in ('loss', 'loss/cls', 'loss/cls_plus', 'loss/patch', 'loss/g_patch', 'teacher_entropy/cls',
              'kl/cls', 'valid_fraction/global', 'centre_norm/patch', 'lr', 'weight_decay', 'momentum',
              'teacher_temp', 'grad_norm', 'update_norm', 'images_per_s', 'skipped_images',
              'logit_spread/cls', 'logit_spread/cls_plus', 'logit_spread/patch', 'prototypes_used/cls',
              'prototypes_used/cls_plus', 'prototypes_used/patch'):
    assert key in logged[TOTAL_STEPS], key
  for level in ('cls', 'cls_plus', 'patch'):          # the collapse monitor: 1 <= used <= K, spread > 0
    assert 1 <= logged[TOTAL_STEPS][f'prototypes_used/{level}'] <= config.model.out_dim + 1e-3
    assert logged[TOTAL_STEPS][f'logit_spread/{level}'] > 0
  assert checkpoint_steps(workdir) == list(range(1, TOTAL_STEPS + 1))
  state, data = restore(workdir, config)
  assert int(state.step) == TOTAL_STEPS and data['step'] == TOTAL_STEPS and data['epoch'] == 3
  assert np.isfinite(logged[TOTAL_STEPS]['loss'])


@pytest.fixture(scope='module')
def interrupted_run(tiny_run, tmp_path_factory):
  """The tiny run's config in a subprocess on 8 devices: killed (SIGKILL) after its checkpoint of step 4,
  run again (it resumes), and stopped with SIGTERM after step 8. Returns the workdir, the step the kill
  came after and the second run's (exit code, stdout, stderr)."""
  workdir = tmp_path_factory.mktemp('interrupted')
  process = start(workdir, devices=8)
  killed_after = wait_for_checkpoint(workdir, 4, process)
  process.send_signal(signal.SIGKILL)
  process.wait()
  process = start(workdir, devices=8)
  wait_for_checkpoint(workdir, 8, process)
  process.send_signal(signal.SIGTERM)
  return workdir, killed_after, finish(process)


def test_sigterm_saves_a_checkpoint_and_exits_zero(interrupted_run):
  workdir, _, (code, out, err) = interrupted_run
  assert code == 0, err[-3000:]
  assert 'Stopped at step' in err
  stopped = max(metrics_by_step(workdir))
  assert checkpoint_steps(workdir)[-1] == stopped < TOTAL_STEPS   # early, at a step boundary, saved


def test_resume_after_sigkill_is_exact(tiny_run, interrupted_run):
  """Killed, resumed, stopped: the state of the stopping step is, bitwise, the uninterrupted run's at that
  step, with the same data-iterator state and the same per-step losses."""
  config, reference = tiny_run
  workdir, killed_after, (code, out, err) = interrupted_run
  assert killed_after < TOTAL_STEPS and code == 0, err[-3000:]
  resumed_from = int(out.split('Resuming from the checkpoint of step ')[1].split()[0])
  stopped = checkpoint_steps(workdir)[-1]
  assert killed_after <= resumed_from < stopped
  got, got_data = restore(workdir, config, stopped)
  want, want_data = restore(reference, config, stopped)
  assert int(got.step) == int(want.step) == stopped and got_data == want_data
  jax.tree.map(np.testing.assert_array_equal, got, want)                 # bitwise
  ours, ref = metrics_by_step(workdir), metrics_by_step(reference)
  assert [ours[s]['loss'] for s in range(1, stopped + 1)] == [ref[s]['loss'] for s in range(1, stopped + 1)]
  logged = [(row['step'], key) for row in map(json.loads, (workdir / 'metrics.jsonl').read_text().splitlines())
            for key in row if key != 'step']
  assert len(logged) == len(set(logged))       # steps logged before the kill were cut on resume: once each


@pytest.mark.parametrize('override,message', [
    ('--config.batch_size=15', 'config.batch_size=15 does not divide over 2 devices'),
    ('--config.udi.global_window=9', 'config.udi.global_window=9 does not fit the 4x4 token grid'),
    ('--config.data.source=pictures:/x', "config.data.source='pictures:/x' is not known"),
    ('--config.model.dtype=float16', "config.model.dtype='float16' is not supported"),
    ('--config.model.depthx=4', 'config.model.depthx is not a field of tests/tiny_train_config.py'),
])
def test_bad_config_fails_fast_with_one_sentence(tmp_path, override, message):
  code, out, err = finish(start(tmp_path / 'run', override), timeout=120)
  assert code == 2
  assert message in err and err.strip().splitlines()[-1].startswith('Config error: ')
  assert not (tmp_path / 'run' / 'checkpoints').exists()


def test_max_steps_stops_early_with_a_checkpoint_then_the_run_resumes_to_its_end(tmp_path, monkeypatch):
  def counting_step(*args, **kwargs):      # the identity step (nothing compiled) that counts its steps
    step_fn = identity_step(*args, **kwargs)
    return lambda state, batch: (lambda s, m: (dataclasses.replace(s, step=s.step + 1), m))(*step_fn(state, batch))
  monkeypatch.setattr(loop, 'make_train_step', counting_step)
  config = tiny_train_config.get_config()
  config.max_steps = 2
  result = loop.train_and_evaluate(config, tmp_path)
  assert not result.completed and result.trained_steps == 2 and checkpoint_steps(tmp_path) == [1, 2]
  assert sorted(metrics_by_step(tmp_path)) == [1, 2]
  config.max_steps = 0
  result = loop.train_and_evaluate(config, tmp_path)
  assert result.completed and result.trained_steps == TOTAL_STEPS - 2
  assert sorted(metrics_by_step(tmp_path)) == list(range(1, TOTAL_STEPS + 1))


@pytest.mark.parametrize('field,value,message', [
    ('eval.resize_ratio', 0.5, 'config.eval.resize_ratio=0.5 must be at least 1'),
    ('max_steps', -1, 'config.max_steps=-1 must be 0 (the whole schedule) or positive'),
    ('data.flip_prob', 1.5, 'config.data.flip_prob=1.5 must lie in [0, 1]'),
    ('data.rotation_degrees', -5.0, 'config.data.rotation_degrees=-5.0 must lie in [0, 180]'),
])
def test_more_bad_values_are_refused_before_anything_runs(field, value, message):
  """The same path as above (`check_config`, which `main` turns into one line and exit code 2), in-process."""
  from udi_jax.errors import ConfigError
  config = tiny_train_config.get_config()
  *parents, leaf = field.split('.')
  node = config
  for part in parents:
    node = node[part]
  node[leaf] = value
  with pytest.raises(ConfigError, match=re.escape(message)):
    loop.check_config(config, num_devices=2)


def test_every_config_has_every_field():
  """An override that works on one config works on all: every config file defines the same fields (the
  architecture's sizes as None where the architecture decides)."""
  from configs import demo, vitb16, vits16
  def fields(config, prefix=''):
    return {name for key, value in config.items()
            for name in (fields(value, f'{prefix}{key}.') if hasattr(value, 'items') else {prefix + key})}
  reference = fields(vits16.get_config())
  assert 'model.depth' in reference
  for config in (vits16.get_config('official'), vitb16.get_config(), demo.get_config(), demo.get_config('digits'),
                 demo.get_config('long'), tiny_train_config.get_config()):
    assert fields(config) == reference


def test_the_demo_holds_its_learning_rate_whatever_the_batch():
  """configs/demo.py's floor lr is a reference to the peak (lr per 256 x batch / 256): it follows overrides."""
  from configs import demo
  from udi_jax.method.schedules import Schedules
  config = demo.get_config()
  config.batch_size, config.optim.lr = 64, 1e-3
  schedules = Schedules.from_config(config, steps_per_epoch=10)
  after_warmup = [float(schedules.learning_rate(s)) for s in range(10, 10 * config.epochs, 37)]
  np.testing.assert_allclose(after_warmup, 1e-3 * 64 / 256, rtol=1e-6)
  assert demo.get_config('long').epochs > demo.get_config().epochs


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
  config = tiny_train_config.get_config()
  real = loop.make_train_step

  def step_that_diverges_at_step_6(*args, **kwargs):
    step_fn = real(*args, **kwargs)

    def wrapped(state, batch):
      new_state, metrics = step_fn(state, batch)
      if int(new_state.step) == 6:     # as if the update had diverged
        metrics = {**metrics, 'loss': metrics['loss'] * np.nan}
        new_state = jax.tree.map(lambda x: x * np.nan if x.dtype == np.float32 else x, new_state)
      return new_state, metrics
    return wrapped

  monkeypatch.setattr(loop, 'make_train_step', step_that_diverges_at_step_6)
  with pytest.raises(FloatingPointError, match='Non-finite loss at step 6.*last good checkpoint is step 5'):
    train_and_evaluate(config, str(tmp_path))
  state, _ = restore(tmp_path, config)
  assert int(state.step) == 5
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state.student))


def test_init_from_another_run_takes_its_weights_not_its_step(tiny_run, tmp_path, monkeypatch):
  """Student, teacher and centres of the other run's newest checkpoint; step 0 and a fresh optimiser."""
  config, workdir = tiny_run
  source, _ = restore(workdir, config)
  state = state_handed_to_the_step(init_config(str(workdir)), tmp_path, monkeypatch)
  assert int(state.step) == 0
  assert not any(np.any(x) for x in jax.tree.leaves(state.opt))      # Adam moments and counts at zero
  for part in ('student', 'teacher', 'centres'):
    jax.tree.map(np.testing.assert_array_equal, getattr(state, part), getattr(source, part))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def two_processes(workdir, overrides: dict, fault=None) -> list:
  port = free_port()
  flags = [f'--config.{k}={v}' for k, v in overrides.items()] + [f'--coordinator_address=localhost:{port}',
                                                                  '--num_processes=2']
  return [start(workdir, *flags, f'--process_id={i}', devices=4, fault=fault) for i in range(2)]


def finish_all(processes, timeout=600) -> list[tuple[int, str, str, float]]:
  """(exit code, stdout, stderr, seconds from the first process's end) of each process; the timeout only
  catches a hang (a process waiting for a peer that is gone)."""
  began, ended = time.time(), {}
  readers = [concurrent.futures.ThreadPoolExecutor(1).submit(finish, p, timeout) for p in processes]
  while len(ended) < len(processes) and time.time() - began < timeout:
    for i, reader in enumerate(readers):
      if i not in ended and reader.done():
        ended[i] = time.time()
    time.sleep(0.05)
  first = min(ended.values(), default=began)
  return [(*reader.result(), ended.get(i, float('inf')) - first) for i, reader in enumerate(readers)]


@pytest.mark.slow
def test_two_processes_over_localhost_equal_one_process(tmp_path):
  """2 processes x 4 devices (gloo collectives) vs 1 process x 8 devices (this one), every step. Multi-host
  concerns the input split, the collectives and the checkpoints, not the network: a one-block ViT without
  photometric augmentation compiles in half the time.

  Then, at once: the two processes resume past a checkpoint damaged on the shared disk (process 0 chooses
  the step, both restore it) and again equal the one process; and two faults on one process stop both
  processes together: an error that is not the user's on process 0 while it takes the lock, and a restore
  that fails on process 1 alone."""
  overrides = {'model.depth': 1, 'data.augment': False, 'checkpoint_every_steps': 0}
  processes = two_processes(tmp_path / 'multi', overrides)
  config = tiny_train_config.get_config()
  config.model.depth, config.data.augment, config.checkpoint_every_steps = overrides.values()
  train_and_evaluate(config, str(tmp_path / 'single'))
  for code, out, err in [finish(p) for p in processes]:
    assert code == 0, err[-3000:]
  ours, ref = metrics_by_step(tmp_path / 'multi'), metrics_by_step(tmp_path / 'single')
  assert sorted(ours) == sorted(ref) == list(range(1, TOTAL_STEPS + 1))
  for step in ours:
    for key in ('loss', 'loss/patch', 'grad_norm'):
      assert ours[step][key] == pytest.approx(ref[step][key], rel=1e-5), (step, key)
  got, _ = restore(tmp_path / 'multi', config)
  want, _ = restore(tmp_path / 'single', config)
  worst, _ = compare_student(got.student, want.student, [])
  print(f'2 processes vs 1 process: worst student tensor error {worst:.1e}')
  assert worst <= 1e-5

  damage(tmp_path / 'multi', 12)
  shutil.copytree(tmp_path / 'multi', tmp_path / 'restore_fault')
  runs = {'resume': two_processes(tmp_path / 'multi', overrides),
          'lock': two_processes(tmp_path / 'lock_fault', overrides, fault='lock_error'),
          'restore': two_processes(tmp_path / 'restore_fault', overrides, fault='restore_error_on_1')}
  ended = {name: finish_all(processes) for name, processes in runs.items()}
  print('seconds between the two processes\' ends:', {name: round(max(e[3] for e in ends), 1)
                                                      for name, ends in ended.items()})
  (code0, out0, err0, _), (code1, _, err1, _) = ended['resume']
  assert code0 == code1 == 0, err0[-3000:] + err1[-3000:]
  assert 'Skipped the checkpoint of step 12: a file of its state is damaged' in out0
  assert 'Resuming from the checkpoint of step 8' in out0
  ours = metrics_by_step(tmp_path / 'multi')
  for step in range(9, TOTAL_STEPS + 1):
    assert ours[step]['loss'] == pytest.approx(ref[step]['loss'], rel=1e-5), step
  got, _ = restore(tmp_path / 'multi', config)
  assert compare_student(got.student, want.student, [])[0] <= 1e-5

  (code0, _, err0, _), (code1, _, err1, _) = ended['lock']
  assert code0 == 1 and 'PermissionError: [Errno 13] Permission denied (injected)' in err0, err0[-3000:]
  assert code1 == 2 and err1.strip().splitlines()[-1] == (
      f'Error: Process 0 could not claim the workdir {tmp_path / "lock_fault"}; see its output.'), err1[-3000:]
  assert not (tmp_path / 'lock_fault' / 'checkpoints').exists()

  refused = [e[2].strip().splitlines()[-1] for e in ended['restore']]
  assert [e[0] for e in ended['restore']] == [2, 2], refused
  for sentence in refused:
    assert sentence.startswith(f'Error: The checkpoint of step 8 in {tmp_path / "restore_fault" / "checkpoints"} '
                               'could not be restored on process 1'), sentence
  assert 'injected read failure' in refused[1]
  assert checkpoint_steps(tmp_path / 'restore_fault') == [4, 8, 12]

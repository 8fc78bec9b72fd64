"""The training system end to end: workdir contents, resume exactness, SIGTERM, bad configs, NaN stop,
init_from, and a real 2-process run over localhost.

Subprocess runs use `tests/tiny_train_config.py` (bundled digits, a tiny ViT) and share the persistent
compilation cache of the test session.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from tests import tiny_train_config
from tests.test_train_step import compare_student
from udi_jax.train.checkpoint import Checkpoints
from udi_jax.train.loop import train_and_evaluate, trainer_from_config
from udi_jax.train.state import abstract_state

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = 'tests/tiny_train_config.py'


def env(devices: int) -> dict:
  e = dict(os.environ)
  e.update(XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}', JAX_PLATFORMS='cpu',
           JAX_COMPILATION_CACHE_DIR=str(jax.config.jax_compilation_cache_dir),
           JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0.5', PYTHONPATH=str(REPO))
  return e


def main_command(workdir, *overrides):
  return [sys.executable, '-m', 'udi_jax.main', f'--config={CONFIG}', f'--workdir={workdir}', *overrides]


def start(workdir, *overrides, devices=2, extra_env=None):
  return subprocess.Popen(main_command(workdir, *overrides), cwd=REPO, env={**env(devices), **(extra_env or {})},
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process, timeout=600):
  out, err = process.communicate(timeout=timeout)
  return process.returncode, out, err


def wait_for_checkpoint(workdir, step, process, timeout=300):
  directory = pathlib.Path(workdir) / 'checkpoints'
  deadline = time.time() + timeout
  while time.time() < deadline:
    done = [int(p.name) for p in directory.glob('*') if p.name.isdigit()] if directory.is_dir() else []
    if done and max(done) >= step:
      return max(done)
    assert process.poll() is None, finish(process)
    time.sleep(0.05)
  raise TimeoutError(f'no checkpoint {step} in {directory}')


def metrics_by_step(workdir):
  """The logged metrics of every step, merged (a k-NN line joins its step's line; a resumed run logs
  some steps twice, and the later line wins)."""
  merged = {}
  for line in (pathlib.Path(workdir) / 'metrics.jsonl').read_text().splitlines():
    row = json.loads(line)
    merged.setdefault(row['step'], {}).update(row)
  return merged


def restore(workdir, config, step=None):
  """(state, data state) of a checkpoint, restored on this process's devices."""
  trainer = trainer_from_config(config, steps_per_epoch=4)
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('data',))
  checkpoints = Checkpoints(pathlib.Path(workdir) / 'checkpoints', asynchronous=False)
  state, data, _ = checkpoints.restore(abstract_state(trainer.nets, trainer.tx, mesh), step)
  checkpoints.close()
  return jax.device_get(state), data


def test_workdir_holds_config_metrics_events_and_checkpoints(tiny_run):
  config, workdir = tiny_run
  assert json.loads((workdir / 'config.json').read_text())['batch_size'] == config.batch_size
  assert list(workdir.glob('events.out.tfevents.*'))
  logged = metrics_by_step(workdir)
  assert sorted(logged) == list(range(1, 9))
  for key in ('loss', 'loss/cls', 'loss/cls_plus', 'loss/patch', 'loss/g_patch', 'teacher_entropy/cls',
              'kl/cls', 'valid_fraction/global', 'centre_norm/patch', 'lr', 'weight_decay', 'momentum',
              'teacher_temp', 'grad_norm', 'update_norm', 'images_per_s', 'skipped_images'):
    assert key in logged[8], key
  state, data = restore(workdir, config)
  assert int(state.step) == 8 and data['step'] == 8 and data['epoch'] == 2
  assert np.isfinite(logged[8]['loss'])


@pytest.mark.slow
def test_resume_after_sigkill_is_exact(tmp_path):
  """N steps uninterrupted == k steps, SIGKILL, resume, N-k steps: identical state and data order."""
  reference = tmp_path / 'reference'
  code, out, err = finish(start(reference))
  assert code == 0, err[-3000:]
  interrupted = tmp_path / 'interrupted'
  process = start(interrupted)
  killed_after = wait_for_checkpoint(interrupted, 5, process)
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert killed_after < 12
  code, out, err = finish(start(interrupted))
  assert code == 0, err[-3000:]
  assert 'Resuming from the checkpoint of step' in out
  config = tiny_train_config.get_config()
  got, got_data = restore(interrupted, config)
  want, want_data = restore(reference, config)
  assert int(got.step) == int(want.step) == 12 and got_data == want_data
  jax.tree.map(np.testing.assert_array_equal, got, want)                 # bitwise
  ours, ref = metrics_by_step(interrupted), metrics_by_step(reference)
  assert [ours[s]['loss'] for s in range(1, 13)] == [ref[s]['loss'] for s in range(1, 13)]


def test_sigterm_saves_a_checkpoint_and_exits_zero(tmp_path):
  process = start(tmp_path, '--config.epochs=50')
  wait_for_checkpoint(tmp_path, 3, process)
  process.send_signal(signal.SIGTERM)
  code, out, err = finish(process)
  assert code == 0, err[-3000:]
  steps = [int(p.name) for p in (tmp_path / 'checkpoints').glob('*') if p.name.isdigit()]
  logged = max(metrics_by_step(tmp_path))
  assert max(steps) == logged < 200          # stopped early, at a step boundary, with its checkpoint


@pytest.mark.parametrize('override,message', [
    ('--config.batch_size=15', 'config.batch_size=15 does not divide over 2 devices'),
    ('--config.udi.global_window=9', 'config.udi.global_window=9 does not fit the 4x4 token grid'),
    ('--config.data.source=pictures:/x', "config.data.source='pictures:/x' is not known"),
    ('--config.model.dtype=float16', "config.model.dtype='float16' is not supported"),
])
def test_bad_config_fails_fast_with_one_sentence(tmp_path, override, message):
  code, out, err = finish(start(tmp_path / 'run', override), timeout=120)
  assert code == 2
  assert message in err
  assert not (tmp_path / 'run' / 'checkpoints').exists()


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
  config = tiny_train_config.get_config()

  def inject_nan_at_step_6(step_fn):
    def wrapped(state, batch):
      new_state, metrics = step_fn(state, batch)
      if int(new_state.step) == 6:     # as if the update had diverged
        metrics = {**metrics, 'loss': metrics['loss'] * np.nan}
        new_state = jax.tree.map(lambda x: x * np.nan if x.dtype == np.float32 else x, new_state)
      return new_state, metrics
    return wrapped

  with pytest.raises(FloatingPointError, match='Non-finite loss at step 6.*last good checkpoint is step 5'):
    train_and_evaluate(config, str(tmp_path), step_hook=inject_nan_at_step_6)
  state, _ = restore(tmp_path, config)
  assert int(state.step) == 5
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state.student))


def test_init_from_another_run_takes_its_weights_not_its_step(tiny_run, tmp_path):
  config, workdir = tiny_run
  source, _ = restore(workdir, config)
  new = tiny_train_config.get_config()
  new.epochs = 1
  new.init_from = str(workdir)
  new.optim.lr = 0.0                          # nothing moves: the result shows what was loaded
  new.udi.momentum_teacher = 1.0
  state = jax.device_get(train_and_evaluate(new, str(tmp_path)))
  assert int(state.step) == 4
  jax.tree.map(np.testing.assert_array_equal, state.student, source.student)
  jax.tree.map(np.testing.assert_array_equal, state.teacher, source.teacher)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_over_localhost_equal_one_process(tmp_path):
  """2 processes x 2 devices (gloo collectives) vs 1 process x 4 devices, 3 steps on bundled images."""
  overrides = ('--config.epochs=1', '--config.data.max_examples=48')
  single = tmp_path / 'single'
  code, out, err = finish(start(single, *overrides, devices=4))
  assert code == 0, err[-3000:]
  port = free_port()
  multi = tmp_path / 'multi'
  processes = [start(multi, *overrides, f'--coordinator_address=localhost:{port}', '--num_processes=2',
                     f'--process_id={i}', devices=2) for i in range(2)]
  results = [finish(p) for p in processes]
  for code, out, err in results:
    assert code == 0, err[-3000:]
  config = tiny_train_config.get_config()
  config.epochs, config.data.max_examples = 1, 48
  ours, ref = metrics_by_step(multi), metrics_by_step(single)
  assert sorted(ours) == sorted(ref) == [1, 2, 3]
  for step in ref:
    for key in ('loss', 'loss/patch', 'grad_norm'):
      assert ours[step][key] == pytest.approx(ref[step][key], rel=1e-5), (step, key)
  got, _ = restore(multi, config)
  want, _ = restore(single, config)
  worst, _ = compare_student(got.student, want.student, [])
  print(f'2 processes vs 1 process: worst student tensor error {worst:.1e}')
  assert worst <= 1e-5

"""A run nothing can break: one run per workdir, resume past a damaged checkpoint, logs cut back on
resume, a finished run left alone, and one sentence (exit code 2) for each mistake a user can make.

The refusals run `python -m udi_jax.main` in a subprocess on the tiny training config: each stops before
anything is compiled, in about two seconds. The resume tests work on copies of the shared tiny run with
the step replaced by a donating identity (nothing to compile).
"""

import json
import os
import shutil
import socket
import subprocess
import threading
import time

import jax
import numpy as np
import pytest
from absl import logging

from tests import tiny_train_config
from tests.helpers import (
  checkpoint_steps,
  damage,
  finish,
  identity_step,
  metrics_by_step,
  restore,
  start,
  state_handed_to_the_step,
)
from udi_jax.errors import ConfigError, UserError
from udi_jax.train import loop, metrics_log
from udi_jax.train import workdir as workdir_lock
from udi_jax.train.checkpoint import Checkpoints, restore_run
from udi_jax.train.workdir import held_workdir


def refusal(process) -> str:
  """The one-sentence refusal of a `udi_jax.main` subprocess (exit code 2, a line of output at most two)."""
  code, out, err = finish(process, timeout=600)   # a hang detector: a refusal takes seconds
  lines = (out + err).strip().splitlines()
  assert code == 2 and len(lines) <= 2, out + err
  assert lines[-1].startswith(('Config error: ', 'Error: ')), lines
  return lines[-1]


# ---- One run per workdir.

def test_a_second_run_is_refused_while_the_first_holds_the_workdir(tmp_path):
  run = tmp_path / 'run'
  with held_workdir(run):
    holder = json.loads((run / 'run.lock').read_text())
    assert holder['pid'] == os.getpid() and holder['host'] == socket.gethostname()
    sentence = refusal(start(run))
  assert f'is in use by another run (process {os.getpid()} on host {socket.gethostname()}' in sentence
  assert f'delete {run / "run.lock"}' in sentence
  assert not (run / 'run.lock').exists() and not (run / 'checkpoints').exists()


def test_a_stale_lock_is_taken_over_and_a_lock_of_another_host_is_not(tmp_path, caplog):
  """A lock file nobody holds (its run was killed; here: a pid that is gone, and this process's own pid as
  if reused) is taken over with a warning; one written on another host is left alone."""
  gone = subprocess.Popen(['true'])
  gone.wait()
  for pid in (gone.pid, os.getpid()):
    run = tmp_path / str(pid)
    run.mkdir()
    (run / 'run.lock').write_text(json.dumps({'host': socket.gethostname(), 'pid': pid, 'started': 'earlier'}))
    with caplog.at_level(logging.WARNING), held_workdir(run):
      assert json.loads((run / 'run.lock').read_text())['started'] != 'earlier'
    assert any(f'Taking over the stale lock {run / "run.lock"}' in r.getMessage() for r in caplog.records)
    assert not (run / 'run.lock').exists()
  (tmp_path / 'run.lock').write_text(json.dumps({'host': 'elsewhere', 'pid': gone.pid}))
  with pytest.raises(UserError, match=f'in use by another run \\(process {gone.pid} on host elsewhere'):
    with held_workdir(tmp_path):
      pass
  assert (tmp_path / 'run.lock').exists()          # not ours: left alone


def test_two_runs_taking_over_one_stale_lock_cannot_both_win(tmp_path, monkeypatch):
  """Two rivals meet inside the takeover: both have read the stale lock (a barrier holds each there until
  the other has read it too), then one goes on at once and the other a moment later, the order in which
  a claim by reading, unlinking and creating the file lets both through. Exactly one may win."""
  lock = tmp_path / 'run.lock'
  for round_ in range(5):
    lock.write_text(json.dumps({'host': socket.gethostname(), 'pid': 1 << 30, 'started': 'earlier'}))
    barrier, reads, lag = threading.Barrier(2, timeout=30), [], threading.local()

    def read_at_the_barrier(text, real=json.loads):
      holder = real(text)
      if len(reads) < 2:
        reads.append(1)
        barrier.wait()
        time.sleep(getattr(lag, 'seconds', 0))
      return holder
    monkeypatch.setattr(workdir_lock.json, 'loads', read_at_the_barrier)
    outcomes = [None, None]

    def rival(i):
      lag.seconds = 0.2 * i
      try:
        outcomes[i] = workdir_lock._take(lock)
      except UserError as e:
        outcomes[i] = e
    threads = [threading.Thread(target=rival, args=(i,)) for i in range(2)]
    for t in threads:
      t.start()
    for t in threads:
      t.join(60)
    monkeypatch.undo()
    winners = [o for o in outcomes if not isinstance(o, UserError)]
    losers = [o for o in outcomes if isinstance(o, UserError)]
    assert len(winners) == 1 and len(losers) == 1, (round_, outcomes)
    assert 'is in use by another run' in str(losers[0])
    workdir_lock._release(lock, winners[0])
    assert not lock.exists()


def test_a_workdir_that_cannot_be_written_is_refused(tmp_path, monkeypatch):
  (tmp_path / 'afile').write_text('')
  sentence = refusal(start(tmp_path / 'afile' / 'run'))
  assert sentence == (f'Error: The workdir {tmp_path / "afile" / "run"} cannot be created: {tmp_path / "afile"} '
                      'is a file, not a directory; choose another --workdir.')

  def read_only(*args, **kwargs):   # as on a read-only directory (the suite may run as root, which writes anyway)
    raise PermissionError(13, 'Permission denied')
  monkeypatch.setattr(workdir_lock.os, 'open', read_only)
  with pytest.raises(UserError, match=f'The workdir {tmp_path} is not writable \\(Permission denied\\)'):
    with held_workdir(tmp_path):
      pass


# ---- One sentence, exit code 2, before anything runs.

@pytest.mark.parametrize('overrides,words', [
    (['--config.data.source=tfds:nosuchdataset:train'], "tfds does not know the dataset 'nosuchdataset'"),
    (['--config.data.source=tfds:mnist:train', '--config.data.data_dir={tmp}'],
     "The tfds dataset 'mnist' is not prepared in {tmp}; prepare it with `tfds build mnist"),
    (['--config.optim.lrr=1e-3'], 'config.optim.lrr is not a field of tests/tiny_train_config.py (did you mean '
                                  'config.optim.lr?)'),
    (['--config.data.source=imagefolder:{tmp}/nothing'], 'The image folder {tmp}/nothing does not exist'),
    (['--config.data.source=imagefolder:{tmp}'], 'The image folder {tmp} holds no images'),
    (['--config.init_from={tmp}/nothing'], 'config.init_from={tmp}/nothing is neither a workdir nor'),
])
def test_each_mistake_is_one_sentence_with_exit_code_2(tmp_path, overrides, words):
  sentence = refusal(start(tmp_path / 'run', *[o.format(tmp=tmp_path) for o in overrides]))
  assert words.format(tmp=tmp_path) in sentence
  assert not (tmp_path / 'run' / 'checkpoints').exists()


@pytest.mark.parametrize('overrides,words', [
    ({'eval.report': True, 'eval.train_source': 'imagefolder:{tmp}/nothing'},
     'config.eval.train_source: the image folder {tmp}/nothing does not exist'),
    ({'eval.knn_every_epochs': 1, 'eval.test_source': 'tfds:mnist:test', 'data.data_dir': '{tmp}'},
     "The tfds dataset 'mnist' is not prepared in {tmp}"),
    ({'eval.knn_every_epochs': 1, 'eval.test_source': 'mnist5k:validation'},
     "mnist5k has the splits train and test, not 'validation'"),
    ({'eval.report': True, 'eval.dense.source': 'segfolder:{tmp}'},
     'segfolder:{tmp} needs {tmp}/images/training/NAME.jpg'),
    ({'eval.report': True, 'eval.test_source': ''}, 'config.eval.train_source and config.eval.test_source must'),
])
def test_an_evaluation_source_that_cannot_be_opened_is_refused_before_training(tmp_path, overrides, words):
  """The evaluation during training and the report open their sources after training: a wrong one is
  refused at the start instead, before the workdir is made."""
  config = tiny_train_config.get_config()
  for field, value in overrides.items():
    *sections, name = field.split('.')
    node = config
    for section in sections:
      node = node[section]
    node[name] = value.format(tmp=tmp_path) if isinstance(value, str) else value
  with pytest.raises(ConfigError) as refused:
    loop.train_and_evaluate(config, tmp_path / 'run')
  assert words.format(tmp=tmp_path) in str(refused.value)
  assert not (tmp_path / 'run').exists()


def test_evaluating_a_checkpoint_that_does_not_exist_lists_those_that_do(tiny_run):
  _, workdir = tiny_run
  sentence = refusal(start(workdir, '--mode=eval', '--config.eval.checkpoint=999999'))
  assert sentence == (f'Error: There is no checkpoint of step 999999 in {workdir / "checkpoints"}; the steps '
                      f'there are {checkpoint_steps(workdir)}.')


# ---- Resume.

def copy_of(run, to, steps=None):
  """A copy of a run's workdir (only the checkpoints of `steps`, default all), without its report."""
  shutil.copytree(run, to, ignore=lambda d, names: [n for n in names if n in ('eval', 'export') or (
      steps is not None and d.endswith('checkpoints') and n.isdigit() and int(n) not in steps)])
  return to


def events_steps(run) -> list[int]:
  from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
  return [e.step for path in sorted(run.glob('events.out.tfevents.*')) for e in EventFileLoader(str(path)).Load()]


def test_resume_skips_a_damaged_newest_checkpoint_and_cuts_the_logs_back(tiny_run, tmp_path, monkeypatch,
                                                                          capsys):
  """The newest checkpoint (12) lost a file and another is truncated: resume takes step 11, bitwise as
  saved, moves 12 aside and says why; the logs of step 12 written before are cut, so it appears once."""
  config, reference = tiny_run
  run = copy_of(reference, tmp_path / 'run')
  damage(run, 12)
  assert 'damaged (OUT_OF_RANGE' in Checkpoints(run / 'checkpoints').damage(12)
  assert max(events_steps(run)) == 12
  config = tiny_train_config.get_config()
  state = state_handed_to_the_step(config, run, monkeypatch)     # the identity step "trains" step 12
  out = capsys.readouterr().out
  assert 'Skipped the checkpoint of step 12: a file of its state is damaged' in out
  assert f'moved it to {run / "damaged_checkpoints" / "12"}' in out and 'Resuming from the checkpoint of step 11' in out
  want, _ = restore(reference, config, 11)
  assert int(state.step) == 11
  jax.tree.map(np.testing.assert_array_equal, state, want)
  assert (run / 'damaged_checkpoints' / '12' / 'state').is_dir() and checkpoint_steps(run)[-1] == 12
  rows = [json.loads(line) for line in (run / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in rows if r['step'] == 12 and 'loss' in r] == [12] and rows[-1]['loss'] == 0
  assert events_steps(run).count(12) == len([k for k in rows[-1] if k != 'step'])   # the new line's only


def test_no_restorable_checkpoint_is_refused_naming_each(tiny_run, tmp_path):
  config, reference = tiny_run
  run = copy_of(reference, tmp_path / 'run', steps=(11, 12))
  damage(run, 11)
  shutil.rmtree(run / 'checkpoints' / '12' / 'data')
  with pytest.raises(UserError, match=r'No checkpoint in .* can be restored \(step 12: data/metadata is missing '
                                      r'or not JSON; step 11: a file of its state is damaged'):
    restore_run(run, config=config)


def test_a_finished_run_says_so_and_trains_nothing(tiny_run, tmp_path, monkeypatch, capsys):
  config, reference = tiny_run
  run = copy_of(reference, tmp_path / 'run', steps=(12,))

  def no_step(*args, **kwargs):
    raise AssertionError('a finished run compiled its step')
  monkeypatch.setattr(loop, 'make_train_step', no_step)
  result = loop.train_and_evaluate(tiny_train_config.get_config(), run)
  assert result.completed and result.trained_steps == 0
  assert f'The run in {run} is complete (step 12 of 12); nothing to train.' in capsys.readouterr().out


def test_speed_and_eta_leave_the_compilation_out(tmp_path, monkeypatch, capsys):
  """On a simulated clock (the run's speed cannot depend on the machine's load): the first call of the
  step compiles it (100 s), every call then takes 0.25 s. The first line has no speed yet; every later
  line has that of the steps alone, 16 images / 0.25 s, and its ETA."""
  now = [0.0]
  monkeypatch.setattr(metrics_log, 'clock', lambda: now[0])

  def compiling_identity(*args, **kwargs):
    step_fn = identity_step(*args, **kwargs)

    def step(state, batch):
      now[0] += 100.0 if now[0] == 0 else 0.25
      return step_fn(state, batch)
    return step
  monkeypatch.setattr(loop, 'make_train_step', compiling_identity)
  config = tiny_train_config.get_config()
  config.epochs = 1
  loop.train_and_evaluate(config, tmp_path)
  logged = metrics_by_step(tmp_path)
  assert 'images_per_s' not in logged[1]
  assert [logged[s]['images_per_s'] for s in (2, 3, 4)] == [config.batch_size / 0.25] * 3
  lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith('step ')]
  assert lines[0].endswith('| speed from the next line (the first step compiles)')
  assert lines[1].endswith(f'| {config.batch_size / 0.25:.1f} img/s, ETA 00:00:00')      # 2 steps x 0.25 s


def test_a_checkpoint_is_also_saved_after_each_ten_minutes_of_training(tmp_path, monkeypatch):
  """On a simulated clock where every step takes 4 minutes: besides the ends of the 4-step epochs, a
  checkpoint is saved at the first step 10 minutes or more after the previous save."""
  now = [0.0]
  monkeypatch.setattr(metrics_log, 'clock', lambda: now[0])

  def slow_identity(*args, **kwargs):
    step_fn = identity_step(*args, **kwargs)

    def step(state, batch):
      now[0] += 240.0
      return step_fn(state, batch)
    return step
  monkeypatch.setattr(loop, 'make_train_step', slow_identity)
  config = tiny_train_config.get_config()
  config.checkpoint_every_steps = 0
  config.checkpoint_every_minutes = 10.0
  loop.train_and_evaluate(config, tmp_path)
  assert checkpoint_steps(tmp_path) == [3, 4, 7, 8, 11, 12]


def test_resuming_under_a_config_that_trains_differently_is_refused(tiny_run, tmp_path):
  """The shared run resumed with another alpha and batch: refused before anything runs, naming both fields;
  a longer schedule or other evaluation settings (how a run is driven), or a field added since the run was
  saved at the value it trained with, are no difference."""
  config, workdir = tiny_run
  changed = config.copy_and_resolve_references()
  changed.udi.alpha, changed.batch_size = 0.25, 32
  with pytest.raises(ConfigError) as refused:
    loop.train_and_evaluate(changed, workdir)
  assert f'The run in {workdir} was trained with another config (batch_size: 16 -> 32; udi.alpha: 0.5 -> 0.25)' in (
      str(refused.value))
  from udi_jax.train import run_config
  trained = json.loads((workdir / 'config.json').read_text())
  longer = json.loads(json.dumps(trained))
  longer['epochs'] += 1
  longer['eval']['knn']['ks'] = [5]
  assert run_config.differences(trained, longer) == []
  # A run saved before udi.momentum_teacher_end (or the later fields) existed trained with their values now.
  older = json.loads(json.dumps(trained))
  del older['udi']['momentum_teacher_end'], older['checkpoint_every_minutes']
  del older['data']['rotation_degrees'], older['data']['translate_fraction']
  assert run_config.differences(older, trained) == []
  assert run_config.differences(older, {**trained, 'udi': {**trained['udi'], 'momentum_teacher_end': 0.996}}) == [
      'udi.momentum_teacher_end: 1.0 -> 0.996']

"""The metrics log on its own: written without TensorFlow, counts summed and the rest averaged over a log
line's steps, a non-finite value named, and the logs cut back to a step."""

import json

import numpy as np
import pytest
from absl import logging

from tests.helpers import metrics_by_step
from udi_jax.train import metrics_log


def metrics(loss, skipped=0):
  return {'loss': np.float32(loss), 'loss/cls': np.float32(loss), 'lr': np.float32(1e-3),
          'teacher_temp': np.float32(0.04), 'skipped_images': np.float32(skipped)}


def test_without_tensorflow_metrics_go_to_the_jsonl_file_and_nan_still_stops(tmp_path, monkeypatch, capsys):
  """clu's writers cannot be imported without TensorFlow (as on an accelerator image that lacks it): the
  run keeps metrics.jsonl and the progress line, writes no TensorBoard events, and still stops on NaN.
  `skipped_images` is a count: summed over the steps of a line, where the other metrics are averaged."""
  def no_tensorflow():
    raise ImportError("No module named 'tensorflow'")
  monkeypatch.setattr(metrics_log, 'clu_writers', no_tensorflow)
  log = metrics_log.MetricsLog(tmp_path, total_steps=4, steps_per_epoch=2, batch_size=8, start=0,
                               log_every_steps=2, out_dim=64)
  log.add(1, metrics(1.0, skipped=1))
  log.add(2, metrics(2.0, skipped=2))
  log.flush(2, None)
  line = metrics_by_step(tmp_path)[2]
  assert line['loss'] == 1.5 and line['skipped_images'] == 3 and not list(tmp_path.glob('events.out.tfevents.*'))
  assert capsys.readouterr().out.startswith('step 2/4 (epoch 0) loss 1.5000 [cls 1.500]')
  log.add(3, metrics(np.nan))
  with pytest.raises(FloatingPointError, match='Non-finite loss at step 3'):
    log.flush(3, 2)
  log.close()


def test_the_metrics_file_is_cut_back_to_a_step(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  path.write_text(''.join(json.dumps({'step': s, 'loss': s}) + '\n' for s in (1, 2, 2, 3, 4)))
  assert metrics_log.cut_metrics_file(path, 2) == (2, 0)
  assert [json.loads(line)['step'] for line in path.read_text().splitlines()] == [1, 2, 2]
  assert metrics_log.cut_metrics_file(path, 2) == (0, 0)
  assert metrics_log.cut_metrics_file(tmp_path / 'none', 2) == (0, 0)


def test_a_line_cut_short_by_a_kill_is_dropped_and_counted(tmp_path):
  """A SIGKILL or a full disk in the middle of a write leaves a partial last line (and, on some file
  systems, a line of zeros in the middle): the lines that parse are kept, the others counted."""
  path = tmp_path / 'metrics.jsonl'
  whole = [json.dumps({'step': s, 'loss': s}) + '\n' for s in (1, 2, 3)]
  path.write_text(whole[0] + '\0\0\0\n' + ''.join(whole[1:]) + '{"step": 4, "lo')
  assert metrics_log.cut_metrics_file(path, 2) == (1, 2)        # step 3 after, the zeros and step 4 damaged
  assert path.read_text() == whole[0] + whole[1]
  path.write_text(whole[0] + '{"step": 2, "lo')
  assert metrics_log.cut_metrics_file(path, 5) == (0, 1) and path.read_text() == whole[0]


def test_a_damaged_events_record_is_dropped_with_what_follows(tmp_path):
  """An events file whose last record was cut short: rewritten with the whole records up to the step."""
  from tensorboard.compat.proto.event_pb2 import Event
  from tensorboard.summary.writer.record_writer import RecordWriter
  path = tmp_path / 'events.out.tfevents.1'
  with open(path, 'wb') as f:
    writer = RecordWriter(f)
    for step in range(1, 6):
      writer.write(Event(step=step, wall_time=1.0).SerializeToString())
  whole = path.stat().st_size
  with open(path, 'r+b') as f:
    f.truncate(whole - 5)                           # step 5's record cut short
  assert metrics_log.cut_events_files(tmp_path, 3) == (1, 1)       # step 4 after the step, step 5 damaged
  assert path.stat().st_size == 3 * whole // 5
  assert metrics_log.cut_events_files(tmp_path, 3) == (0, 0)


def test_a_health_metric_that_was_not_measured_never_stops_the_run(tmp_path, monkeypatch):
  """A step without a valid patch point has no patch-level spread (NaN): the run goes on, and the log line
  averages the steps where it was measured; only the loss and the update stop a run."""
  monkeypatch.setattr(metrics_log, 'clu_writers', lambda: (_ for _ in ()).throw(ImportError('no TF')))
  log = metrics_log.MetricsLog(tmp_path, total_steps=6, steps_per_epoch=2, batch_size=8, start=0,
                               log_every_steps=2, out_dim=64)
  for step, spread in ((1, np.nan), (2, 3.0), (3, np.nan), (4, np.nan)):
    log.add(step, {**metrics(1.0), 'logit_spread/patch': np.float32(spread),
                   'prototypes_used/patch': np.float32(spread)})
    if step % 2 == 0:
      log.flush(step, None)
  lines = metrics_by_step(tmp_path)
  assert lines[2]['logit_spread/patch'] == 3.0 and lines[2]['prototypes_used/patch'] == 3.0
  assert 'logit_spread/patch' not in lines[4] and lines[4]['loss'] == 1.0
  from udi_jax.method import objective  # the monitor marks a step without a valid point as not measured
  logits, probs, rows = np.ones((6, 4), np.float32), np.full((6, 4), 0.25, np.float32), objective.Rows(3, 0)
  no_point, points = np.zeros(6, np.float32), np.array([1, 0, 1, 0, 0, 0], np.float32)
  assert np.isnan(objective.spread_over_images(logits, no_point, rows))
  assert np.isnan(objective.prototypes_used(probs, no_point, rows))
  assert objective.spread_over_images(logits, points, rows) == 0
  assert np.isclose(objective.prototypes_used(probs, points, rows), 4)
  log.add(5, {**metrics(1.0), 'grad_norm': np.float32(np.inf)})
  with pytest.raises(FloatingPointError, match='Non-finite grad_norm at step 5'):
    log.flush(5, 4)


def test_a_level_at_ln_k_for_a_whole_log_line_gets_one_warning(tmp_path, monkeypatch, caplog):
  monkeypatch.setattr(metrics_log, 'clu_writers', lambda: (_ for _ in ()).throw(ImportError('no TF')))
  log = metrics_log.MetricsLog(tmp_path, total_steps=8, steps_per_epoch=4, batch_size=8, start=0,
                               log_every_steps=2, out_dim=64)
  at_ln_k = np.float32(np.log(64) - 0.01)
  with caplog.at_level(logging.WARNING):
    for step, cls_entropy in enumerate([at_ln_k, 3.0, at_ln_k, at_ln_k, at_ln_k, at_ln_k], start=1):
      log.add(step, {**metrics(5.0), 'teacher_entropy/cls': cls_entropy, 'teacher_entropy/patch': np.float32(3)})
      if step % 2 == 0:
        log.flush(step, None)
  warnings = [r.getMessage() for r in caplog.records if 'collapsed' in r.getMessage()]
  assert len(warnings) == 1 and warnings[0].startswith('The cls level has collapsed to a uniform output')
  assert 'over steps 3-4' in warnings[0] and 'udi.teacher_temp' in warnings[0]


def test_a_deliberately_collapsing_run_gets_the_warning_and_a_healthy_one_does_not(tmp_path, caplog):
  """The tiny run made to collapse: a teacher temperature of 5 makes the teacher's output uniform from the
  first step, so the level warns once, and the monitor's metrics say the same (every prototype used). The
  same run at the config's temperature, the contrast: no warning, a few prototypes used, an entropy far
  below ln K. (The logit spread is the same in both: it measures the raw logits, which the temperature
  does not touch.) Plain DINO (one level), whose step compiles in a fraction of UDI's, and the second run
  reuses its program; the UDI levels' monitor metrics are checked on the shared run (test_training_run)."""
  from tests import tiny_train_config
  from udi_jax.train.loop import train_and_evaluate
  last = {}
  for name, temperature in (('collapsing', 5.0), ('healthy', None)):
    config = tiny_train_config.get_config()
    config.epochs, config.log_every_steps, config.checkpoint_every_steps = 1, 2, 0
    config.udi.include_patch, config.model.num_cls_tokens = False, 1
    if temperature:
      config.udi.teacher_temp = config.udi.warmup_teacher_temp = temperature
    caplog.clear()
    with caplog.at_level(logging.WARNING):
      train_and_evaluate(config, tmp_path / name)
    warned = [r.getMessage() for r in caplog.records if 'has collapsed to a uniform output' in r.getMessage()]
    assert len(warned) == (1 if temperature else 0), warned
    last[name] = metrics_by_step(tmp_path / name)[4]
  assert warned == [] and last['collapsing']['teacher_entropy/cls'] > np.log(64) - 0.01
  assert last['collapsing']['prototypes_used/cls'] > 0.99 * 64
  assert last['healthy']['prototypes_used/cls'] < 0.5 * 64
  assert last['healthy']['teacher_entropy/cls'] < np.log(64) - 1

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
  assert metrics_log.cut_metrics_file(path, 2) == 2
  assert [json.loads(line)['step'] for line in path.read_text().splitlines()] == [1, 2, 2]
  assert metrics_log.cut_metrics_file(path, 2) == 0 and metrics_log.cut_metrics_file(tmp_path / 'none', 2) == 0


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


def test_a_deliberately_collapsing_run_gets_the_warning(tmp_path, caplog):
  """The tiny run made to collapse: a teacher temperature of 5 makes the teacher's output uniform from the
  first step, so the level warns once, and the monitor's metrics say the same (every prototype used, flat
  logits). Plain DINO (one level), whose step compiles in a fraction of UDI's; the UDI levels' monitor
  metrics are checked on the shared run (test_training_run)."""
  from tests import tiny_train_config
  from udi_jax.train.loop import train_and_evaluate
  config = tiny_train_config.get_config()
  config.epochs, config.log_every_steps, config.checkpoint_every_steps = 1, 2, 0
  config.udi.include_patch, config.model.num_cls_tokens = False, 1
  config.udi.teacher_temp = config.udi.warmup_teacher_temp = 5.0
  with caplog.at_level(logging.WARNING):
    train_and_evaluate(config, tmp_path)
  warned = [r.getMessage() for r in caplog.records if 'has collapsed to a uniform output' in r.getMessage()]
  assert len(warned) == 1 and warned[0].startswith('The cls level has collapsed')
  last = metrics_by_step(tmp_path)[4]
  assert last['prototypes_used/cls'] > 0.99 * 64 and last['teacher_entropy/cls'] > np.log(64) - 0.01
  assert last['logit_spread/cls'] < 0.5

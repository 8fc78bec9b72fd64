"""A run's metrics: kept on the device between log steps, then checked, written and printed.

Process 0 writes `WORKDIR/metrics.jsonl` (one line per log step, plus a line per k-NN evaluation), the
TensorBoard events (through clu, which needs TensorFlow: without it the events are off, with a warning)
and the progress line. A run that resumes from step S first cuts both logs back to S: the steps after S
that a killed run had logged are trained again, and each step then appears once. A level whose teacher
entropy stays within COLLAPSE_NATS of ln K (a uniform output) over a whole log line gets one warning.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import time
from typing import Optional

import jax
import numpy as np
from absl import logging

from udi_jax.models.networks import LEVELS

COUNTS = ('skipped_images',)      # summed over the steps of a log line; the other metrics are averaged
COLLAPSE_NATS = 0.05              # a level whose teacher entropy stays this close to ln K has collapsed


def progress_line(step: int, total: int, steps_per_epoch: int, m: dict, seconds_per_step: float,
                  batch_size: int) -> str:
  levels = ' '.join(f'{level} {m[f"loss/{level}"]:.3f}' for level in LEVELS if f'loss/{level}' in m)
  eta = time.strftime('%H:%M:%S', time.gmtime(max(total - step, 0) * seconds_per_step))
  return (f'step {step}/{total} (epoch {(step - 1) // steps_per_epoch}) loss {m["loss"]:.4f} [{levels}] '
          f'lr {m["lr"]:.2e} T_t {m["teacher_temp"]:.4f} | {batch_size / seconds_per_step:.1f} img/s, '
          f'ETA {eta}')


def clu_writers():
  """clu's metric writers and periodic actions. They load TensorFlow (seconds), so they are imported when
  a run starts (a bad config fails at once); without TensorFlow they cannot be imported at all."""
  from clu import metric_writers, periodic_actions
  return metric_writers, periodic_actions


def cut_metrics_file(path: pathlib.Path, last_step: int) -> int:
  """Drops the lines of `metrics.jsonl` past `last_step`; returns how many were dropped."""
  if not path.is_file():
    return 0
  lines = path.read_text().splitlines(keepends=True)
  kept = [line for line in lines if line.strip() and json.loads(line)['step'] <= last_step]
  if len(kept) < len(lines):
    temporary = path.with_name(path.name + '.cut')
    temporary.write_text(''.join(kept))
    os.replace(temporary, path)
  return len(lines) - len(kept)


def cut_events_files(workdir: pathlib.Path, last_step: int) -> int:
  """Drops the TensorBoard events past `last_step` from the events files of `workdir`; returns how many.
  TensorBoard would otherwise draw the killed run's steps and the resumed run's on top of each other."""
  paths = sorted(workdir.glob('events.out.tfevents.*'))
  if not paths:
    return 0
  from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
  from tensorboard.compat.proto.event_pb2 import Event
  from tensorboard.summary.writer.record_writer import RecordWriter
  dropped = 0
  for path in paths:
    records = list(RawEventFileLoader(str(path)).Load())
    kept = [r for r in records if Event.FromString(r).step <= last_step]
    if len(kept) < len(records):
      temporary = path.with_name(path.name + '.cut')
      with open(temporary, 'wb') as f:
        writer = RecordWriter(f)
        for record in kept:
          writer.write(record)
      os.replace(temporary, path)
      dropped += len(records) - len(kept)
  return dropped


class MetricsLog:
  """The steps' metrics, kept on the device until a log step; then checked for non-finite values and
  written to TensorBoard (clu), `metrics.jsonl` and the progress line (process 0)."""

  def __init__(self, workdir: pathlib.Path, total_steps: int, steps_per_epoch: int, batch_size: int,
               start: int, log_every_steps: int, out_dim: int):
    self.workdir, self.total_steps, self.steps_per_epoch = workdir, total_steps, steps_per_epoch
    self.batch_size, self.primary = batch_size, jax.process_index() == 0
    self.uniform_entropy, self.collapsed = math.log(out_dim), set()
    if self.primary:
      lines, events = cut_metrics_file(workdir / 'metrics.jsonl', start), cut_events_files(workdir, start)
      if lines or events:
        print(f'Dropped what an interrupted run had logged after step {start} ({lines} lines of metrics.jsonl, '
              f'{events} TensorBoard values): those steps are trained again.', flush=True)
    self.writer = self.progress = None
    try:
      metric_writers, periodic_actions = clu_writers()
    except ImportError as e:
      logging.warning('TensorBoard events are off (%s); the metrics go to %s only.', e,
                      workdir / 'metrics.jsonl')
    else:
      self.writer = metric_writers.create_default_writer(str(workdir), just_logging=not self.primary)
      self.progress = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=self.writer,
                                                      every_steps=log_every_steps)
    self.pending: list[tuple[int, dict]] = []
    self.start_clock(start)

  def start_clock(self, step: int):
    """Speed and ETA count from here: called again once the step is compiled, so they leave it out."""
    self.last_time, self.last_step = time.time(), step

  def add(self, step: int, metrics: dict):
    self.pending.append((step, metrics))
    if self.progress:
      self.progress(step)

  def write(self, step: int, scalars: dict):
    if self.writer:
      self.writer.write_scalars(step, scalars)
    if self.primary:
      with open(self.workdir / 'metrics.jsonl', 'a') as f:
        f.write(json.dumps({'step': step, **scalars}) + '\n')

  def flush(self, step: int, last_good: Optional[int]):
    """Writes the pending steps (means; COUNTS summed); raises FloatingPointError naming the first
    non-finite one."""
    fetched = [(s, jax.device_get(m)) for s, m in self.pending]
    self.pending = []
    for bad_step, metrics in fetched:
      for name, value in metrics.items():
        if not np.all(np.isfinite(value)):
          raise FloatingPointError(
              f'Non-finite {name} at step {bad_step}; stopping. The last good checkpoint is '
              f'{"step " + str(last_good) if last_good is not None else "none"} in {self.workdir / "checkpoints"}.')
    if not fetched:
      return
    reduce = lambda k: np.sum if k in COUNTS else np.mean
    line = {k: float(reduce(k)([m[k] for _, m in fetched])) for k in fetched[-1][1]}
    seconds_per_step = max(time.time() - self.last_time, 1e-9) / max(step - self.last_step, 1)
    line['images_per_s'] = self.batch_size / seconds_per_step
    self.write(step, line)
    if self.primary:
      print(progress_line(step, self.total_steps, self.steps_per_epoch, line, seconds_per_step,
                          self.batch_size), flush=True)
      self.warn_of_collapse(fetched)
    self.start_clock(step)

  def warn_of_collapse(self, fetched: list[tuple[int, dict]]):
    """One warning per level whose teacher entropy stayed at ln K over all the steps of a log line."""
    for level in LEVELS:
      key = f'teacher_entropy/{level}'
      if level in self.collapsed or any(key not in m for _, m in fetched):
        continue
      if all(m[key] >= self.uniform_entropy - COLLAPSE_NATS for _, m in fetched):
        self.collapsed.add(level)
        logging.warning(
            'The %s level has collapsed to a uniform output: its teacher entropy stayed within %.2f nats of '
            'ln K = %.2f over steps %d-%d (logit_spread/%s, the per-image signal, is in the metrics). Lower '
            'udi.teacher_temp first; a faster EMA (udi.momentum_teacher) or a lower optim.lr may help too; '
            'see README, Troubleshooting.', level, COLLAPSE_NATS, self.uniform_entropy, fetched[0][0],
            fetched[-1][0], level)

  def close(self):
    if self.writer:
      self.writer.flush()

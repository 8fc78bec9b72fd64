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
from typing import NamedTuple, Optional

import jax
import numpy as np
from absl import logging

from udi_jax.models.networks import LEVELS
from udi_jax.say import say

COUNTS = ('skipped_images',)      # summed over the steps of a log line; the other metrics are averaged
# The collapse monitor and other health metrics: they describe the run and never stop it. A non-finite
# value (e.g. a patch-level spread in a step without a valid point) means "not measured at that step".
HEALTH = ('teacher_entropy/', 'kl/', 'valid_fraction/', 'logit_spread/', 'prototypes_used/')
COLLAPSE_NATS = 0.05              # a level whose teacher entropy stays this close to ln K has collapsed


def progress_line(step: int, total: int, steps_per_epoch: int, m: dict, seconds_per_step: Optional[float],
                  batch_size: int) -> str:
  """The line printed at a log step; `seconds_per_step` None: no step timed yet (the first, compiled)."""
  levels = ' '.join(f'{level} {m[f"loss/{level}"]:.3f}' for level in LEVELS if f'loss/{level}' in m)
  speed = 'speed from the next line (the first step compiles)'
  if seconds_per_step is not None:
    eta = time.strftime('%H:%M:%S', time.gmtime(max(total - step, 0) * seconds_per_step))
    speed = f'{batch_size / seconds_per_step:.1f} img/s, ETA {eta}'
  return (f'step {step}/{total} (epoch {(step - 1) // steps_per_epoch}) loss {m["loss"]:.4f} [{levels}] '
          f'lr {m["lr"]:.2e} T_t {m["teacher_temp"]:.4f} | {speed}')


def clock() -> float:
  """Seconds on a monotonic clock: what the speed and the ETA are measured with."""
  return time.monotonic()


def clu_writers():
  """clu's metric writers and periodic actions. They load TensorFlow (seconds), so they are imported when
  a run starts (a bad config fails at once); without TensorFlow they cannot be imported at all."""
  from clu import metric_writers, periodic_actions
  return metric_writers, periodic_actions


class Cut(NamedTuple):
  """What cutting a log back to a step dropped: entries past the step, and entries that could not be read
  (a line or record cut short by a SIGKILL or a full disk)."""
  after: int
  damaged: int


def _step_of_line(line: str) -> Optional[int]:
  """The step of a `metrics.jsonl` line, or None where the line is not a whole JSON object with a step."""
  try:
    step = json.loads(line)['step']
  except (ValueError, TypeError, KeyError):
    return None
  return step if isinstance(step, int) else None


def cut_metrics_file(path: pathlib.Path, last_step: int) -> Cut:
  """Keeps the lines of `metrics.jsonl` that parse and have a step at or below `last_step`."""
  if not path.is_file():
    return Cut(0, 0)
  lines = [line for line in path.read_text(errors='replace').splitlines(keepends=True) if line.strip()]
  steps = [_step_of_line(line) for line in lines]
  kept = [line if line.endswith('\n') else line + '\n'
          for line, step in zip(lines, steps) if step is not None and step <= last_step]
  damaged = steps.count(None)
  if len(kept) < len(lines) or path.stat().st_size != sum(map(len, kept)):
    temporary = path.with_name(path.name + '.cut')
    temporary.write_text(''.join(kept))
    os.replace(temporary, path)
  return Cut(len(lines) - len(kept) - damaged, damaged)


def _events(path: pathlib.Path) -> tuple[list[tuple[bytes, int]], bool]:
  """The records of an events file that read and parse, with their steps, and whether the file held more
  (a damaged record: TensorBoard's reader stops there)."""
  from google.protobuf.message import DecodeError
  from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
  from tensorboard.compat.proto.event_pb2 import Event
  records, damaged = [], False
  for record in RawEventFileLoader(str(path)).Load():
    try:
      records.append((record, Event.FromString(record).step))
    except DecodeError:
      damaged = True
      break
  framed = sum(len(record) + 16 for record, _ in records)     # length, its CRC, the data, the data's CRC
  return records, damaged or framed < path.stat().st_size


def cut_events_files(workdir: pathlib.Path, last_step: int) -> Cut:
  """Drops the TensorBoard events past `last_step`, and a damaged record with whatever follows it, from
  the events files of `workdir`. TensorBoard would otherwise draw the killed run's steps and the resumed
  run's on top of each other."""
  paths = sorted(workdir.glob('events.out.tfevents.*'))
  if not paths:
    return Cut(0, 0)
  from tensorboard.summary.writer.record_writer import RecordWriter
  after = damaged = 0
  for path in paths:
    records, cut_short = _events(path)
    kept = [record for record, step in records if step <= last_step]
    if len(kept) < len(records) or cut_short:
      temporary = path.with_name(path.name + '.cut')
      with open(temporary, 'wb') as f:
        writer = RecordWriter(f)
        for record in kept:
          writer.write(record)
      os.replace(temporary, path)
      after, damaged = after + len(records) - len(kept), damaged + int(cut_short)
  return Cut(after, damaged)


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
      if any(lines) or any(events):
        unreadable = (f'; {lines.damaged} unreadable lines and {events.damaged} unreadable TensorBoard records '
                      '(cut short) also dropped' if lines.damaged or events.damaged else '')
        say(f'Dropped what an interrupted run had logged after step {start} ({lines.after} lines of '
            f'metrics.jsonl, {events.after} TensorBoard values): those steps are trained again{unreadable}.')
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
    """Speed and ETA count from the end of `step`: the loop calls this again after the first step, whose
    call compiles, so they leave the compilation out."""
    self.last_time, self.last_step = clock(), step

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
        if not name.startswith(HEALTH) and not np.all(np.isfinite(value)):
          raise FloatingPointError(
              f'Non-finite {name} at step {bad_step}; stopping. The last good checkpoint is '
              f'{"step " + str(last_good) if last_good is not None else "none"} in {self.workdir / "checkpoints"}.')
    if not fetched:
      return
    line = {}
    for name in fetched[-1][1]:
      values = [float(m[name]) for _, m in fetched if np.isfinite(m[name])]   # health: the measured steps
      if values:
        line[name] = float(np.sum(values) if name in COUNTS else np.mean(values))
    seconds_per_step = None
    if step > self.last_step:
      seconds_per_step = max(clock() - self.last_time, 1e-9) / (step - self.last_step)
      line['images_per_s'] = self.batch_size / seconds_per_step
    self.write(step, line)
    if self.primary:
      say(progress_line(step, self.total_steps, self.steps_per_epoch, line, seconds_per_step,
                        self.batch_size))
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
            'see docs/troubleshooting.md.', level, COLLAPSE_NATS, self.uniform_entropy, fetched[0][0],
            fetched[-1][0], level)

  def close(self):
    if self.writer:
      self.writer.flush()

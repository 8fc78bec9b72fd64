r"""Train UDI: `python -m udi_jax.main --config=configs/vits16.py [--workdir=DIR]`.

Overrides: `--config.optim.lr=1e-3 --config.batch_size=512 ...`. The config is validated before anything
runs. The workdir defaults to `runs/<config name>`; running the same command again resumes from its
newest checkpoint.

Multi-host: `--distributed` calls `jax.distributed.initialize()`, which needs no arguments on Cloud TPU
pods and under SLURM; elsewhere give `--coordinator_address=host:port --num_processes=N --process_id=i`.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import pathlib
import sys
from typing import Optional

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from udi_jax.errors import UserError, config_errors
from udi_jax.say import say

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/vits16.py or configs/demo.py:digits.',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Where checkpoints, logs and results go (default: runs/<config name>).')
flags.DEFINE_enum('mode', 'train', ['train', 'eval'],
                  'train (resumes from the workdir), or eval: config.eval.protocols on a checkpoint '
                  '(config.eval.checkpoint, default the newest of --workdir), results in WORKDIR/eval/.')
flags.DEFINE_bool('distributed', False, 'Call jax.distributed.initialize() (multi-host).')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (multi-host without TPU/SLURM).')
flags.DEFINE_integer('num_processes', None, 'Number of processes (multi-host without TPU/SLURM).')
flags.DEFINE_integer('process_id', None, 'This process (multi-host without TPU/SLURM).')


def default_workdir(config_path: str) -> str:
  path, _, arg = config_path.partition(':')
  return str(pathlib.Path('runs') / (pathlib.Path(path).stem + (f'_{arg}' if arg else '')))


def config_fields(config_arg: str) -> list[str]:
  """The dotted names of every field of the config that `--config=FILE[:ARG]` names ([] if it cannot be
  loaded)."""
  path, _, arg = config_arg.partition(':')
  try:
    spec = importlib.util.spec_from_file_location('config_file', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg) if arg else module.get_config()
  except Exception:   # pylint: disable=broad-except  (the suggestion is optional; the refusal stands)
    return []

  def walk(node, prefix):
    for key, value in node.items():
      if isinstance(value, ml_collections.ConfigDict):
        yield from walk(value, f'{prefix}{key}.')
      else:
        yield f'{prefix}{key}'
  return list(walk(config, ''))


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing; an override of a field the config does not have is refused in one sentence
  (exit 2), with the nearest field the config does have, instead of ml_collections' traceback."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError):
    config_arg = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), '')
    fields = config_fields(config_arg)
    overrides = [a[2:].split('=')[0][len('config.'):] for a in argv if a.startswith('--config.')]
    unknown = [o for o in overrides if o not in fields] or overrides
    field = unknown[0] if unknown else 'an override'
    near = difflib.get_close_matches(field, fields, n=1, cutoff=0.6)
    hint = f' (did you mean config.{near[0]}?)' if near else ''
    print(f'Config error: config.{field} is not a field of {config_arg.split(":")[0] or "the config file"}{hint}; '
          'an override can only set a field the config file defines.', file=sys.stderr)
    sys.exit(2)


def initialize_distributed():
  explicit = FLAGS.coordinator_address is not None
  if not (FLAGS.distributed or explicit):
    return
  if jax.config.jax_platforms in (None, '', 'cpu') and explicit:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                             num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  logging.info('Process %d of %d, %d local devices of %d.', jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if FLAGS.config is None:
    raise app.UsageError('--config is required, e.g. --config=configs/demo.py')
  if not FLAGS['verbosity'].present:   # library INFO chatter (orbax, clu) off; progress is printed
    logging.set_verbosity(logging.WARNING)
  initialize_distributed()
  # After jax.distributed.initialize: nothing may touch the devices before it.
  from udi_jax.evaluate.report import final_report, report_written
  from udi_jax.train.loop import train_and_evaluate
  config = FLAGS.config
  workdir = pathlib.Path(FLAGS.workdir or default_workdir(config_flags.get_config_filename(FLAGS['config'])))
  try:
    if FLAGS.mode == 'eval':
      evaluate_checkpoint(config, workdir)
      return
    result = train_and_evaluate(config, workdir)
  except UserError as e:
    print(f'{e.label}: {e}', file=sys.stderr)
    sys.exit(2)
  except FloatingPointError as e:
    print(f'Training stopped: {e}', file=sys.stderr)
    sys.exit(1)
  if config.eval.report and result.completed and (result.trained_steps or not report_written(workdir)):
    final_report(config, result.trainer.nets, result.state, workdir, result.trainer.schedules.steps_per_epoch)


def eval_checkpoint_path(checkpoint: str, workdir: pathlib.Path) -> tuple[pathlib.Path, Optional[int]]:
  """(run, step) that config.eval.checkpoint names: '' = the workdir's newest, a number = that step of the
  workdir, a path = another run (its workdir or checkpoints/ directory), its newest."""
  if not checkpoint:
    return workdir, None
  if checkpoint.isdigit():
    return workdir, int(checkpoint)
  return pathlib.Path(checkpoint), None


def evaluate_checkpoint(config, workdir: pathlib.Path) -> dict:
  """Restores a checkpoint's network (config.eval.network) and runs config.eval.protocols on it."""
  from udi_jax.evaluate import run as evaluation
  from udi_jax.train.checkpoint import restore_run
  with config_errors():
    evaluation.check_config(config)
  run, step = eval_checkpoint_path(config.eval.checkpoint, workdir)
  with config_errors():
    restored = restore_run(run, step, config=config)
  params = evaluation.evaluated_network(config, restored.state)
  name = f'step{restored.step}_{config.eval.network}'
  results = evaluation.evaluate(config, restored.trainer.nets, params, workdir, name,
                                tuple(config.eval.protocols), centres=restored.state.centres)
  if jax.process_index() == 0:
    summary = {k: results[k] for k in config.eval.protocols}
    say(json.dumps(summary, indent=1, default=float)[:4000])
    say(f'Results: {workdir / "eval" / (name + ".json")}')
  return results


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)

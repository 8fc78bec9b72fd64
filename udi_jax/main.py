r"""Train UDI: `python -m udi_jax.main --config=configs/vits16.py [--workdir=DIR]`.

Overrides: `--config.optim.lr=1e-3 --config.batch_size=512 ...`. The config is validated before anything
runs. The workdir defaults to `runs/<config name>`; running the same command again resumes from its
newest checkpoint.

Multi-host: `--distributed` calls `jax.distributed.initialize()`, which needs no arguments on Cloud TPU
pods and under SLURM; elsewhere give `--coordinator_address=host:port --num_processes=N --process_id=i`.
"""

from __future__ import annotations

import pathlib
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from udi_jax.config_check import ConfigError, validate

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/vits16.py or configs/demo.py:digits.',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Where checkpoints, logs and results go (default: runs/<config name>).')
flags.DEFINE_enum('mode', 'train', ['train'], 'What to run.')
flags.DEFINE_bool('distributed', False, 'Call jax.distributed.initialize() (multi-host).')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (multi-host without TPU/SLURM).')
flags.DEFINE_integer('num_processes', None, 'Number of processes (multi-host without TPU/SLURM).')
flags.DEFINE_integer('process_id', None, 'This process (multi-host without TPU/SLURM).')


def default_workdir(config_path: str) -> str:
  path, _, arg = config_path.partition(':')
  return str(pathlib.Path('runs') / (pathlib.Path(path).stem + (f'_{arg}' if arg else '')))


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
  config = FLAGS.config
  workdir = FLAGS.workdir or default_workdir(config_flags.get_config_filename(FLAGS['config']))
  try:
    validate(config, jax.device_count(), jax.process_count())
  except ConfigError as e:
    print(f'Config error: {e}', file=sys.stderr)
    sys.exit(2)
  from udi_jax.train.loop import train_and_evaluate   # after jax.distributed.initialize
  try:
    train_and_evaluate(config, workdir)
  except FloatingPointError as e:
    print(f'Training stopped: {e}', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  app.run(main)

"""Config validation: an impossible value is refused before anything runs, with one sentence naming the
field and the fix."""

from __future__ import annotations

from udi_jax.data.pipeline import settings_from_config
from udi_jax.evaluate.features import KINDS
from udi_jax.evaluate.run import NETWORKS
from udi_jax.method.objective import ObjectiveSettings
from udi_jax.method.sampling import SamplingSettings
from udi_jax.models.networks import build_networks
from udi_jax.train.optimizer import OptimizerSettings
from udi_jax.train.step import PARALLEL

EVAL_TOKENS = KINDS[:4]         # 'linear' is the probe's own feature, not a token choice


class ConfigError(ValueError):
  """A config value that cannot work."""


def _require(ok: bool, message: str):
  if not ok:
    raise ConfigError(message)


def validate(config, num_devices: int, num_processes: int = 1) -> None:
  """Raises ConfigError for the first impossible value."""
  try:
    _validate(config, num_devices, num_processes)
  except ConfigError:
    raise
  except ValueError as e:     # the settings classes' own checks already speak to the user
    raise ConfigError(str(e)) from e


def _validate(config, num_devices: int, num_processes: int) -> None:
  data, model = config.data, config.model
  _require(config.batch_size > 0 and config.batch_size % num_devices == 0,
           f'config.batch_size={config.batch_size} does not divide over {num_devices} devices; '
           f'use a positive multiple of {num_devices}.')
  _require(config.epochs > 0, f'config.epochs={config.epochs} must be positive.')
  _require(config.parallel in PARALLEL, f'config.parallel={config.parallel!r} is not known; use one of {PARALLEL}.')
  _require(config.parallel != 'pmap' or num_processes == 1,
           "config.parallel='pmap' runs on one process; use config.parallel='shard_map' on several hosts.")
  for name in ('global_size', 'local_size'):
    size = data[name]
    _require(size > 0 and size % model.patch_size == 0,
             f'config.data.{name}={size} is not a multiple of config.model.patch_size={model.patch_size}; '
             f'choose a multiple of it.')
  _require(data.num_local >= 0, f'config.data.num_local={data.num_local} must be 0 or more.')
  for name in ('global_scale', 'local_scale'):
    lo, hi = data[name]
    _require(0 < lo <= hi <= 1, f'config.data.{name}={tuple(data[name])} must satisfy 0 < min <= max <= 1.')
  _require(config.optim.warmup_epochs <= config.epochs,
           f'config.optim.warmup_epochs={config.optim.warmup_epochs} exceeds config.epochs={config.epochs}; '
           'shorten the warm-up.')
  _require(config.udi.student_temp > 0 and config.udi.teacher_temp > 0 and config.udi.warmup_teacher_temp > 0,
           'The temperatures (config.udi.student_temp, teacher_temp, warmup_teacher_temp) must be positive.')
  _require(0 <= config.udi.center_momentum < 1,
           f'config.udi.center_momentum={config.udi.center_momentum} must lie in [0, 1).')
  _require(data.num_workers >= 0 and data.num_threads >= 1,
           'config.data.num_workers must be >= 0 and config.data.num_threads >= 1.')
  _require(data.source.partition(':')[0] in ('tfds', 'imagefolder', 'mnist5k', 'digits'),
           f'config.data.source={data.source!r} is not known; use tfds:NAME[:SPLIT], imagefolder:PATH, '
           'mnist5k[:SPLIT] or digits[:SPLIT].')
  _require(config.log_every_steps > 0 and config.checkpoint_every_steps >= 0 and config.keep_checkpoints >= 1,
           'config.log_every_steps must be positive, checkpoint_every_steps >= 0 and keep_checkpoints >= 1.')
  if config.init_from.startswith('torch:'):
    import pathlib
    _require(pathlib.Path(config.init_from[len('torch:'):]).is_file(),
             f'config.init_from={config.init_from}: no such file; give torch:PATH to a .pth or .safetensors file.')
  udi = config.udi
  _require(not udi.local_patch_loss or (udi.include_patch and data.num_local > 0),
           'config.udi.local_patch_loss=True needs the patch branch and local crops; set '
           'config.udi.include_patch=True and config.data.num_local > 0, or local_patch_loss=False.')
  if 'eval' in config:
    _require(config.eval.network in NETWORKS,
             f'config.eval.network={config.eval.network!r} is not known; use one of {NETWORKS}.')
    unknown = [t for t in config.eval.tokens if t not in EVAL_TOKENS]
    _require(not unknown, f'config.eval.tokens holds {unknown}; choose from {EVAL_TOKENS}.')
  build_networks(config)
  SamplingSettings.from_config(config)
  ObjectiveSettings.from_config(config)
  OptimizerSettings.from_config(config)
  settings_from_config(config)

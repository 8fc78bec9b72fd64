r"""Export a checkpoint to PyTorch: `python -m udi_jax.export --workdir=RUN --format=FORMAT --out=FILE`.

Formats (UDI_SPEC §7):
- `timm`: a state dict for `timm.models.vision_transformer.VisionTransformer(class_token=True,
  reg_tokens=1)` (token 1 as the register token; a 1-token model maps to a plain timm ViT). Written as
  .safetensors without torch, or .pth with torch. `--img-size=S` bakes the positional table for S px with
  the official interpolation (timm's own resampling differs). The command prints the line that builds
  the matching model.
- `udi`: the official ISL-CV/udi training-checkpoint layout (`teacher`, `student` with `module.`, the
  read-out, `head.0/1/2`, centres under `udi_loss`), as .pth (needs torch).
- `dino`: the 1-token DINO/mmdet backbone layout. LOSSY for UDI models: token 1 and its positional row
  are dropped, which changes the network; for legacy evaluation code only.

The teacher (EMA) is exported by default (`--which=student` for the student). The same as a function:
`export(workdir, format, out, step=None, img_size=None, which='teacher')`.
"""

from __future__ import annotations

import pathlib
import sys
from typing import Optional

import jax
import numpy as np
from absl import app, flags
from ml_collections import ConfigDict

from udi_jax.interop import layouts, official, torch_files

FLAGS = flags.FLAGS


def restore_network(workdir: str | pathlib.Path, step: Optional[int] = None):
  """(config, nets, state, step) of a run's checkpoint (the newest by default)."""
  from udi_jax.train.checkpoint import Checkpoints
  from udi_jax.train.loop import trainer_from_config
  from udi_jax.train.state import abstract_state
  workdir = pathlib.Path(workdir)
  directory = workdir / 'checkpoints' if (workdir / 'checkpoints').is_dir() else workdir
  checkpoints = Checkpoints(directory, asynchronous=False)
  if checkpoints.latest_step() is None:
    raise FileNotFoundError(f'No checkpoint in {directory}; train first or point --workdir at a run.')
  config = ConfigDict(checkpoints.restore_config(step))
  trainer = trainer_from_config(config, steps_per_epoch=1)        # shapes only
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('data',))
  state, _, step = checkpoints.restore(abstract_state(trainer.nets, trainer.tx, mesh), step)
  checkpoints.close()
  return config, trainer.nets, jax.device_get(state), step


def payload(format: str, nets, student, teacher, centres, img_size: Optional[int] = None,
            which: str = 'teacher', epoch: int = 0):
  """The exported object: a flat state dict (timm, dino) or the nested official checkpoint (udi)."""
  if format not in layouts.FORMATS:
    raise ValueError(f'Unknown format {format!r}; choose one of {layouts.FORMATS}.')
  if which not in ('teacher', 'student'):
    raise ValueError(f"--which={which!r}: choose 'teacher' or 'student'.")
  if format == 'udi':
    return {'teacher': official.to_official(teacher), 'student': official.to_official(student, prefix='module.'),
            'udi_loss': {'centering.center': official.centres_to_official(centres),
                         'centering.count': np.zeros((3, 1), np.float32)},
            'epoch': epoch}
  params = teacher if which == 'teacher' else student
  convert = layouts.to_timm if format == 'timm' else layouts.to_dino
  return convert(params['backbone'], nets.backbone.patch_size, img_size)


def how_to_load(format: str, nets, out: pathlib.Path, img_size: Optional[int], which: str, step: int) -> str:
  backbone = nets.backbone
  size = img_size or backbone.img_size
  if format == 'udi':
    return (f'Wrote the official UDI checkpoint layout (step {step}) to {out}; load it with '
            f"torch.load('{out}', map_location='cpu') or the official utils.load_pretrained_weights.")
  if format == 'timm':
    build = layouts.timm_constructor(backbone.num_cls_tokens, backbone.embed_dim, backbone.depth,
                                     backbone.num_heads, backbone.patch_size, size)
    loader = (f"safetensors.torch.load_file('{out}')" if out.suffix == '.safetensors' else f"torch.load('{out}')")
    return (f'Wrote the {which} backbone (step {step}) in timm layout to {out}. Load it with:\n'
            f'  import timm, safetensors.torch, torch\n  model = {build}\n'
            f'  model.load_state_dict({loader}, strict=True)')
  lossy = ' LOSSY: token 1 and its positional row were dropped.' if backbone.num_cls_tokens == 2 else ''
  return (f'Wrote the {which} backbone (step {step}) in the DINO 1-token layout to {out}, for a '
          f'vision_transformer.vit_* with patch_size={backbone.patch_size}, img_size=[{size}].{lossy}')


def write(obj, out: pathlib.Path):
  out.parent.mkdir(parents=True, exist_ok=True)
  if out.suffix == '.safetensors':
    torch_files.save_safetensors(obj, out)
  else:
    torch_files.save_pth(obj, out)


def export(workdir: str | pathlib.Path, format: str, out: str | pathlib.Path, step: Optional[int] = None,
           img_size: Optional[int] = None, which: str = 'teacher') -> str:
  """Writes the file and returns a sentence saying how to load it."""
  out = pathlib.Path(out)
  if out.suffix not in ('.safetensors', '.pth'):
    raise ValueError(f'--out={out} must end in .safetensors or .pth.')
  if format == 'udi' and out.suffix != '.pth':
    raise ValueError('The udi layout is a nested training checkpoint: write it as .pth (needs torch).')
  config, nets, state, step = restore_network(workdir, step)
  epoch = step // max(1, _steps_per_epoch(config))
  obj = payload(format, nets, state.student, state.teacher, state.centres, img_size, which, epoch)
  write(obj, out)
  return how_to_load(format, nets, out, img_size, which, step)


def _steps_per_epoch(config) -> int:
  from udi_jax.data.sources import limit, open_source
  try:
    source = limit(open_source(config.data.source, config.data.data_dir or None), config.data.max_examples)
  except ValueError:
    return 1       # the data is not here: the epoch count is informational only
  return len(source) // config.batch_size


def _define_flags():
  flags.DEFINE_string('workdir', None, 'The run to export (its checkpoints/).')
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: the newest).')
  flags.DEFINE_enum('format', 'timm', list(layouts.FORMATS), 'timm (exact), udi (official), dino (lossy).')
  flags.DEFINE_string('out', None, 'Output file: .safetensors or .pth.')
  flags.DEFINE_integer('img_size', None, 'Bake the positional table for this input size (timm, dino); '
                       '--img-size also works.')
  flags.DEFINE_enum('which', 'teacher', ['teacher', 'student'], 'Which network to export.')


def main(argv):
  del argv
  if not FLAGS.workdir or not FLAGS.out:
    raise app.UsageError('--workdir and --out are required.')
  try:
    print(export(FLAGS.workdir, FLAGS.format, FLAGS.out, FLAGS.step, FLAGS.img_size, FLAGS.which))
  except (ValueError, FileNotFoundError, RuntimeError) as e:
    print(f'Export failed: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  _define_flags()     # here, not at import: udi_jax.main defines --workdir too
  sys.argv = [a.replace('--img-size', '--img_size', 1) if a.startswith('--img-size') else a for a in sys.argv]
  app.run(main)

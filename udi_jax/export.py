r"""Export a checkpoint to PyTorch: `python -m udi_jax.export --workdir=RUN --format=FORMAT --out=FILE`.

Formats (docs/method.md §7):
- `timm`: a state dict for `timm.models.vision_transformer.VisionTransformer(class_token=True,
  reg_tokens=1)` (token 1 as the register token; a 1-token model maps to a plain timm ViT). Written as
  .safetensors without torch, or .pth with torch. `--img_size=S` bakes the positional table for S px with
  the official interpolation (timm's own resampling differs). The command prints the line that builds
  the matching model.
- `udi`: the official ISL-CV/udi training-checkpoint layout (`teacher`, `student` with `module.`, the
  read-out, `head.0/1/2`, centres under `udi_loss`), as .pth (needs torch).
- `dino`: the 1-token DINO/mmdet backbone layout. LOSSY for UDI models: token 1 and its positional row
  are dropped, which changes the network; for legacy evaluation code only.
- `hf`: a Hugging Face-style model folder (`--out=DIR`: `config.json` and `model.safetensors`, as timm's
  `save_for_hf` writes them), loaded offline with `timm.create_model('local-dir:DIR', pretrained=True)`
  and uploaded with `huggingface-cli upload USER/NAME DIR` (needs torch and timm).

The teacher (EMA) is exported by default (`--which=student` for the student). The same as a function:
`export(workdir, format, out, step=None, img_size=None, which='teacher')`.
"""

from __future__ import annotations

import pathlib
import sys
from typing import Optional

from absl import app, flags, logging

from udi_jax.errors import UserError
from udi_jax.interop import layouts, torch_files
from udi_jax.say import say
from udi_jax.train.checkpoint import restore_run

FLAGS = flags.FLAGS


def export(workdir: str | pathlib.Path, format: str, out: str | pathlib.Path, step: Optional[int] = None,
           img_size: Optional[int] = None, which: str = 'teacher') -> str:
  """Writes the file and returns a sentence saying how to load it."""
  out = pathlib.Path(out)
  if format == 'hf':
    return _export_folder(workdir, out, step, img_size, which)
  if out.suffix not in ('.safetensors', '.pth'):
    raise ValueError(f'--out={out} must end in .safetensors or .pth.')
  if format == 'udi' and out.suffix != '.pth':
    raise ValueError('The udi layout is a nested training checkpoint: write it as .pth (needs torch).')
  run = restore_run(workdir, step)
  nets, state = run.trainer.nets, run.state
  obj = layouts.payload(format, nets, state.student, state.teacher, state.centres, img_size, which,
                        epoch=int(run.data_state['epoch']))
  torch_files.save(obj, out)
  return layouts.how_to_load(format, nets, out, img_size, which, run.step)


def _export_folder(workdir, out: pathlib.Path, step: Optional[int], img_size: Optional[int], which: str) -> str:
  """The timm layout as a model folder with its config and preprocessing (ImageNet normalisation, bicubic
  resize of 256/224 of the crop, as the evaluation)."""
  from udi_jax.data.photometric import IMAGENET_MEAN, IMAGENET_STD
  if out.suffix:
    raise ValueError(f'--out={out} must be a directory for the hf format (it gets config.json and '
                     'model.safetensors).')
  run = restore_run(workdir, step)
  params = run.state.teacher if which == 'teacher' else run.state.student
  args = layouts.timm_model_args(run.trainer.nets, img_size)
  torch_files.save_timm_folder(layouts.to_timm(params['backbone'], run.trainer.nets.backbone.patch_size, img_size),
                               args, out, {'mean': IMAGENET_MEAN, 'std': IMAGENET_STD, 'interpolation': 'bicubic',
                                           'crop_pct': 224 / 256})
  return (f"Wrote the {which} backbone (step {run.step}) as a model folder in {out}. Load it with:\n"
          f"  import timm\n  model = timm.create_model('local-dir:{out}', pretrained=True)\n"
          f"Publish it with: huggingface-cli upload USER/NAME {out}")


def _define_flags():
  flags.DEFINE_string('workdir', None, 'The run to export (its checkpoints/).')
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: the newest).')
  flags.DEFINE_enum('format', 'timm', list(layouts.FORMATS) + ['hf'],
                    'timm (exact), udi (official), dino (lossy), hf (a timm model folder).')
  flags.DEFINE_string('out', None, 'Output file: .safetensors or .pth; a directory for hf.')
  flags.DEFINE_integer('img_size', None, 'Bake the positional table for this input size (timm, dino).')
  flags.DEFINE_enum('which', 'teacher', ['teacher', 'student'], 'Which network to export.')


def main(argv):
  del argv
  if not FLAGS.workdir or not FLAGS.out:
    raise app.UsageError('--workdir and --out are required.')
  if not FLAGS['verbosity'].present:   # orbax's INFO chatter off; the result is printed
    logging.set_verbosity(logging.WARNING)
  try:
    say(export(FLAGS.workdir, FLAGS.format, FLAGS.out, FLAGS.step, FLAGS.img_size, FLAGS.which))
  except (UserError, ValueError, FileNotFoundError, RuntimeError) as e:
    print(f'Export failed: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  _define_flags()     # here, not at import: udi_jax.main defines --workdir too
  app.run(main)

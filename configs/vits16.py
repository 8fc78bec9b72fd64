"""ViT-S/16 UDI: the released 300-epoch ImageNet-1K recipe (docs/method.md §5).

Batch 1024, 2x224 + 10x96 crops, AdamW 5e-4 x batch/256 with 10 warm-up epochs and a cosine to 1e-5,
weight decay 0.04 -> 0.1, EMA 0.996 -> 1, teacher temperature 0.04 -> 0.07 over 30 epochs, per-tensor
clipping at 3.0, last layer frozen for 1 epoch, drop path 0.1, norm_last_layer False, K = 65536. This
project's defaults differ from the official code only where docs/method.md §8 says (crop-width bug fixed,
patch loss normalised by the global valid count, bf16 compute instead of fp16);
`configs/vits16.py:official` restores the official behaviour of those switches.

Launch (one GPU node; TPU pods through launch/tpu_pod.sh):
  python -m udi_jax.main --config=configs/vits16.py --workdir=runs/vits16
  python -m udi_jax.main --config=configs/vits16.py:official --workdir=runs/vits16_official
  python -m udi_jax.main --config=configs/vits16.py --config.data.source=imagefolder:/data/imagenet/train
Resume: run the same command again with the same --workdir.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg not in (None, '', 'official'):
    raise ValueError(f'configs/vits16.py takes no argument or "official", not {arg!r}.')
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.batch_size = 1024                 # global batch, over all devices and processes
  config.epochs = 300
  config.max_steps = 0                     # > 0: stop after this many steps (the schedules still span epochs)
  config.parallel = 'shard_map'            # or 'pmap' (one process only)

  config.model = ml_collections.ConfigDict()
  config.model.arch = 'vit_small'          # vit_tiny | vit_small | vit_base | vit_large
  # None: the architecture's own width, depth and heads; set them for smaller models (configs/demo.py).
  config.model.embed_dim = ml_collections.config_dict.placeholder(int)
  config.model.depth = ml_collections.config_dict.placeholder(int)
  config.model.num_heads = ml_collections.config_dict.placeholder(int)
  config.model.patch_size = 16
  config.model.num_cls_tokens = 2          # 2: UDI (z_cls and z_cls+); 1: DINO + patch loss
  config.model.drop_path_rate = 0.1        # student only; the teacher has none
  config.model.srs_num_heads = 0           # read-out heads; 0 = the backbone's
  config.model.out_dim = 65536             # K prototypes
  config.model.head_hidden_dim = 2048
  config.model.head_bottleneck_dim = 256
  config.model.norm_last_layer = False     # the released run learns g
  config.model.shared_head = True          # one head for cls, cls+ and patch (official)
  config.model.dtype = 'bfloat16'          # compute dtype; params, softmax and losses stay float32
  config.model.remat = False               # recompute each block in the backward pass (saves memory)
  config.model.attention = 'auto'          # auto (cuDNN flash on GPUs where it applies, else XLA) | xla | cudnn
                                           # | einsum

  config.udi = ml_collections.ConfigDict()
  config.udi.alpha = 0.5                   # weight of the patch part in the cls+ target
  config.udi.global_window = 3             # SRS window on the 14x14 grid: 16 samples
  config.udi.local_window = 2              # SRS window on the 6x6 grid: 9 samples
  config.udi.sampling = 'stratified'       # or 'fixed' (first cell of each window), 'uniform' (no windows)
  config.udi.include_patch = True          # False: plain DINO (set model.num_cls_tokens=1)
  config.udi.patch_loss_norm = 'global'    # official: 'per_device'
  config.udi.target_mixing = 'logit'       # cls+ target: 'logit' (official) or 'prob' (mixture)
  config.udi.local_patch_loss = False      # official: no patch loss for the local crops
  config.udi.student_temp = 0.1
  config.udi.center_momentum = 0.9
  config.udi.momentum_teacher = 0.996      # EMA, cosine to momentum_teacher_end
  config.udi.momentum_teacher_end = 1.0    # official: 1 (a fixed EMA: equal to momentum_teacher)
  config.udi.warmup_teacher_temp = 0.04
  config.udi.teacher_temp = 0.07
  config.udi.warmup_teacher_temp_epochs = 30

  config.optim = ml_collections.ConfigDict()
  config.optim.lr = 5e-4                   # per 256 images: peak lr = lr * batch_size / 256
  config.optim.min_lr = 1e-5
  config.optim.warmup_epochs = 10
  config.optim.weight_decay = 0.04
  config.optim.weight_decay_end = 0.1
  config.optim.clip_grad = 3.0             # 0 disables clipping
  config.optim.clip_mode = 'per_tensor'    # official; or 'global'
  config.optim.freeze_last_layer_epochs = 1

  config.data = ml_collections.ConfigDict()
  config.data.source = 'tfds:imagenet2012:train'   # or imagefolder:/path/to/train (docs/data.md)
  config.data.data_dir = ''                # tfds data dir; '' = tfds default (~/tensorflow_datasets)
  config.data.global_size = 224
  config.data.local_size = 96
  config.data.num_local = 10
  config.data.max_examples = 0             # > 0: train on the first N examples only (quick runs)
  config.data.global_scale = (0.25, 1.0)
  config.data.local_scale = (0.05, 0.25)
  config.data.fix_crop_width_bug = True    # official: False (docs/method.md §8.5)
  config.data.flip_prob = 0.5              # horizontal flips of each crop (official: 0.5)
  config.data.augment = True               # photometric augmentation on the device
  config.data.blur_radius = (0.1, 2.0)     # Gaussian blur radius range (PIL semantics), at most 2
  config.data.rotation_degrees = 0.0       # each crop turned by U(-d, d) degrees (official: none)
  config.data.translate_fraction = 0.0     # and shifted by U(-t, t) of its side (official: none)
  config.data.num_workers = 8              # grain worker processes per host
  config.data.num_threads = 4              # batches built concurrently per worker
  config.data.device_prefetch = 2          # batches on their way to the devices ahead of the step
  config.data.crops_on = 'auto'            # crop geometry: host | device | auto (device on GPU/TPU, host on CPU)
  config.data.canvas_size = 512            # device crops: images fitted in S x S (ImageNet's mostly unreduced)

  config.eval = ml_collections.ConfigDict()
  config.eval.train_source = 'tfds:imagenet2012:train'        # k-NN bank, linear/low-shot training split
  config.eval.test_source = 'tfds:imagenet2012:validation'
  config.eval.network = 'teacher'          # or 'student'
  config.eval.tokens = ('cls',)            # k-NN features: cls (official), cls_plus, concat, avgpool
  config.eval.knn_every_epochs = 0         # > 0: k-NN during training every N epochs and at the end
  config.eval.batch_size = 256             # global, feature extraction
  config.eval.resize_ratio = 256 / 224     # shorter side to crop x this, then the centre crop (official)
  config.eval.max_train_examples = 0       # > 0: the first N only (quicker k-NN during training)
  config.eval.max_test_examples = 0
  config.eval.protocols = ('knn', 'linear', 'lowshot')     # --mode=eval; the names of udi_jax/evaluate/protocols/
  config.eval.checkpoint = ''              # --mode=eval: '' newest of --workdir, a step, or a path
  config.eval.report = False               # after training: k-NN table vs raw pixels and init, pictures
  # One section per protocol (docs/evaluation.md); `dense` is shared by dense_linear and dense_knn.
  config.eval.knn = ml_collections.ConfigDict({'ks': (10, 20, 100, 200)})
  config.eval.linear = ml_collections.ConfigDict({
      'epochs': 100,
      'lr': 0.02,                          # per 256 examples
      'batch_size': 256,
      'features': ('linear',)})            # official: token 0 of the last 4 blocks; or cls, cls_plus, concat
  config.eval.lowshot = ml_collections.ConfigDict({
      'fractions': (0.01, 0.1),
      'split_dir': ''})                    # SimCLRv2 1percent.txt / 10percent.txt (ImageFolder sources)
  config.eval.dense = ml_collections.ConfigDict({
      'source': '',                        # segdigits[:SEED] | segfolder:ROOT | tfds:scene_parse150
      'num_classes': 0,                    # segfolder / tfds: classes scored; ADE20K: 150 (with the next line)
      # Class id 0 = 'other', ignored, the others shifted down (mmseg's reduce_zero_label); None: yes for
      # ADE20K (tfds:scene_parse150, segfolder:.../ADEChallengeData2016), no otherwise.
      'reduce_zero_label': ml_collections.config_dict.placeholder(bool),
      'size': 0,                           # evaluation crop side (a multiple of the patch); 0 = data.global_size
      'blocks': 1,                         # patch tokens of the last block, or 4: the last four concatenated
      'max_train_examples': 0,             # > 0: the first N only (the training features are held in memory)
      'max_test_examples': 0})
  config.eval.dense_linear = ml_collections.ConfigDict({
      'epochs': 20,
      'lr': 1e-2,                          # AdamW, cosine
      'batch_size': 16})                   # images per step
  config.eval.dense_knn = ml_collections.ConfigDict({
      'k': 20,
      'bank': 200_000})                    # training patches kept in the k-NN bank (a seeded subsample)
  config.eval.diagnostics = ml_collections.ConfigDict({
      'examples': 2048})                   # test images for RankMe, CKA and the teacher's levels (0: all)

  config.log_every_steps = 100
  config.checkpoint_every_steps = 1000     # also at the end of every epoch
  config.checkpoint_every_minutes = 0.0    # > 0: also after this many minutes of training (Colab)
  config.keep_checkpoints = 3
  config.keep_every_epochs = 50            # checkpoints kept for good (0: none)
  config.init_from = ''                    # a workdir or checkpoint directory to start from

  if arg == 'official':
    config.data.fix_crop_width_bug = False
    config.udi.patch_loss_norm = 'per_device'
  return config

"""ViT-S/16 UDI, the released 300-epoch ImageNet-1K recipe (UDI_SPEC §5).

The model and method fields below are the official values, except the deliberate differences of
UDI_SPEC §8 (pooled patch-loss normalisation).
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  config = ml_collections.ConfigDict()

  config.model = ml_collections.ConfigDict()
  config.model.arch = 'vit_small'          # vit_tiny | vit_small | vit_base | vit_large
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

  config.udi = ml_collections.ConfigDict()
  config.udi.alpha = 0.5                   # weight of the patch part in the cls+ target
  config.udi.global_window = 3             # SRS window on the 14x14 grid: 16 samples
  config.udi.local_window = 2              # SRS window on the 6x6 grid: 9 samples
  config.udi.include_patch = True          # False: plain DINO (set model.num_cls_tokens=1)
  config.udi.patch_loss_norm = 'global'    # official: 'per_device'
  config.udi.student_temp = 0.1
  config.udi.center_momentum = 0.9

  config.seed = 0
  config.batch_size = 1024                 # global batch, over all devices and processes

  config.data = ml_collections.ConfigDict()
  config.data.source = 'tfds:imagenet2012:train'   # or imagefolder:/path/to/train (see README)
  config.data.data_dir = ''                # tfds data dir; '' = tfds default (~/tensorflow_datasets)
  config.data.global_size = 224
  config.data.local_size = 96
  config.data.num_local = 10
  config.data.global_scale = (0.25, 1.0)
  config.data.local_scale = (0.05, 0.25)
  config.data.fix_crop_width_bug = True    # official: False (UDI_SPEC §8.5)
  config.data.num_workers = 8              # grain worker processes per host
  config.data.num_threads = 4              # batches built concurrently per worker
  return config

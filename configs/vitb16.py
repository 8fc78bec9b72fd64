"""ViT-B/16 UDI: the ViT-S/16 recipe with the base backbone.

No ViT-B recipe was released with the official code; this one changes only the architecture (width 768,
12 heads) and keeps every other field of `configs/vits16.py`. The read-out has the backbone's width and
heads (docs/method.md §8.4). Take the learning rate as a starting point, not a reproduced value.

Launch:
  python -m udi_jax.main --config=configs/vitb16.py --workdir=runs/vitb16
  python -m udi_jax.main --config=configs/vitb16.py --config.model.remat=True   # less memory per device
"""

import ml_collections

from configs import vits16


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = vits16.get_config(arg)
  config.model.arch = 'vit_base'
  return config

"""This project's ViT against timm's on the CPU, same work: `python benchmarks/cpu_vs_torch.py [--depth=4]`.

Times, alternately in one process, the backbone's forward and backward pass over a UDI step's crops
(2 global views and `--num_local` local crops per image, `--batch` images, fp32, drop path 0.1) in JAX
(this project's `VisionTransformer`) and in PyTorch (timm's `VisionTransformer` with the same widths,
depth, two class tokens and thread count), then the whole UDI step (`udi_jax.benchmark.measure`) at the
same shape. Prints the medians and the ratios. Reference for the whole step (the official PyTorch code on
a 2-core CPU, fp32, batch 4): 5.6 s at ViT-S/16 depth 12, K 65 536, 2×224 + 10×96;
1.32 s at depth 4, K 4 096, 2×224 + 4×96 (`--depth=4 --out_dim=4096 --num_local=4`).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

OFFICIAL_STEP_S = {(12, 65536, 10): 5.6, (4, 4096, 4): 1.32}   # measured as the docstring says


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--depth', type=int, default=12)
  parser.add_argument('--out_dim', type=int, default=65536, help='K, for the whole step')
  parser.add_argument('--num_local', type=int, default=10)
  parser.add_argument('--batch', type=int, default=4, help='images per step')
  parser.add_argument('--repeats', type=int, default=5, help='timed passes per framework (medians)')
  parser.add_argument('--augment', action=argparse.BooleanOptionalAction, default=True,
                      help='photometric augmentation in the whole step')
  return parser.parse_args()


def jax_backbone_pass(config, batch: int):
  """A jitted forward+backward of the backbone over a step's crops, and its inputs."""
  import jax
  import jax.numpy as jnp

  from udi_jax.models.networks import build_networks
  nets = build_networks(config)
  params = nets.init(jax.random.key(0))['backbone']
  g, loc, n = config.data.global_size, config.data.local_size, config.data.num_local
  views = jnp.asarray(jax.random.normal(jax.random.key(1), (2 * batch, g, g, 3)))
  locals_ = jnp.asarray(jax.random.normal(jax.random.key(2), (n * batch, loc, loc, 3)))
  keys = jax.random.split(jax.random.key(3), (2 + n) * batch)

  def loss(p):
    total = 0.0
    for images, rows in ((views, keys[:2 * batch]), (locals_, keys[2 * batch:])):
      out = nets.backbone.apply({'params': p}, images, drop_path_keys=rows)
      total = total + out.cls.sum() + out.patch.mean()
    return total

  step = jax.jit(jax.grad(loss))
  return lambda: jax.block_until_ready(step(params))


def torch_backbone_pass(config, batch: int):
  import timm
  import torch
  torch.set_num_threads(os.cpu_count() or 1)
  m, g, loc, n = config.model, config.data.global_size, config.data.local_size, config.data.num_local
  width = {'vit_tiny': (192, 3), 'vit_small': (384, 6), 'vit_base': (768, 12)}[m.arch]
  model = timm.models.vision_transformer.VisionTransformer(
      img_size=g, patch_size=m.patch_size, embed_dim=m.embed_dim or width[0], depth=m.depth,
      num_heads=m.num_heads or width[1], class_token=True, reg_tokens=1, num_classes=0,
      drop_path_rate=m.drop_path_rate, dynamic_img_size=True)
  model.train()
  views, locals_ = torch.randn(2 * batch, 3, g, g), torch.randn(n * batch, 3, loc, loc)

  def run():
    model.zero_grad(set_to_none=True)
    total = 0.0
    for images in (views, locals_):
      tokens = model.forward_features(images)
      total = total + tokens[:, :2].sum() + tokens[:, 2:].mean()
    total.backward()
  return run


def timed(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def main():
  args = parse_args()
  from absl import flags
  flags.FLAGS.mark_as_parsed()
  import jax

  from configs import vits16
  from udi_jax.benchmark import measure
  config = vits16.get_config()
  config.model.depth, config.model.out_dim, config.data.num_local = args.depth, args.out_dim, args.num_local
  config.model.dtype = 'float32'
  config.data.augment = args.augment
  shape = (f'ViT-S/16 depth {args.depth}, batch {args.batch}, 2x{config.data.global_size} + '
           f'{args.num_local}x{config.data.local_size}, fp32, {os.cpu_count()} threads')
  print(f'Backbone forward+backward, {shape}; JAX {jax.__version__}', flush=True)
  ours, theirs = jax_backbone_pass(config, args.batch), torch_backbone_pass(config, args.batch)
  ours(), theirs()                                           # compile / warm up
  times = {'jax': [], 'torch': []}
  for _ in range(args.repeats):                              # alternately, so drift hits both
    times['jax'].append(timed(ours))
    times['torch'].append(timed(theirs))
  jax_s, torch_s = statistics.median(times['jax']), statistics.median(times['torch'])
  print(f'  JAX {jax_s:.3f} s, timm {torch_s:.3f} s: JAX takes {jax_s / torch_s:.2f}x timm\'s time', flush=True)
  result = measure(config, args.batch, steps=args.repeats, warmup=1, peak=None)
  step_s = result.step_ms / 1e3
  reference = OFFICIAL_STEP_S.get((args.depth, args.out_dim, args.num_local))
  against = (f'; the official step measured {reference:.2f} s: {step_s / reference:.2f}x its time'
             if reference else '')
  print(f'Whole UDI step (K {args.out_dim}, augmentation {"on" if args.augment else "off"}): '
        f'{step_s:.2f} s{against}', flush=True)


if __name__ == '__main__':
  main()

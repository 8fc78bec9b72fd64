r"""How far can the demo's ViT go at the demo's budget? `python benchmarks/demo_ceiling.py`.

Trains the demo's backbone (`configs/demo.py`: 4 blocks, width 64, patch 7, 28-px digits) supervised: a linear
classifier on token 0 after the final norm, cross-entropy on the 4 000 labelled training digits of MNIST-5k,
for the demo's step count and batch (`configs/demo.py` now: 30 epochs of batch 32, 3 750 steps; the first
table in benchmarks/RESULTS.md was made at the earlier demo's 20 epochs of batch 64), AdamW with the demo's
warm-up, schedule shape and weight decay at each peak lr of --peak_lrs (the demo's is 5e-4), each batch
shifted by up to 2 px (no flips: a mirrored digit is another shape). Then the demo's k-NN protocol (k = 20,
test split against the training split) on its token 0, beside the classifier's own test accuracy. This bounds
what self-supervision can reach with this network and budget: the gap between the demo's pretrained teacher
and this number is not the architecture's.
"""

from __future__ import annotations

import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging

flags.DEFINE_string('workdir', 'runs/demo_ceiling', 'Where the result is written.')
flags.DEFINE_integer('seed', 0, 'Initialisation and batch order.')
flags.DEFINE_string('peak_lrs', '5e-4', 'Comma-separated peak learning rates (5e-4: the demo\'s); each is one run.')
FLAGS = flags.FLAGS
SHIFT = 2


def images_and_labels(source, crop: int) -> tuple[np.ndarray, np.ndarray]:
  from udi_jax.data.sources import decode_image
  from udi_jax.evaluate.features import center_crop
  images = np.stack([center_crop(decode_image(source[i]['image']), crop, 1.0) for i in range(len(source))])
  return images, np.asarray([source[i]['label'] for i in range(len(source))], np.int32)


def shifted(images: jax.Array, key: jax.Array) -> jax.Array:
  """Each image moved by up to SHIFT pixels in each direction (edge padding)."""
  size = images.shape[1]
  padded = jnp.pad(images, ((0, 0), (SHIFT, SHIFT), (SHIFT, SHIFT), (0, 0)), mode='edge')
  offsets = jax.random.randint(key, (images.shape[0], 2), 0, 2 * SHIFT + 1)
  crop = lambda image, o: jax.lax.dynamic_slice(image, (o[0], o[1], 0), (size, size, image.shape[-1]))
  return jax.vmap(crop)(padded, offsets)


def train(config, nets, images, labels, seed: int, peak: float) -> tuple[dict, dict, float]:
  """(backbone params, classifier params, final training loss)."""
  from udi_jax.data.photometric import preprocess
  steps_per_epoch = len(images) // config.batch_size
  steps = config.epochs * steps_per_epoch
  # The demo's schedule shape at this peak: its warm-up, then a cosine to the same fraction of the peak as
  # the demo's floor is of its own (1: held, as the demo is now).
  floor = peak * config.optim.min_lr / (config.optim.lr * config.batch_size / 256)
  schedule = optax.warmup_cosine_decay_schedule(0.0, peak, steps_per_epoch * config.optim.warmup_epochs, steps,
                                                floor)
  tx = optax.adamw(schedule, weight_decay=config.optim.weight_decay)
  key = jax.random.key(seed)
  params = {'backbone': nets.init(key)['backbone'],
            'classifier': {'w': jnp.zeros((nets.backbone.embed_dim, 10)), 'b': jnp.zeros(10)}}
  opt_state = tx.init(params)

  def loss_fn(p, x, y):
    token = nets.backbone.apply({'params': p['backbone']}, preprocess(x)).cls[:, 0].astype(jnp.float32)
    logits = token @ p['classifier']['w'] + p['classifier']['b']
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def step(p, s, x, y, k):
    loss, grads = jax.value_and_grad(loss_fn)(p, shifted(x, k), y)
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s, loss

  rng = np.random.default_rng(seed)
  for t in range(steps):
    if t % steps_per_epoch == 0:
      order = rng.permutation(len(images))
    rows = order[(t % steps_per_epoch) * config.batch_size:(t % steps_per_epoch + 1) * config.batch_size]
    params, opt_state, loss = step(params, opt_state, images[rows], labels[rows], jax.random.fold_in(key, t))
  return params['backbone'], params['classifier'], float(loss)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  from configs import demo
  from udi_jax.evaluate.context import eval_sources
  from udi_jax.models.networks import build_networks
  config = demo.get_config()
  config.seed = FLAGS.seed
  nets = build_networks(config)
  train_source, test_source = eval_sources(config)
  data = (images_and_labels(train_source, config.data.global_size),
          images_and_labels(test_source, config.data.global_size))
  directory = pathlib.Path(FLAGS.workdir)
  directory.mkdir(parents=True, exist_ok=True)
  for peak in (float(v) for v in FLAGS.peak_lrs.split(',') if v):
    result = measure(config, nets, data, peak)
    (directory / f'ceiling_lr{peak:g}_seed{FLAGS.seed}.json').write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


def measure(config, nets, data, peak: float) -> dict:
  from udi_jax.data.photometric import preprocess
  from udi_jax.evaluate import run as evaluation
  (train_x, train_y), (test_x, test_y) = data
  started = time.time()
  backbone, classifier, final_loss = train(config, nets, train_x, train_y, FLAGS.seed, peak)
  minutes = (time.time() - started) / 60
  token = nets.backbone.apply({'params': backbone}, preprocess(test_x)).cls[:, 0].astype(jnp.float32)
  predicted = np.asarray(jnp.argmax(token @ classifier['w'] + classifier['b'], -1))
  knn = evaluation.results(evaluation.context(config, nets, {'backbone': backbone}), ('knn',))['knn']
  return {'seed': FLAGS.seed, 'peak_lr': peak, 'steps': config.epochs * (len(train_x) // config.batch_size),
          'final_train_loss': final_loss, 'classifier_top1': float(100 * np.mean(predicted == test_y)),
          'minutes_training': round(minutes, 2), 'knn': {t: round(r['top1@20'], 2) for t, r in knn.items()}}


if __name__ == '__main__':
  app.run(main)

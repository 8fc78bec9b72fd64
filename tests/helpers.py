"""Helpers shared by the tests: error measures, the tiny model and random batches, the subprocess runs of
`udi_jax.main`, and reading a run's checkpoint and metrics.

Two tiny setups: `tiny_config` keeps the real token grids (14x14 global, 6x6 local) for objective-level
tests on random crops; `tests/tiny_train_config.py` is the tiny training run on bundled digits.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import subprocess
import sys
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from udi_jax.parity import max_rel, rel  # noqa: F401  (the tests import them from here)

REPO = pathlib.Path(__file__).resolve().parents[1]
TRAIN_CONFIG = 'tests/tiny_train_config.py'


# ---- Error measures (`rel`, `max_rel`: udi_jax.parity).

def worst_rel(tree, ref) -> float:
  """The largest `rel` over the leaves of two pytrees of the same structure."""
  return max(jax.tree.leaves(jax.tree.map(rel, tree, ref)))


# ---- The tiny model with the real token grids, random inputs.

def tiny_config(num_cls_tokens: int = 2, num_local: int = 3) -> ml_collections.ConfigDict:
  from configs import vits16
  config = vits16.get_config()
  config.model.patch_size = 8                     # 112 px -> 14x14, 48 px -> 6x6 as in the real run
  config.model.embed_dim = 32
  config.model.depth = 2
  config.model.num_heads = 2
  config.model.num_cls_tokens = num_cls_tokens
  config.model.head_hidden_dim = 48
  config.model.head_bottleneck_dim = 24
  config.model.out_dim = 64
  config.model.dtype = 'float32'
  config.data.global_size = 112
  config.data.local_size = 48
  config.data.num_local = num_local
  return config


def random_boxes(rng: np.random.Generator, batch: int, num_local: int) -> np.ndarray:
  """Plausible crop boxes (B, 2+n_l, 4): overlapping global views, locals near them, random flips."""
  boxes = []
  for _ in range(batch):
    per_image = []
    for k in range(2 + num_local):
      size = rng.uniform(0.5, 1.0, 2) if k < 2 else rng.uniform(0.2, 0.5, 2)
      start = rng.uniform(0, 1 - size)
      box = np.concatenate([start, start + size])
      if rng.random() < 0.5:
        box[[1, 3]] = box[[3, 1]]
      per_image.append(box)
    boxes.append(per_image)
  return np.asarray(boxes, np.float32)


def random_batch(config, batch: int, seed: int = 0):
  """Normalised-looking crops and boxes for `batch` images."""
  rng = np.random.default_rng(seed)
  n_local, gs, ls = config.data.num_local, config.data.global_size, config.data.local_size
  crops_global = rng.normal(size=(batch, 2, gs, gs, 3)).astype(np.float32)
  crops_local = rng.normal(size=(batch, n_local, ls, ls, 3)).astype(np.float32)
  return crops_global, crops_local, random_boxes(rng, batch, n_local)


@functools.lru_cache(maxsize=None)
def init_params(nets, seed: int = 0):
  """Fresh params of `nets` (the same for equal networks: tests share them), initialised in one compiled
  program: op by op, the initialisation of even the tiny model costs seconds of small compilations."""
  return jax.jit(nets.init)(jax.random.key(seed))


@functools.lru_cache(maxsize=None)
def _compiled_draw(settings):
  from udi_jax.method.sampling import draw_samples
  return jax.jit(lambda boxes, keys: draw_samples(boxes, keys, settings))


def draw(config, boxes, seed: int = 3):
  """The sampling of `config` for boxes (B, 2+n_l, 4), one key per image from `seed`, compiled once per
  sampling settings."""
  from udi_jax.method.sampling import SamplingSettings
  keys = jax.random.split(jax.random.key(seed), len(boxes))
  return _compiled_draw(SamplingSettings.from_config(config))(jnp.asarray(boxes), keys)


def perturbed_teacher(student, seed: int = 1, scale: float = 0.01):
  """A teacher that differs from the student, as after some EMA steps."""
  leaves, tree = jax.tree.flatten(student)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(tree, [x + scale * rng.normal(size=x.shape).astype(np.float32) for x in leaves])


def centre_table(out_dim: int, seed: int = 2) -> np.ndarray:
  """Non-zero centres in the official (3, K) layout (rows cls, cls_plus, patch), as after some steps."""
  return 0.05 * np.random.default_rng(seed).normal(size=(3, out_dim)).astype(np.float32)


# ---- Subprocess runs of `python -m udi_jax.main` on the tiny training config.

def env(devices: int) -> dict:
  """The environment of a subprocess: `devices` CPU devices, this session's compilation cache, and this
  session's other XLA flags (the same compiled programs as in this process)."""
  flags = [f for f in os.environ.get('XLA_FLAGS', '').split()
           if not f.startswith('--xla_force_host_platform_device_count')]
  e = dict(os.environ)
  e.update(XLA_FLAGS=' '.join([f'--xla_force_host_platform_device_count={devices}'] + flags),
           JAX_PLATFORMS='cpu', JAX_COMPILATION_CACHE_DIR=str(jax.config.jax_compilation_cache_dir),
           JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0.5', PYTHONPATH=str(REPO))
  return e


def start(workdir, *overrides, devices=2, extra_env=None, fault=None) -> subprocess.Popen:
  """`python -m udi_jax.main` on the tiny training config (with a fault of `tests/faulty_main.py`)."""
  entry = ['udi_jax.main'] if fault is None else ['tests.faulty_main', fault]
  command = [sys.executable, '-m', *entry, f'--config={TRAIN_CONFIG}', f'--workdir={workdir}', *overrides]
  return subprocess.Popen(command, cwd=REPO, env={**env(devices), **(extra_env or {})},
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process, timeout=600) -> tuple[int, str, str]:
  out, err = process.communicate(timeout=timeout)
  return process.returncode, out, err


def checkpoint_steps(workdir) -> list[int]:
  directory = pathlib.Path(workdir) / 'checkpoints'
  return sorted(int(p.name) for p in directory.glob('*') if p.name.isdigit()) if directory.is_dir() else []


def wait_for_checkpoint(workdir, step, process, timeout=900) -> int:
  """The newest checkpoint step once it is >= `step` (fails if the process ends first)."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    done = checkpoint_steps(workdir)
    if done and done[-1] >= step:
      return done[-1]
    assert process.poll() is None, finish(process)
    time.sleep(0.05)
  raise TimeoutError(f'no checkpoint {step} in {workdir}')


def damage(run, step):
  """Truncates the largest data file of a checkpoint's state to half, deletes the second largest."""
  files = sorted((p for p in (pathlib.Path(run) / 'checkpoints' / str(step) / 'state').rglob('*')
                  if p.parent.name == 'd'), key=lambda p: p.stat().st_size)
  with open(files[-1], 'r+b') as f:
    f.truncate(files[-1].stat().st_size // 2)
  files[-2].unlink()


# ---- Reading a run.

def metrics_by_step(workdir) -> dict[int, dict]:
  """The logged metrics of every step, merged (a k-NN line joins its step's line)."""
  merged = {}
  for line in (pathlib.Path(workdir) / 'metrics.jsonl').read_text().splitlines():
    row = json.loads(line)
    merged.setdefault(row['step'], {}).update(row)
  return merged


def init_config(init_from: str):
  """The tiny training config for one epoch, started from `init_from` (a run or torch:FILE)."""
  from tests import tiny_train_config
  config = tiny_train_config.get_config()
  config.epochs = 1
  config.init_from = init_from
  return config


def identity_step(trainer, mesh, parallel='shard_map', donate=True):
  """A stand-in for `make_train_step`: the state unchanged (donated, as by the real step, which fails if
  two leaves share a buffer) and zero metrics; nothing to compile."""
  del trainer, mesh, parallel, donate
  zero = lambda: jnp.zeros((), jnp.float32)
  return jax.jit(lambda state, batch: (state, {'loss': zero(), 'lr': zero(), 'teacher_temp': zero()}),
                 donate_argnums=(0,))


def state_handed_to_the_step(config, workdir, monkeypatch):
  """What the training loop hands its step: `train_and_evaluate` with the identity step, so the state it
  returns is the restored or initialised one."""
  from udi_jax.train import loop
  monkeypatch.setattr(loop, 'make_train_step', identity_step)
  return jax.device_get(loop.train_and_evaluate(config, workdir).state)


def restore(workdir, config, step=None):
  """(state, data state) of a checkpoint, on the host."""
  from udi_jax.train.checkpoint import restore_run
  run = restore_run(workdir, step, config=config)
  return run.state, run.data_state


def compare_student(params, ref, ref_grads) -> tuple[float, float]:
  """Worst per-tensor relative error of the student, and the size of the attention key-bias gradients.

  The key part of every fused qkv bias has an exactly zero true gradient (softmax over keys is invariant
  to it), so it holds rounding noise that Adam scales up to lr-sized steps: it differs between any two
  reduction orders, as in the official code. It is left out of the per-tensor comparison (the q and v
  parts are compared) after checking that its gradient is indeed noise (relative to the q/v parts) in
  every gradient of `ref_grads`.
  """
  worst, key_grad = 0.0, 0.0
  for (path, got), want in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(ref)):
    names = [str(getattr(k, 'key', k)) for k in path]
    if names[-2:] == ['qkv', 'bias']:
      width = got.shape[0] // 3
      keep = np.r_[0:width, 2 * width:3 * width]
      worst = max(worst, rel(got[keep], want[keep]))
      for grads in ref_grads:
        grad = grads
        for name in names:
          grad = grad[name]
        key_grad = max(key_grad, np.linalg.norm(grad[width:2 * width]) / np.linalg.norm(grad[keep]))
    else:
      worst = max(worst, rel(got, want))
  return worst, key_grad


# ---- Optimiser internals.

class KeptGradients(NamedTuple):
  grads: Any


def keep_gradients() -> optax.GradientTransformationExtraArgs:
  """An identity transformation whose state holds the gradients it last saw: chained in front of a
  Trainer's optimiser (`optax.chain(keep_gradients(), trainer.tx)`), it exposes the summed gradients of
  every compiled step as `state.opt[0].grads`, with no hook in the library."""
  def update(updates, state, params=None, **extra):
    del state, params, extra
    return updates, KeptGradients(updates)
  return optax.GradientTransformationExtraArgs(
      lambda params: KeptGradients(jax.tree.map(jnp.zeros_like, params)), update)


def adam_moments(opt_state, params):
  """(mu, nu, count) trees shaped like `params`, merged from the optimiser's two groups (count per
  tensor), to compare with torch's per-tensor Adam state."""
  partition_state = next(s for s in opt_state if hasattr(s, 'inner_states'))
  is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)
  by_path = {'mu': {}, 'nu': {}, 'count': {}}
  for masked in partition_state.inner_states.values():
    adam = next(s for s in jax.tree.leaves(masked.inner_state, is_leaf=is_adam) if is_adam(s))
    for field in ('mu', 'nu'):
      for path, leaf in jax.tree_util.tree_flatten_with_path(getattr(adam, field))[0]:
        by_path[field][path] = leaf
        by_path['count'][path] = adam.count
  paths, tree = jax.tree_util.tree_flatten_with_path(params)
  rebuild = lambda field: jax.tree.unflatten(tree, [by_path[field][path] for path, _ in paths])
  return rebuild('mu'), rebuild('nu'), rebuild('count')

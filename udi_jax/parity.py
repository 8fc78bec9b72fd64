"""The official code's golden data as this project's inputs, and the error measures of the parity checks.

The golden files (`udi_golden_small.npz` and its companions) hold one training step of the official
PyTorch code on a small model: its inputs (crops, sampling maps, the networks' state dicts, centres) and
its outputs (loss components, gradients, new centres). `one_step_case` turns them into this project's
inputs and `one_step` runs our objective on them; the tests and `benchmarks/device_check.py` compare.
Where the files live is the caller's choice (the tests read `UDI_GOLDEN_DIR`: docs/design.md, contract 10).
"""

from __future__ import annotations

import json
import pathlib
from typing import Optional

import jax
import ml_collections
import numpy as np

# Our loss components -> the golden file's names.
COMPONENTS = {'g_cls': 'g_cl', 'g_cls_plus': 'g_mcl', 'g_patch': 'g_pch', 'l_cls': 'l_cl',
              'l_cls_plus': 'l_mcl'}
MARKER = 'udi_golden_small.npz'     # a folder holding this file holds the golden data


def find_golden(file: str, *candidates) -> Optional[pathlib.Path]:
  """The first of the candidate folders (None or '' skipped) that holds `file`, or None."""
  return next((pathlib.Path(c) for c in candidates if c and (pathlib.Path(c) / file).is_file()), None)


def rel(a, b) -> float:
  """‖a − b‖ / ‖b‖ in float64 (0-safe)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def max_rel(a, b) -> float:
  """max|a − b| / max|b| in float64: the golden data's measure for tables (centres)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def load(folder: pathlib.Path, name: str) -> dict[str, np.ndarray]:
  with np.load(pathlib.Path(folder) / f'{name}.npz') as data:
    return {k: data[k] for k in data.files}


def load_json(folder: pathlib.Path, name: str) -> dict:
  return json.loads((pathlib.Path(folder) / f'{name}.json').read_text())


def small_config() -> ml_collections.ConfigDict:
  """The golden file's model: ViT-S widths at depth 2, head hidden 192, K 1024, 2 local crops, fp32."""
  from configs import vits16
  config = vits16.get_config()
  config.model.depth = 2
  config.model.head_hidden_dim = 192
  config.model.out_dim = 1024
  config.model.drop_path_rate = 0.0
  config.model.dtype = 'float32'
  config.data.num_local = 2
  config.udi.patch_loss_norm = 'per_device'   # one device: the same as 'global'
  return config


def sparse_rows(dense: np.ndarray, taps: int = 4) -> tuple[np.ndarray, np.ndarray]:
  """Dense read-out maps (..., N) -> the `taps` largest entries' (indices, weights)."""
  idx = np.argsort(-dense, axis=-1, kind='stable')[..., :taps]
  return idx.astype(np.int32), np.take_along_axis(dense, idx, axis=-1).astype(np.float32)


def golden_samples(g: dict[str, np.ndarray]):
  """The official sampling of the golden batch as our `Samples` (rows view-major, see sampling.py)."""
  from udi_jax.method.sampling import Samples
  src = np.concatenate([g['src_maps/0'], g['src_maps/1']])           # student rows [view0; view1]
  num_local = (len([k for k in g if k.startswith('tgt_maps/')]) - 2) // 2
  # Teacher view 0 reads view 1's samples (tgt_maps/1) and local crop k -> view 0 (tgt_maps/3+2k);
  # teacher view 1 reads view 0's samples (tgt_maps/0) and local crop k -> view 1 (tgt_maps/2+2k).
  view0 = np.concatenate([g['tgt_maps/1']] + [g[f'tgt_maps/{3 + 2 * k}'] for k in range(num_local)], 1)
  view1 = np.concatenate([g['tgt_maps/0']] + [g[f'tgt_maps/{2 + 2 * k}'] for k in range(num_local)], 1)
  teacher_idx, teacher_w = sparse_rows(np.concatenate([view0, view1]))
  return Samples(student_idx=src.argmax(-1).astype(np.int32), student_mask=src.sum(-1),
                 teacher_idx=teacher_idx, teacher_w=teacher_w, teacher_mask=teacher_w.sum(-1))


def golden_crops(g: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  """NCHW crops -> global (B, 2, H, W, 3) and local (B, n_l, h, w, 3)."""
  nhwc = lambda k: g[f'crops/{k}'].transpose(0, 2, 3, 1)
  num_crops = len([k for k in g if k.startswith('crops/')])
  return (np.stack([nhwc(0), nhwc(1)], 1), np.stack([nhwc(k) for k in range(2, num_crops)], 1))


def one_step_case(folder: pathlib.Path) -> dict:
  """The golden step as our inputs: config, networks, student and teacher (from the official state
  dicts), crops, the official sampling as `Samples`, the initial centres and the teacher temperature,
  and the golden arrays `g` themselves."""
  from udi_jax.interop import official
  from udi_jax.models.networks import build_networks
  g = load(folder, 'udi_golden_small')
  config = small_config()
  nets = build_networks(config)
  like = jax.eval_shape(nets.init, jax.random.key(0))
  state = lambda who: {k[len(who) + 1:]: v for k, v in g.items() if k.startswith(who + '/')}
  crops_global, crops_local = golden_crops(g)
  return dict(g=g, config=config, nets=nets, student=official.from_official(state('student'), like),
              teacher=official.from_official(state('teacher'), like), crops_global=crops_global,
              crops_local=crops_local, samples=golden_samples(g), grad_names=list(state('grad')),
              centres=official.centres_from_official(g['center_init'], nets.levels),
              teacher_temp=np.float32(load_json(folder, 'udi_golden_small')['config']['teacher_temp_f64']))


def one_step(case: dict):
  """(ObjectiveOutput, gradients of the student) of the golden step, jitted."""
  from udi_jax.method.objective import ObjectiveSettings, udi_objective
  settings = ObjectiveSettings.from_config(case['config'])

  def loss(student):
    return udi_objective(case['nets'], settings, student, case['teacher'], case['centres'],
                         case['crops_global'], case['crops_local'], case['samples'], case['teacher_temp'])

  (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(case['student'])
  return out, grads

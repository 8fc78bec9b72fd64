"""Official ISL-CV/udi state dicts <-> this project's params, as NumPy arrays (docs/method.md §7.1, §7.4).

A network's official keys (no prefix for the teacher, `module.` for the DDP student):
`backbone.backbone.<ViT>`, `backbone.norm1.*` and `backbone.attn.{qkv,proj,norm}.*` (the read-out), and
`head.{0,1,2}.mlp.{0,2,4}.*`, `head.{i}.last_layer.weight_{g,v}`: the shared head appears three times.
Flax module names follow the torch names, so a key is the Flax path with `blocks_i`/`mlp_j` spelt
`blocks.i`/`mlp.j`, plus a per-leaf transform (Linear transpose, Conv HWIO<->OIHW, LN scale<->weight).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import flax
import jax
import numpy as np

from udi_jax.models.networks import LEVELS

Params = dict[str, Any]
# Official order of the three head slots (and of the rows of `udi_loss.centering.center`).
HEAD_SLOTS = {level: i for i, level in enumerate(LEVELS)}
_PREFIX = {'backbone': 'backbone.backbone.', 'readout': 'backbone.'}


def _torch_name(path: tuple[str, ...]) -> str:
  """Flax module path inside a network part (+ leaf) -> torch key suffix, before the leaf rename."""
  parts = [re.sub(r'^(blocks|mlp)_(\d+)$', r'\1.\2', p) for p in path[:-1]]
  leaf = {'kernel': 'weight', 'scale': 'weight'}.get(path[-1], path[-1])
  return '.'.join(parts + [leaf])


def _to_torch(path: tuple[str, ...], x: np.ndarray) -> np.ndarray:
  leaf = path[-1]
  if leaf == 'kernel':
    return x.transpose(3, 2, 0, 1) if x.ndim == 4 else x.T
  if leaf == 'weight_v':
    return x.T
  if leaf == 'weight_g':
    return x.reshape(-1, 1)
  return x


def _from_torch(path: tuple[str, ...], x: np.ndarray) -> np.ndarray:
  leaf = path[-1]
  if leaf == 'kernel':
    return x.transpose(2, 3, 1, 0) if x.ndim == 4 else x.T
  if leaf == 'weight_v':
    return x.T
  if leaf == 'weight_g':
    return x.reshape(1, -1)
  return x


def _key_slots(part: str, rest: tuple[str, ...]) -> list[str]:
  """The torch keys a leaf is written to: one, or the three copies of a shared head."""
  if part == 'head':
    return [f'head.{i}.{_torch_name(rest)}' for i in range(len(LEVELS))]
  if part == 'heads':
    return [f'head.{HEAD_SLOTS[rest[0]]}.{_torch_name(rest[1:])}']
  return [_PREFIX[part] + _torch_name(rest)]


def to_official(params: Params, prefix: str = '') -> dict[str, np.ndarray]:
  """Params of one network -> official state dict (NumPy). `prefix='module.'` for the DDP student."""
  out = {}
  for path, leaf in flax.traverse_util.flatten_dict(params).items():
    value = _to_torch(path, np.asarray(jax.device_get(leaf), np.float32))
    for key in _key_slots(path[0], path[1:]):
      out[prefix + key] = value
  return out


def from_official(state_dict: Mapping[str, Any], like: Params) -> Params:
  """Official state dict of one network (with or without `module.`) -> params shaped like `like`.

  `like` gives the structure (e.g. `jax.eval_shape(nets.init, key)`). A shared head is read from
  `head.0`. Raises ValueError naming the missing keys or the mismatched shapes.
  """
  state = {k.removeprefix('module.'): np.asarray(v) for k, v in state_dict.items()}
  flat, missing, mismatched = {}, [], []
  for path, ref in flax.traverse_util.flatten_dict(like).items():
    key = _key_slots(path[0], path[1:])[0]
    if key not in state:
      missing.append(key)
      continue
    value = _from_torch(path, state[key])
    if tuple(value.shape) != tuple(ref.shape):
      mismatched.append(f'{key}: checkpoint {tuple(state[key].shape)}, model expects '
                        f'{tuple(_to_torch(path, np.zeros(ref.shape)).shape)}')
      continue
    flat[path] = value.astype(np.float32)
  if missing or mismatched:
    problems = (['missing: ' + ', '.join(missing[:8]) + (' ...' if len(missing) > 8 else '')]
                if missing else []) + (['shape mismatch: ' + '; '.join(mismatched[:8])] if mismatched else [])
    raise ValueError('The state dict does not fit this model (' + ' | '.join(problems) +
                     '); build the model with the checkpoint\'s architecture settings.')
  return flax.traverse_util.unflatten_dict(flat)


def centres_to_official(centres: Mapping[str, Any]) -> np.ndarray:
  """Centres per level -> `udi_loss.centering.center` (3, K), rows cls, cls+, patch (zeros if inactive)."""
  out_dim = next(iter(centres.values())).shape[-1]
  table = np.zeros((len(LEVELS), out_dim), np.float32)
  for level, value in centres.items():
    table[HEAD_SLOTS[level]] = np.asarray(value)
  return table


def centres_from_official(table: np.ndarray, levels: tuple[str, ...]) -> dict[str, np.ndarray]:
  return {level: np.asarray(table[HEAD_SLOTS[level]], np.float32) for level in levels}

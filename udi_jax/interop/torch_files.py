"""Reading and writing PyTorch-side files: .safetensors without torch, .pth with torch.

`load_torch_checkpoint(path, like)` reads official UDI checkpoints (full training checkpoints and
backbone-only files), DINO ViT checkpoints and timm state dicts into this project's params, reports the
keys it did not use, and refuses missing keys and shape mismatches with one sentence.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import zipfile
from typing import Any, Mapping, Optional

import numpy as np

from udi_jax.interop import layouts, official

TORCH_HINT = ('PyTorch is needed for .pth files: pip install torch (CPU builds suffice), or use a '
              '.safetensors file.')


def _torch():
  try:
    import torch
  except ImportError as e:
    raise RuntimeError(TORCH_HINT) from e
  return torch


def save_safetensors(state: Mapping[str, np.ndarray], path: str | pathlib.Path):
  from safetensors.numpy import save_file
  save_file({k: np.ascontiguousarray(v, np.float32) for k, v in state.items()}, str(path))


def save_pth(payload: Any, path: str | pathlib.Path):
  """torch.save of nested dicts of NumPy arrays, converted to tensors."""
  torch = _torch()

  def convert(x):
    if isinstance(x, np.ndarray):
      return torch.from_numpy(np.ascontiguousarray(x))
    if isinstance(x, dict):
      return {k: convert(v) for k, v in x.items()}
    return x
  torch.save(convert(payload), str(path))


def save(payload: Any, path: str | pathlib.Path):
  """.safetensors (a flat state dict, no torch needed) or .pth (any payload, needs torch), by suffix."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  if path.suffix == '.safetensors':
    save_safetensors(payload, path)
  else:
    save_pth(payload, path)


def save_timm_folder(state: Mapping[str, np.ndarray], model_args: dict, directory: str | pathlib.Path,
                     data_config: dict) -> None:
  """A Hugging Face-style model folder as timm's `save_for_hf` writes it (`config.json`,
  `model.safetensors`): timm's ViT is built with `model_args`, loads `state` strictly, and saves itself,
  so that `timm.create_model('local-dir:DIR', pretrained=True)` rebuilds it offline. The architecture name
  is timm's `vit_small_patch16_224`, whose arguments `model_args` replace (any size)."""
  torch = _torch()
  import timm
  from timm.models import save_for_hf
  model = timm.create_model('vit_small_patch16_224', pretrained=False, **model_args)
  model.load_state_dict({k: torch.from_numpy(np.array(v, np.float32)) for k, v in state.items()}, strict=True)
  save_for_hf(model, str(directory), model_args=model_args, safe_serialization=True, data_config=data_config,
              model_config={'pretrained_cfg': {'tag': 'udi_jax', 'license': None}})


def read_file(path: str | pathlib.Path) -> dict[str, Any]:
  """A .safetensors or .pth file -> nested dicts of NumPy arrays; a clear error for anything else."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f'{path} does not exist.')
  if path.suffix == '.safetensors':
    from safetensors.numpy import load_file
    try:
      return load_file(str(path))
    except Exception as e:
      raise ValueError(f'{path} is not a readable .safetensors file ({type(e).__name__}: {e}).') from e
  torch = _torch()
  try:
    torch.serialization.add_safe_globals([argparse.Namespace])   # the official checkpoints store args
    payload = torch.load(str(path), map_location='cpu', weights_only=True)
  except Exception as e:
    if not zipfile.is_zipfile(path):     # torch.save writes a zip archive
      raise ValueError(f'{path} is not a PyTorch checkpoint: it is corrupt, truncated or another kind of file '
                       '(torch.save writes a zip archive); give a .pth or .safetensors file of weights.') from e
    raise ValueError(f'{path} holds Python objects besides tensors (e.g. a whole pickled model), which are not '
                     'loaded, for safety; save its state_dict() with torch.save and give that file.') from e

  def convert(x):
    if hasattr(x, 'detach') and hasattr(x, 'numpy'):
      return x.detach().cpu().float().numpy()
    if isinstance(x, Mapping):
      return {k: convert(v) for k, v in x.items()}
    return x
  return convert(payload)


@dataclasses.dataclass
class Imported:
  """What a PyTorch file gave: params (a subset of backbone / readout / head), centres, what was left."""
  params: dict[str, Any]
  centres: Optional[np.ndarray]       # (3, K) official table, if the file had one
  layout: str                          # 'udi-checkpoint', 'udi', 'timm', 'dino'
  unused_keys: list[str]


def _is_tensor_dict(x) -> bool:
  return isinstance(x, Mapping) and x and all(isinstance(v, np.ndarray) for v in x.values())


def load_torch_checkpoint(path: str | pathlib.Path, like: Mapping[str, Any], which: str = 'teacher') -> Imported:
  """A PyTorch file -> params shaped like `like` (a network's params or their shapes).

  Official training checkpoints give backbone, read-out, head and centres (`which` picks teacher or
  student); official backbone files, DINO and timm state dicts give the backbone only.
  """
  return _imported(read_file(path), path, like, which)


def load_student_and_teacher(path: str | pathlib.Path, like: Mapping[str, Any]) -> dict[str, Imported]:
  """{'student', 'teacher'}: each network from its own entry of an official training checkpoint (as the
  official code resumes), or both from the one network that any other file holds."""
  payload = read_file(path)
  teacher = _imported(payload, path, like, 'teacher')
  if teacher.layout != 'udi-checkpoint':
    return {'student': teacher, 'teacher': teacher}
  return {'student': _imported(payload, path, like, 'student'), 'teacher': teacher}


def _imported(payload: Any, path: str | pathlib.Path, like: Mapping[str, Any], which: str) -> Imported:
  centres = None
  if isinstance(payload, Mapping) and 'teacher' in payload and 'student' in payload:
    state = {k.removeprefix('module.'): v for k, v in payload[which].items()}
    loss_state = payload.get('udi_loss')
    table = loss_state.get('centering.center') if isinstance(loss_state, Mapping) else None
    centres = None if table is None else np.asarray(table)
    layout = 'udi-checkpoint'
  elif isinstance(payload, Mapping) and 'state_dict' in payload and _is_tensor_dict(payload['state_dict']):
    state, layout = payload['state_dict'], None
  elif _is_tensor_dict(payload):
    state, layout = dict(payload), None
  else:
    raise ValueError(f'{path} holds neither a state dict nor an official UDI checkpoint; export one with '
                     'python -m udi_jax.export.')
  state = {k.removeprefix('module.'): v for k, v in state.items()}

  if any(k.startswith('backbone.backbone.') for k in state):
    layout = layout or 'udi'
    parts = {k: v for k, v in like.items() if k in ('backbone', 'readout', 'head', 'heads')}
    has = lambda prefix: any(k.startswith(prefix) for k in state)
    if not has('backbone.attn.'):
      parts.pop('readout', None)
    if not has('head.'):
      parts.pop('head', None)
      parts.pop('heads', None)
    params = official.from_official(state, parts)
    used = set(official.to_official(params))
  elif 'cls_token' in state and 'patch_embed.proj.weight' in state:
    layout = 'timm' if 'reg_token' in state else 'dino'
    expected = like['backbone']['cls_token'].shape[1]
    got = state['cls_token'].shape[1] + (1 if 'reg_token' in state else 0)
    if got != expected:
      raise ValueError(f'{path} has {got} class token(s) and this model {expected}; set '
                       f'config.model.num_cls_tokens={got} to load it.')
    params = {'backbone': layouts.from_backbone_state(state, like['backbone'])}
    used = set(layouts.to_timm(params['backbone'], patch_size=1)) | {'cls_token', 'reg_token'}
  else:
    raise ValueError(f'{path} is not a ViT state dict this project knows (no cls_token/patch_embed or '
                     'backbone.backbone. keys).')
  unused = sorted(k for k in state if k not in used)
  return Imported(params=params, centres=centres, layout=layout, unused_keys=unused)

"""The PyTorch layouts a network is exported to (docs/method.md §7): timm (exact), the official UDI training
checkpoint (`udi`), and DINO (lossy). `payload` builds the object of a format, `how_to_load` says how to
load the written file.

- timm: `VisionTransformer(class_token=True, reg_tokens=1, no_embed_class=False)`: token 0 is `cls_token`,
  token 1 the register token `reg_token`, and the positional table is unchanged (timm concatenates
  [cls, reg, patches] and then adds it, UDI's order). A 1-token model maps to a plain timm ViT.
  `img_size` bakes the table for another input size with the official bicubic (docs/method.md §2.2), because
  timm's own resampling differs.
- dino: facebookresearch/dino `vit_*` keys with ONE class token: token 1 and its positional row are
  dropped, which changes the network (lossy). For legacy evaluation code only.

Block, norm and patch-embed keys are those of DINO/timm, i.e. our Flax names with `blocks_i` -> `blocks.i`.
"""

from __future__ import annotations

import pathlib
from typing import Any, Mapping, Optional

import flax
import jax
import numpy as np

from udi_jax.interop import official
from udi_jax.models.vit import resize_pos_embed

FORMATS = ('timm', 'udi', 'dino')


def _backbone_state(backbone: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Flax backbone params -> torch-named tensors, cls_token and pos_embed included as they are."""
  out = {}
  for path, leaf in flax.traverse_util.flatten_dict(backbone).items():
    out[official._torch_name(path)] = official._to_torch(path, np.asarray(jax.device_get(leaf), np.float32))
  return out


def baked_pos_embed(pos_embed: np.ndarray, num_cls_tokens: int, patch_size: int,
                    img_size: Optional[int]) -> np.ndarray:
  """The positional table for `img_size` (None: unchanged), official bicubic interpolation."""
  if img_size is None:
    return np.asarray(pos_embed)
  if img_size % patch_size:
    raise ValueError(f'--img_size={img_size} is not a multiple of the patch size {patch_size}.')
  grid = img_size // patch_size
  return np.asarray(resize_pos_embed(np.asarray(pos_embed), num_cls_tokens, (grid, grid)))


def to_timm(backbone: Mapping[str, Any], patch_size: int, img_size: Optional[int] = None) -> dict[str, np.ndarray]:
  state = _backbone_state(backbone)
  tokens = state['cls_token'].shape[1]
  state['pos_embed'] = baked_pos_embed(state['pos_embed'], tokens, patch_size, img_size)
  cls = state.pop('cls_token')
  state['cls_token'] = cls[:, :1]
  if tokens == 2:
    state['reg_token'] = cls[:, 1:2]
  elif tokens != 1:
    raise ValueError(f'timm holds 1 class token and registers; a model with {tokens} class tokens does not map.')
  return state


def to_dino(backbone: Mapping[str, Any], patch_size: int, img_size: Optional[int] = None) -> dict[str, np.ndarray]:
  """LOSSY for 2-token models: token 1 and its positional row are dropped."""
  state = _backbone_state(backbone)
  tokens = state['cls_token'].shape[1]
  pos = baked_pos_embed(state['pos_embed'], tokens, patch_size, img_size)
  state['cls_token'] = state['cls_token'][:, :1]
  state['pos_embed'] = np.concatenate([pos[:, :1], pos[:, tokens:]], axis=1)
  return state


def from_backbone_state(state: Mapping[str, np.ndarray], like: Mapping[str, Any]) -> dict[str, Any]:
  """A timm/DINO/official-backbone state dict -> backbone params shaped like `like`.

  timm's `reg_token` rejoins `cls_token` as token 1. Raises ValueError on missing keys or shapes.
  """
  state = dict(state)
  if 'reg_token' in state:
    state['cls_token'] = np.concatenate([state['cls_token'], state.pop('reg_token')], axis=1)
  prefixed = {'backbone.backbone.' + k: v for k, v in state.items()}
  return official.from_official(prefixed, {'backbone': like})['backbone']


def timm_model_args(nets, img_size: Optional[int] = None) -> dict:
  """The keyword arguments of timm's VisionTransformer that match the backbone (token 1 as a register)."""
  b = nets.backbone
  return dict(img_size=img_size or b.img_size, patch_size=b.patch_size, embed_dim=b.embed_dim, depth=b.depth,
              num_heads=b.num_heads, class_token=True, reg_tokens=1 if b.num_cls_tokens == 2 else 0,
              no_embed_class=False, num_classes=0, global_pool='token')


def timm_constructor(num_cls_tokens: int, embed_dim: int, depth: int, num_heads: int, patch_size: int,
                     img_size: int) -> str:
  """The line that builds the matching timm model."""
  registers = ', reg_tokens=1' if num_cls_tokens == 2 else ''
  return (f'timm.models.vision_transformer.VisionTransformer(img_size={img_size}, patch_size={patch_size}, '
          f'embed_dim={embed_dim}, depth={depth}, num_heads={num_heads}, class_token=True{registers}, '
          f'no_embed_class=False, num_classes=0, global_pool="token")')


def payload(format: str, nets, student, teacher, centres, img_size: Optional[int] = None,
            which: str = 'teacher', epoch: int = 0):
  """The exported object: a flat state dict (timm, dino) or the nested official checkpoint (udi)."""
  if format not in FORMATS:
    raise ValueError(f'Unknown format {format!r}; choose one of {FORMATS}.')
  if which not in ('teacher', 'student'):
    raise ValueError(f"--which={which!r}: choose 'teacher' or 'student'.")
  if format == 'udi':
    return {'teacher': official.to_official(teacher), 'student': official.to_official(student, prefix='module.'),
            'udi_loss': {'centering.center': official.centres_to_official(centres),
                         'centering.count': np.zeros((3, 1), np.float32)},
            'epoch': epoch}
  params = teacher if which == 'teacher' else student
  convert = to_timm if format == 'timm' else to_dino
  return convert(params['backbone'], nets.backbone.patch_size, img_size)


def how_to_load(format: str, nets, out: pathlib.Path, img_size: Optional[int], which: str, step: int) -> str:
  """What was written to `out` and the lines that load it in PyTorch."""
  backbone = nets.backbone
  size = img_size or backbone.img_size
  if format == 'udi':
    return (f'Wrote the official UDI checkpoint layout (step {step}) to {out}; load it with '
            f"torch.load('{out}', map_location='cpu') or the official utils.load_pretrained_weights.")
  if format == 'timm':
    build = timm_constructor(backbone.num_cls_tokens, backbone.embed_dim, backbone.depth,
                                     backbone.num_heads, backbone.patch_size, size)
    loader = (f"safetensors.torch.load_file('{out}')" if out.suffix == '.safetensors' else f"torch.load('{out}')")
    return (f'Wrote the {which} backbone (step {step}) in timm layout to {out}. Load it with:\n'
            f'  import timm, safetensors.torch, torch\n  model = {build}\n'
            f'  model.load_state_dict({loader}, strict=True)')
  lossy = ' LOSSY: token 1 and its positional row were dropped.' if backbone.num_cls_tokens == 2 else ''
  return (f'Wrote the {which} backbone (step {step}) in the DINO 1-token layout to {out}, for a '
          f'vision_transformer.vit_* with patch_size={backbone.patch_size}, img_size=[{size}].{lossy}')

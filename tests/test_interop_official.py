"""Official UDI state dicts <-> params (docs/method.md §7.1, §7.4)."""

import jax
import numpy as np
import pytest

from configs import vits16
from tests import golden
from tests.helpers import init_params, tiny_config
from udi_jax.interop import official
from udi_jax.models.networks import build_networks


def test_vit_small_layout_has_the_official_keys_and_shapes():
  nets = build_networks(vits16.get_config())
  shapes = jax.eval_shape(nets.init, jax.random.key(0))
  zeros = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes)
  state = official.to_official(zeros)
  assert len(state) == 182                       # docs/method.md §7.1: the teacher's 182 keys
  expect = {
      'backbone.backbone.cls_token': (1, 2, 384), 'backbone.backbone.pos_embed': (1, 198, 384),
      'backbone.backbone.patch_embed.proj.weight': (384, 3, 16, 16),
      'backbone.backbone.blocks.11.attn.qkv.weight': (1152, 384),
      'backbone.backbone.blocks.0.mlp.fc2.weight': (384, 1536), 'backbone.backbone.norm.weight': (384,),
      'backbone.norm1.weight': (384,), 'backbone.attn.qkv.weight': (1152, 384),
      'backbone.attn.norm.bias': (384,), 'head.2.mlp.0.weight': (2048, 384),
      'head.1.mlp.4.weight': (256, 2048), 'head.0.last_layer.weight_g': (65536, 1),
      'head.2.last_layer.weight_v': (65536, 256)}
  for key, shape in expect.items():
    assert state[key].shape == shape, key
  assert sum(k.startswith('head.') for k in state) == 24 and sum(
      k.startswith('backbone.backbone.blocks.') for k in state) == 144
  student = official.to_official(zeros, prefix='module.')
  assert set(student) == {'module.' + k for k in state}


def test_golden_state_dict_keys_are_exactly_ours():
  g = golden.load('udi_golden_small')
  config = golden.small_config()
  nets = build_networks(config)
  theirs = {k[len('student/'):]: v.shape for k, v in g.items() if k.startswith('student/')}
  params = official.from_official({k: g['student/' + k] for k in theirs},
                                  jax.eval_shape(nets.init, jax.random.key(0)))
  ours = {k: v.shape for k, v in official.to_official(params).items() if not k.startswith(('head.1', 'head.2'))}
  assert ours == theirs


@pytest.mark.parametrize('shared_head', [True, False])
def test_round_trip_is_bitwise_identity(shared_head):
  config = tiny_config()
  config.model.shared_head = shared_head
  nets = build_networks(config)
  params = init_params(nets)
  back = official.from_official(official.to_official(params, prefix='module.'), params)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), params, back)
  assert jax.tree.structure(back) == jax.tree.structure(params)


def test_transforms_match_torch_layouts():
  """Linear (out,in), Conv OIHW, LN weight, weight_g (K,1): checked on one value each."""
  nets = build_networks(tiny_config())
  params = init_params(nets)
  state = official.to_official(params)
  kernel = np.asarray(params['backbone']['blocks_0']['mlp']['fc1']['kernel'])     # (in, out)
  np.testing.assert_array_equal(state['backbone.backbone.blocks.0.mlp.fc1.weight'], kernel.T)
  conv = np.asarray(params['backbone']['patch_embed']['proj']['kernel'])          # (kh, kw, in, out)
  assert state['backbone.backbone.patch_embed.proj.weight'][5, 2, 1, 3] == conv[1, 3, 2, 5]
  g = np.asarray(params['head']['last_layer']['weight_g'])
  assert state['head.0.last_layer.weight_g'].shape == (g.size, 1)
  np.testing.assert_array_equal(state['backbone.backbone.norm.weight'],
                                params['backbone']['norm']['scale'])


def test_bad_state_dicts_are_refused_with_the_key():
  nets = build_networks(tiny_config())
  params = init_params(nets)
  state = official.to_official(params)
  del state['backbone.attn.proj.bias']
  with pytest.raises(ValueError, match=r'missing: backbone\.attn\.proj\.bias'):
    official.from_official(state, params)
  state = official.to_official(params)
  state['backbone.backbone.pos_embed'] = np.zeros((1, 38, 32), np.float32)
  with pytest.raises(ValueError, match=r'shape mismatch: backbone\.backbone\.pos_embed'):
    official.from_official(state, params)


def test_centres_round_trip_through_the_official_table():
  centres = {'cls': np.arange(4.0), 'cls_plus': np.arange(4.0) + 10, 'patch': np.arange(4.0) + 20}
  table = official.centres_to_official(centres)
  np.testing.assert_array_equal(table[1], centres['cls_plus'])
  back = official.centres_from_official(table, ('cls', 'cls_plus', 'patch'))
  for level in centres:
    np.testing.assert_array_equal(back[level], centres[level])

"""The networks: sizes, outputs, positional interpolation, drop path, compute dtype."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import vits16
from tests.helpers import draw, init_params, random_batch, tiny_config, worst_rel
from udi_jax.method.objective import ObjectiveSettings, init_centres, udi_objective
from udi_jax.models.networks import build_networks
from udi_jax.models.readout import SRSReadout
from udi_jax.models.vit import VisionTransformer, resize_pos_embed, torch_bicubic_matrix, vit


def count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_vit_small_parameter_counts_match_spec():
  """docs/method.md §2.6, from shapes only (jax.eval_shape allocates nothing)."""
  config = vits16.get_config()
  shapes = jax.eval_shape(build_networks(config).init, jax.random.key(0))
  assert count(shapes['backbone']) == 21_666_432
  assert count(shapes['readout']) == 592_896
  head = shapes['head']
  assert count({k: v for k, v in head.items() if k != 'last_layer'}) == 5_509_376
  assert count(head['last_layer']) == 16_842_752
  assert shapes['backbone']['cls_token'].shape == (1, 2, 384)
  assert shapes['backbone']['pos_embed'].shape == (1, 198, 384)
  assert shapes['backbone']['blocks_11']['attn']['qkv']['kernel'].shape == (384, 1152)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(shapes))   # bf16 compute, fp32 params


@pytest.mark.parametrize('arch,width', [('vit_tiny', 192), ('vit_base', 768)])
def test_other_sizes_build_and_trace_the_objective(arch, width):
  """Ti/16 and B/16 at full width and depth: the backbone's parameter count (12 blocks of 12 D² + 13 D, the
  patch embedding, 2 class tokens, 198 positional rows, the final norm; ViT-S's formula gives the 21.7 M
  above) and the whole objective traced from abstract shapes (2 x 224 + 10 x 96 crops; nothing is
  compiled or allocated: the numbers are checked at the tiny and ViT-S sizes elsewhere)."""
  config = vits16.get_config()
  config.model.arch = arch
  nets = build_networks(config)
  shapes = jax.eval_shape(nets.init, jax.random.key(0))
  assert count(shapes['backbone']) == 12 * (12 * width ** 2 + 13 * width) + (768 * width + width) + \
      2 * width + 198 * width + 2 * width
  assert shapes['readout']['attn']['qkv']['kernel'].shape == (width, 3 * width)
  gs, ls, n_local = config.data.global_size, config.data.local_size, config.data.num_local
  crops_global = jax.ShapeDtypeStruct((2, 2, gs, gs, 3), jnp.float32)
  crops_local = jax.ShapeDtypeStruct((2, n_local, ls, ls, 3), jnp.float32)
  samples = jax.eval_shape(lambda: draw(config, random_batch(config, batch=2)[2], seed=1))
  loss, out = jax.eval_shape(lambda p, g, loc, s: udi_objective(
      nets, ObjectiveSettings.from_config(config), p, p, init_centres(nets), g, loc, s, 0.04),
      shapes, crops_global, crops_local, samples)
  assert loss.shape == () and loss.dtype == jnp.float32
  assert set(out.levels) == {'cls', 'cls_plus', 'patch'}
  assert out.centres['patch'].shape == (config.model.out_dim,)


def test_bicubic_matrix_equals_torch_interpolate():
  """docs/method.md §2.2 against torch itself: bicubic, scale_factor=(F'+0.1)/14, align_corners=False."""
  torch = pytest.importorskip('torch', reason='torch is in requirements-dev.txt')
  grid = np.random.default_rng(0).normal(size=(14, 14, 5)).astype(np.float32)
  for out_tokens in (6, 8, 10, 12, 28):
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(grid).permute(2, 0, 1)[None], mode='bicubic',
        scale_factor=((out_tokens + 0.1) / 14, (out_tokens + 0.1) / 14))[0].permute(1, 2, 0).numpy()
    m = torch_bicubic_matrix(14, out_tokens)
    ours = np.einsum('ha,abd,wb->hwd', m, grid, m)
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0, err_msg=f'{out_tokens}')
    # jax.image.resize maps with the size ratio and is NOT this interpolation.
    other = np.asarray(jax.image.resize(grid, (out_tokens, out_tokens, 5), 'cubic', antialias=False))
    assert np.abs(other - ref).max() > 1e-3


def test_rectangular_inputs_resize_each_axis():
  pos = jnp.asarray(np.random.default_rng(0).normal(size=(1, 2 + 196, 4)).astype(np.float32))
  out = resize_pos_embed(pos, 2, (6, 10))
  assert out.shape == (1, 2 + 60, 4)
  np.testing.assert_array_equal(out[:, :2], pos[:, :2])
  assert resize_pos_embed(pos, 2, (14, 14)) is pos


def test_outputs_last_blocks_and_attention():
  model = VisionTransformer(embed_dim=16, depth=3, num_heads=2, patch_size=8, img_size=32)
  images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
  params = model.init(jax.random.key(0), images)
  out = model.apply(params, images, return_last_blocks=2, return_attention=True)
  assert out.cls.shape == (2, 2, 16) and out.patch.shape == (2, 16, 16)
  assert out.cls_blocks.shape == (2, 2, 2, 16)
  np.testing.assert_allclose(out.cls_blocks[:, -1], out.cls, atol=1e-6)
  assert out.attention.shape == (2, 2, 18, 18)
  np.testing.assert_allclose(out.attention.sum(-1), 1.0, atol=1e-5)
  # The final norm applies to class tokens only; patch tokens are returned before it.
  tokens = model.apply(params, images).patch
  assert not np.allclose(np.asarray(tokens).std(-1), 1.0, atol=1e-2)
  plain = model.apply(params, images)
  assert plain.cls_blocks is None and plain.attention is None



def test_attention_kernels_agree_with_the_einsum_form():
  """jax.nn.dot_product_attention (XLA) in the backbone and in the SRS read-out (an all-zero row
  included) gives the straightforward einsum form's values and gradients in float32 and bfloat16; 'auto'
  is the XLA kernel on this CPU (the same program); 'cudnn' is refused here with the reason."""
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(2, 32, 32, 3)), jnp.float32)
  idx = jnp.asarray(rng.integers(0, 16, size=(2, 3, 4)), jnp.int32)
  weights = jnp.asarray(rng.dirichlet(np.ones(4), size=(2, 3)), jnp.float32).at[1, 2].set(0.0)
  probe_cls, probe_readout = (jnp.asarray(rng.normal(size=shape), jnp.float32)
                              for shape in ((2, 2, 16), (2, 3, 16)))

  def value_and_grads(kernel, dtype, run=True):
    model = VisionTransformer(embed_dim=16, depth=2, num_heads=2, patch_size=8, img_size=32,
                              dtype=dtype, attention=kernel)
    readout = SRSReadout(num_heads=2, dtype=dtype, kernel=kernel)
    params = {'vit': model.init(jax.random.key(0), images),
              'readout': readout.init(jax.random.key(1), jnp.zeros((2, 16, 16)), idx, weights)}

    def scalar(p):
      out = model.apply(p['vit'], images)
      z = readout.apply(p['readout'], out.patch, idx, weights)
      return (out.cls.astype(jnp.float32) * probe_cls).sum() + (z.astype(jnp.float32) * probe_readout).sum()
    fn = jax.value_and_grad(scalar)
    return jax.jit(fn)(params) if run else str(jax.make_jaxpr(fn)(params))

  for dtype, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)):
    (reference, ref_grads), (value, grads) = (value_and_grads(k, dtype) for k in ('einsum', 'xla'))
    assert abs(float(value) - float(reference)) <= tol * abs(float(reference)), dtype
    assert worst_rel(grads, ref_grads) < tol * 5, dtype
  assert value_and_grads('auto', jnp.bfloat16, run=False) == value_and_grads('xla', jnp.bfloat16, run=False)
  assert value_and_grads('auto', jnp.bfloat16, run=False) != value_and_grads('einsum', jnp.bfloat16, run=False)
  with pytest.raises(ValueError, match="attention='cudnn' cannot be used: the backend is cpu"):
    value_and_grads('cudnn', jnp.bfloat16, run=False)


def test_layer_norm_equals_flax_two_pass_form():
  """The written-out LayerNorm (faster on XLA's CPU backend) against flax's two-pass LayerNorm: values
  and gradients in float32, and the bfloat16 output."""
  import flax.linen as nn

  from udi_jax.models.vit import LN_EPS, layer_norm
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(3.0, 2.0, size=(4, 7, 48)), jnp.float32)
  probe = jnp.asarray(rng.normal(size=(4, 7, 48)), jnp.float32)
  params = {'scale': jnp.asarray(rng.normal(1.0, 0.1, size=48), jnp.float32),
            'bias': jnp.asarray(rng.normal(size=48), jnp.float32)}
  for dtype, tol in ((jnp.float32, 2e-6), (jnp.bfloat16, 1e-2)):
    ours = layer_norm('norm', dtype)
    flax_form = nn.LayerNorm(epsilon=LN_EPS, use_fast_variance=False, dtype=dtype)
    assert jax.tree.map(jnp.shape, ours.init(jax.random.key(0), x)) == \
        jax.tree.map(jnp.shape, flax_form.init(jax.random.key(0), x))
    value = lambda module: lambda p, v: (module.apply({'params': p}, v).astype(jnp.float32) * probe).sum()
    (a, ga), (b, gb) = (jax.value_and_grad(value(m), argnums=(0, 1))(params, x) for m in (ours, flax_form))
    assert ours.apply({'params': params}, x).dtype == dtype
    assert abs(float(a) - float(b)) <= tol * abs(float(b))
    assert worst_rel(ga, gb) < tol * 10, dtype

def test_non_multiple_image_size_is_refused():
  model = VisionTransformer(embed_dim=16, depth=1, num_heads=2, patch_size=8, img_size=32)
  params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  with pytest.raises(ValueError, match='multiple of the patch size'):
    model.apply(params, jnp.zeros((1, 30, 30, 3)))


def test_drop_path_masks_follow_the_row_keys():
  """A row's stochastic depth depends on its own key only, not on its place in the batch (contract 2)."""
  model = VisionTransformer(embed_dim=16, depth=4, num_heads=2, patch_size=8, img_size=32,
                            drop_path_rate=0.5)
  images = jnp.asarray(np.random.default_rng(0).normal(size=(6, 32, 32, 3)), jnp.float32)
  params = model.init(jax.random.key(0), images)
  keys = jax.random.split(jax.random.key(7), 6)
  apply = jax.jit(lambda x, k: model.apply(params, x, drop_path_keys=k).cls)
  out = apply(images, keys)
  order = np.array([3, 0, 5, 1, 4, 2])
  np.testing.assert_allclose(apply(images[order], keys[order]), out[order], atol=1e-6)
  np.testing.assert_allclose(apply(images[:2], keys[:2]), out[:2], atol=1e-6)
  # Without keys (teacher, evaluation) there is no drop path; with keys the output changes.
  deterministic = model.apply(params, images).cls
  assert not np.allclose(out, deterministic, atol=1e-4)
  np.testing.assert_allclose(model.apply(params, images, drop_path_keys=None).cls, deterministic)


def test_drop_path_keeps_rows_with_the_stated_probability():
  from udi_jax.models.vit import drop_path
  x = jnp.ones((20000, 1, 1))
  keys = jax.random.split(jax.random.key(0), 20000)
  y = np.asarray(drop_path(x, 0.3, keys, salt=0)).ravel()
  kept = y > 0
  assert abs(kept.mean() - 0.7) < 4 * np.sqrt(0.7 * 0.3 / 20000)
  np.testing.assert_allclose(y[kept], 1 / 0.7, rtol=1e-6)


def test_bfloat16_compute_keeps_float32_params_and_is_close():
  config = tiny_config()
  nets32 = build_networks(config)
  config.model.dtype = 'bfloat16'
  nets16 = build_networks(config)
  params = init_params(nets32)
  crops_global, crops_local, boxes = random_batch(config, batch=2)
  samples = draw(config, boxes, seed=1)
  settings = ObjectiveSettings.from_config(config)
  run = lambda nets: jax.jit(lambda p: udi_objective(
      nets, settings, p, p, init_centres(nets), crops_global, crops_local, samples, 0.04))(params)
  (_, out32), (_, out16) = run(nets32), run(nets16)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(out16))
  assert abs(float(out16.loss) - float(out32.loss)) / float(out32.loss) < 2e-2


def test_unknown_architecture_and_bad_model_fields_are_refused():
  with pytest.raises(ValueError, match='Unknown ViT architecture'):
    vit('vit_huge')
  config = vits16.get_config()
  config.udi.include_patch = False
  with pytest.raises(ValueError, match='num_cls_tokens=1'):
    build_networks(config)
  config = vits16.get_config()
  config.model.srs_num_heads = 5
  with pytest.raises(ValueError, match='srs_num_heads=5'):
    build_networks(config)


def test_dino_without_patch_branch_has_one_level_and_no_readout():
  config = tiny_config(num_cls_tokens=1)
  config.udi.include_patch = False
  nets = build_networks(config)
  params = init_params(nets)
  assert nets.levels == ('cls',) and 'readout' not in params
  crops_global, crops_local, _ = random_batch(config, batch=2)
  loss, out = jax.jit(lambda p: udi_objective(nets, ObjectiveSettings.from_config(config), p, p,
                                              init_centres(nets), crops_global, crops_local, None,
                                              0.04))(params)
  assert set(out.components) == {'g_cls', 'l_cls'} and set(out.centres) == {'cls'}


def test_separate_heads_are_keyed_by_level():
  config = tiny_config()
  config.model.shared_head = False
  nets = build_networks(config)
  params = init_params(nets)
  assert 'head' not in params and set(params['heads']) == {'cls', 'cls_plus', 'patch'}
  a, b = params['heads']['cls'], params['heads']['patch']
  assert not np.allclose(a['mlp_0']['kernel'], b['mlp_0']['kernel'])


def test_rematerialised_blocks_give_the_same_loss_and_gradients():
  config = tiny_config(num_local=0)        # remat wraps the blocks; one crop resolution is enough
  config.model.drop_path_rate = 0.2
  crops_global, crops_local, boxes = random_batch(config, batch=2)
  samples = draw(config, boxes, seed=1)
  keys = jax.random.split(jax.random.key(2), 2)
  results = []
  for remat in (False, True):
    config.model.remat = remat
    nets = build_networks(config)
    params = init_params(nets)
    loss = lambda p: udi_objective(nets, ObjectiveSettings.from_config(config), p, p, init_centres(nets),
                                   crops_global, crops_local, samples, 0.04, drop_path_keys=keys)[0]
    results.append(jax.jit(jax.value_and_grad(loss))(params))
  (loss0, grads0), (loss1, grads1) = results
  np.testing.assert_allclose(loss1, loss0, rtol=1e-6)
  # Per tensor, on its own scale: recomputing the forward pass changes the float32 rounding (a 4e-7
  # difference in an entry of 0.01 beside entries of 5); a wrong key or a missing block would be O(1).
  worst = worst_rel(grads1, grads0)
  print(f'remat vs no remat: worst gradient relative error {worst:.1e}')
  assert worst <= 1e-5

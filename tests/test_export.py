"""PyTorch interop: timm export equals the JAX model, the official layout, round trips, imports, errors."""

import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import vits16
from tests import golden
from tests.helpers import REPO, env, init_config, rel, restore, state_handed_to_the_step
from udi_jax import export
from udi_jax.data.photometric import preprocess
from udi_jax.interop import layouts, official, torch_files
from udi_jax.models.networks import build_networks
from udi_jax.models.vit import layer_norm

torch = pytest.importorskip('torch', reason='torch and timm are in requirements-dev.txt')
timm = pytest.importorskip('timm')


@pytest.fixture(scope='module')
def golden_model():
  """ViT-S widths at depth 2 with the golden file's (non-trivial) student weights."""
  g = golden.load('udi_golden_small')
  config = golden.small_config()
  nets = build_networks(config)
  state = {k[len('student/'):]: v for k, v in g.items() if k.startswith('student/')}
  return nets, official.from_official(state, jax.eval_shape(nets.init, jax.random.key(0)))


def jax_tokens(nets, backbone, images):
  """All tokens after the final norm: (B, T + N, D)."""
  out = nets.backbone.apply({'params': backbone}, preprocess(jnp.asarray(images)))
  norm = layer_norm('norm', jnp.float32).apply({'params': backbone['norm']}, out.patch)
  return np.concatenate([np.asarray(out.cls), np.asarray(norm)], axis=1)


def timm_model(nets, img_size, tokens=2):
  b = nets.backbone
  return timm.models.vision_transformer.VisionTransformer(
      img_size=img_size, patch_size=b.patch_size, embed_dim=b.embed_dim, depth=b.depth, num_heads=b.num_heads,
      class_token=True, reg_tokens=tokens - 1, no_embed_class=False, num_classes=0, global_pool='token').eval()


@pytest.mark.parametrize('size', [224, 96])
def test_timm_export_equals_the_jax_model(golden_model, tmp_path, size):
  """strict=True load; class and patch tokens agree to 1e-5 (96 px with the table baked by img_size)."""
  nets, params = golden_model
  state = layouts.to_timm(params['backbone'], nets.backbone.patch_size, img_size=None if size == 224 else size)
  path = tmp_path / 'vit.safetensors'
  torch_files.save_safetensors(state, path)
  from safetensors.torch import load_file
  model = timm_model(nets, size)
  model.load_state_dict(load_file(str(path)), strict=True)
  images = np.random.default_rng(0).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
  with torch.no_grad():
    theirs = model.forward_features(torch.from_numpy(np.asarray(preprocess(images))).permute(0, 3, 1, 2)).numpy()
    pooled = model(torch.from_numpy(np.asarray(preprocess(images))).permute(0, 3, 1, 2)).numpy()
  ours = jax_tokens(nets, params['backbone'], images)
  errors = {'class tokens': rel(theirs[:, :2], ours[:, :2]), 'patch tokens': rel(theirs[:, 2:], ours[:, 2:])}
  print(f'timm vs JAX at {size} px: {errors}')
  assert max(errors.values()) <= 1e-5
  np.testing.assert_allclose(pooled, ours[:, 0], rtol=0, atol=1e-4)     # global_pool='token' = z_cls


def test_official_layout_has_the_spec_keys_for_vit_small():
  config = vits16.get_config()
  nets = build_networks(config)
  shapes = jax.eval_shape(nets.init, jax.random.key(0))
  zeros = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes)
  centres = {level: np.zeros(65536, np.float32) for level in nets.levels}
  obj = layouts.payload('udi', nets, zeros, zeros, centres)
  assert len(obj['teacher']) == 182 and len(obj['student']) == 182
  assert all(k.startswith('module.') for k in obj['student'])
  assert {k for k in obj['teacher'] if k.startswith('head.')} == {
      f'head.{i}.{name}' for i in range(3) for name in (
          'mlp.0.weight', 'mlp.0.bias', 'mlp.2.weight', 'mlp.2.bias', 'mlp.4.weight', 'mlp.4.bias',
          'last_layer.weight_g', 'last_layer.weight_v')}
  assert obj['teacher']['head.1.last_layer.weight_v'].shape == (65536, 256)
  assert obj['udi_loss']['centering.center'].shape == (3, 65536)
  dino = layouts.payload('dino', nets, zeros, zeros, centres)
  assert dino['cls_token'].shape == (1, 1, 384) and dino['pos_embed'].shape == (1, 197, 384)


def test_tiny_run_exports_and_reimports_bitwise(tiny_run, tmp_path):
  config, workdir = tiny_run
  state, _ = restore(workdir, config)
  like = jax.eval_shape(build_networks(config).init, jax.random.key(0))
  message = export.export(workdir, 'udi', tmp_path / 'udi.pth')
  assert 'official UDI checkpoint layout (step 12)' in message
  back = torch_files.load_torch_checkpoint(tmp_path / 'udi.pth', like)
  assert back.layout == 'udi-checkpoint' and back.unused_keys == []
  jax.tree.map(np.testing.assert_array_equal, back.params, jax.tree.map(np.asarray, state.teacher))
  np.testing.assert_array_equal(back.centres, official.centres_to_official(state.centres))
  student = torch_files.load_torch_checkpoint(tmp_path / 'udi.pth', like, which='student')
  jax.tree.map(np.testing.assert_array_equal, student.params, jax.tree.map(np.asarray, state.student))
  for suffix in ('safetensors', 'pth'):
    message = export.export(workdir, 'timm', tmp_path / f'timm.{suffix}')
    assert 'model.load_state_dict(' in message and 'reg_tokens=1' in message
    back = torch_files.load_torch_checkpoint(tmp_path / f'timm.{suffix}', like)
    assert back.layout == 'timm' and set(back.params) == {'backbone'}
    jax.tree.map(np.testing.assert_array_equal, back.params['backbone'],
                 jax.tree.map(np.asarray, state.teacher['backbone']))
  # The demo's end-of-training export loads into timm strictly.
  from safetensors.torch import load_file
  nets = build_networks(config)
  timm_model(nets, config.data.global_size).load_state_dict(
      load_file(str(workdir / 'export' / 'teacher_timm.safetensors')), strict=True)


def test_dino_layout_is_lossy_and_loads_into_a_one_token_model(tiny_run, tmp_path):
  config, workdir = tiny_run
  message = export.export(workdir, 'dino', tmp_path / 'dino.pth')
  assert 'LOSSY' in message
  one_token = config.copy_and_resolve_references()
  one_token.model.num_cls_tokens = 1
  like = jax.eval_shape(build_networks(one_token).init, jax.random.key(0))
  back = torch_files.load_torch_checkpoint(tmp_path / 'dino.pth', like)
  assert back.layout == 'dino' and back.params['backbone']['cls_token'].shape[1] == 1
  two_token = jax.eval_shape(build_networks(config).init, jax.random.key(0))
  with pytest.raises(ValueError, match='1 class token.*num_cls_tokens=1'):
    torch_files.load_torch_checkpoint(tmp_path / 'dino.pth', two_token)


def test_bad_files_give_one_clear_sentence(tiny_run, tmp_path):
  config, _ = tiny_run
  like = jax.eval_shape(build_networks(config).init, jax.random.key(0))
  (tmp_path / 'corrupt.pth').write_bytes(np.random.default_rng(0).integers(0, 255, 3000, dtype=np.uint8).tobytes())
  with pytest.raises(ValueError, match='is not a PyTorch checkpoint: it is corrupt, truncated or another kind'):
    torch_files.load_torch_checkpoint(tmp_path / 'corrupt.pth', like)
  torch.save(torch.nn.Linear(2, 2), tmp_path / 'pickled_model.pth')
  with pytest.raises(ValueError, match=r'holds Python objects besides tensors .* save its state_dict\(\)'):
    torch_files.load_torch_checkpoint(tmp_path / 'pickled_model.pth', like)
  (tmp_path / 'corrupt.safetensors').write_bytes(b'not safetensors at all')
  with pytest.raises(ValueError, match='not a readable .safetensors file'):
    torch_files.load_torch_checkpoint(tmp_path / 'corrupt.safetensors', like)
  torch.save({'conv1.weight': torch.zeros(8, 3, 3, 3)}, tmp_path / 'resnet.pth')
  with pytest.raises(ValueError, match='not a ViT state dict this project knows'):
    torch_files.load_torch_checkpoint(tmp_path / 'resnet.pth', like)
  with pytest.raises(FileNotFoundError, match='does not exist'):
    torch_files.load_torch_checkpoint(tmp_path / 'missing.pth', like)
  wrong = layouts.to_timm(jax.tree.map(np.asarray, jax.tree.map(
      lambda s: np.zeros(s.shape, np.float32), like['backbone'])), 4)
  wrong['pos_embed'] = wrong['pos_embed'][:, :5]
  torch_files.save_safetensors(wrong, tmp_path / 'wrong.safetensors')
  with pytest.raises(ValueError, match='shape mismatch: backbone.backbone.pos_embed'):
    torch_files.load_torch_checkpoint(tmp_path / 'wrong.safetensors', like)


def test_model_folder_loads_offline_in_timm_and_equals_the_teacher(tiny_run, tmp_path):
  """`--format=hf`: config.json and model.safetensors as timm's save_for_hf writes them; timm rebuilds
  the model from the folder alone (local-dir, no network) and its tokens equal the JAX teacher's."""
  config, workdir = tiny_run
  state, _ = restore(workdir, config)
  nets = build_networks(config)
  message = export.export(workdir, 'hf', tmp_path / 'udi_tiny')
  assert sorted(p.name for p in (tmp_path / 'udi_tiny').iterdir()) == ['config.json', 'model.safetensors']
  assert f"timm.create_model('local-dir:{tmp_path / 'udi_tiny'}', pretrained=True)" in message
  model = timm.create_model(f'local-dir:{tmp_path / "udi_tiny"}', pretrained=True).eval()
  assert tuple(model.pretrained_cfg['mean']) == (0.485, 0.456, 0.406) and model.pretrained_cfg['tag'] == 'udi_jax'
  size = config.data.global_size
  images = np.random.default_rng(1).integers(0, 256, (3, size, size, 3), dtype=np.uint8)
  with torch.no_grad():
    theirs = model.forward_features(torch.from_numpy(np.asarray(preprocess(images))).permute(0, 3, 1, 2)).numpy()
  ours = jax_tokens(nets, jax.tree.map(np.asarray, state.teacher['backbone']), images)
  assert rel(theirs, ours) <= 1e-5, rel(theirs, ours)
  with pytest.raises(ValueError, match='must be a directory for the hf format'):
    export.export(workdir, 'hf', tmp_path / 'model.safetensors')


def test_init_from_a_pytorch_file(tiny_run, tmp_path, monkeypatch, capsys):
  """An official UDI training checkpoint written by the export: the student from its student entry, the
  teacher from its teacher entry (as the official code resumes), the centres too; step 0. A file with one
  network (timm) fills both."""
  config, workdir = tiny_run
  source, _ = restore(workdir, config)
  assert not np.array_equal(source.student['backbone']['cls_token'], source.teacher['backbone']['cls_token'])
  export.export(workdir, 'udi', tmp_path / 'udi.pth')
  state = state_handed_to_the_step(init_config(f'torch:{tmp_path / "udi.pth"}'), tmp_path / 'run', monkeypatch)
  assert int(state.step) == 0
  jax.tree.map(np.testing.assert_array_equal, state.teacher, source.teacher)
  jax.tree.map(np.testing.assert_array_equal, state.student, source.student)
  jax.tree.map(np.testing.assert_array_equal, state.centres, source.centres)
  assert 'of the student from its "student" entry, the teacher from its "teacher" entry' in capsys.readouterr().out
  export.export(workdir, 'timm', tmp_path / 'timm.safetensors')
  state = state_handed_to_the_step(init_config(f'torch:{tmp_path / "timm.safetensors"}'), tmp_path / 'run2',
                                   monkeypatch)
  for role in ('student', 'teacher'):
    jax.tree.map(np.testing.assert_array_equal, getattr(state, role)['backbone'], source.teacher['backbone'])
  assert 'of the student and the teacher from its one network' in capsys.readouterr().out


def test_export_command_line(tiny_run, tmp_path):
  _, workdir = tiny_run
  out = tmp_path / 'vit96.safetensors'
  result = subprocess.run([sys.executable, '-m', 'udi_jax.export', f'--workdir={workdir}', '--format=timm',
                           f'--out={out}', '--img_size=32'], cwd=REPO, env=env(1), capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'img_size=32' in result.stdout and out.is_file()
  assert not re.search(r'^[IWE]\d{4} ', result.stderr, re.M), result.stderr    # no orbax log lines
  bad = subprocess.run([sys.executable, '-m', 'udi_jax.export', f'--workdir={tmp_path / "nothing"}',
                        f'--out={out}'], cwd=REPO, env=env(1), capture_output=True, text=True, timeout=300)
  assert bad.returncode == 2 and bad.stderr.strip().startswith('Export failed: No checkpoint in')
  assert len(bad.stderr.strip().splitlines()) == 1
  assert pathlib.Path(out).stat().st_size > 0

"""The Imagenette reproduction's parts: its config and variants, the runtime estimates (XLA's FLOP count and
memory analysis of the real step), and the notebook's helpers' sentences. The notebook itself runs end to
end in tests/test_run_anywhere.py."""

import json

import pytest

from configs import imagenette
from tests import tiny_train_config
from udi_jax import estimate, reproduce
from udi_jax.errors import UserError
from udi_jax.train import loop


def test_the_imagenette_config_scales_the_released_recipe_and_refuses_unknown_variants():
  full, quick = imagenette.get_config(), imagenette.get_config('quick')
  assert (full.epochs, full.batch_size, full.data.num_local, full.optim.lr) == (200, 256, 6, 5e-4)
  assert (full.optim.warmup_epochs, full.udi.warmup_teacher_temp_epochs) == (7, 20)      # 10/300, 30/300 of 200
  assert (quick.optim.warmup_epochs, quick.udi.warmup_teacher_temp_epochs) == (1, 2)
  assert full.udi.momentum_teacher == pytest.approx(0.996 ** 0.25, abs=1e-4)               # 0.999: EMA scaling rule
  assert quick.udi.momentum_teacher == pytest.approx(1 - 10 * (1 - 0.996 ** 0.25), abs=1e-4)   # 0.99
  dino, tiny = imagenette.get_config('dino'), imagenette.get_config('tiny,quick')
  assert (dino.udi.include_patch, dino.model.num_cls_tokens) == (False, 1)
  assert (tiny.model.arch, tiny.model.dtype, tiny.epochs) == ('vit_tiny', 'float32', 20)
  for config in (full, quick, dino, tiny):
    loop.check_config(config, num_devices=8)
  with pytest.raises(ValueError, match='takes the variants dino, quick, tiny .comma-separated., not fast'):
    imagenette.get_config('quick,fast')


def test_the_estimate_counts_the_real_step_and_splits_its_memory():
  """XLA's FLOP count of the tiny step lies within 5 % of the analytic model count (element-wise work is the
  difference), and the compiled step's memory grows with the batch: a fixed part and a part per image."""
  from udi_jax.benchmark import udi_flops_per_image
  config = tiny_train_config.get_config()
  flops = estimate.step_flops_per_image(config)
  assert udi_flops_per_image(config) <= flops <= 1.6 * udi_flops_per_image(config)
  memory = estimate.step_memory(config)
  assert memory.per_image_bytes > 0 and memory.fixed_bytes > 0
  assert memory.at(4) > memory.at(2)


def test_the_batch_that_fits_and_the_hours():
  memory = estimate.Memory(fixed_bytes=2 ** 30, per_image_bytes=100 * 2 ** 20)
  # (0.85 x 16 GiB - 1 GiB) / 100 MiB = 129.0 images: 128, a multiple of 8; 40 GiB: 337.9, 336; 15 GiB: 120.
  assert estimate.fitting_batch(memory, 16.0, most=4096) == 128
  assert estimate.fitting_batch(memory, 16.0, most=64) == 64
  assert estimate.fitting_batch(memory, 1.0, most=64) == 0
  config = imagenette.get_config()
  # 200 epochs x 36 steps x 256 images x 100 GFLOP / (312 TFLOP/s x 0.3) = 1.97e6 s / 3600.
  hours = estimate.run_hours(config, 100e9, devices=1, peak_tflops=312.0, num_examples=9469)
  assert hours == pytest.approx(200 * 36 * 256 * 100e9 / (312e12 * 0.3) / 3600)
  row = estimate.runtime_row(config, estimate.RUNTIMES[2], 100e9, memory, 9469)
  assert row.startswith('| A100 40 GB | 1 | 256 (fits up to 336) | 0.5 h (estimate) |'), row
  small = estimate.runtime_row(config, estimate.RUNTIMES[0], 100e9, memory, 9469)
  assert 'config batch 256 does not fit: use --config.batch_size=120' in small, small


def test_the_notebooks_sentences(tmp_path, monkeypatch):
  with pytest.raises(UserError, match='a gs:// workdir is not supported yet'):
    reproduce.check_store('gs://bucket/udi_jax')
  monkeypatch.setattr(reproduce.pathlib.Path, 'is_dir', lambda self: False)
  with pytest.raises(UserError, match='Google Drive is not mounted at /content/drive'):
    reproduce.check_store('/content/drive/MyDrive/udi_jax')
  monkeypatch.undo()
  assert reproduce.check_store(str(tmp_path / 'store')).is_dir()
  config = imagenette.get_config()
  with pytest.raises(ValueError, match=r'config.optim.lrr is not a field of configs/imagenette.py'):
    reproduce.with_overrides(config, {'optim.lrr': 1e-3})
  assert reproduce.with_overrides(config, json.loads('{"eval.tokens": ["cls"]}')).eval.tokens == ('cls',)


def test_a_failed_download_is_one_sentence(tmp_path, monkeypatch):
  import tensorflow_datasets as tfds

  def offline(self, **kwargs):
    raise ConnectionError('no route to host')
  builder = type(tfds.builder(reproduce.DATASET, data_dir=str(tmp_path)))
  monkeypatch.setattr(builder, 'download_and_prepare', offline)
  with pytest.raises(UserError, match=rf'Downloading or preparing imagenette/320px-v2 into {tmp_path} failed '
                                      r'\(ConnectionError: no route to host\); check the connection'):
    reproduce.prepare(tmp_path)


def test_the_final_table_sets_the_run_beside_the_published_figures():
  row = {'top1@20': 80.0}
  found = {'initialisation': {'knn': {'cls': row}, 'linear': {'cls': {'top1': 30.0}}},
           'pretrained': {'knn': {'cls': {'top1@20': 84.0}}, 'linear': {'cls': {'top1': 86.5}}}}
  table = reproduce.final_table(found, 'UDI (this run)').splitlines()
  assert table[2:4] == ['| initialisation | cls | 80.0 | 30.0 |', '| UDI (this run) | cls | 84.0 | 86.5 |']
  assert '| iBOT (published, online probes) | cls | 43.3 | 57.9 |' in table

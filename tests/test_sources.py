"""Image sources: bundled data, ImageFolder with bad files, tfds (mock, ArrayRecord, TFRecord)."""

import functools
import io
import logging

import numpy as np
import pytest
from absl import flags
from PIL import Image

from udi_jax.data import sources
from udi_jax.data.crops import CropSettings
from udi_jax.data.pipeline import InputPipeline, PipelineSettings

flags.FLAGS.mark_as_parsed()
CROPS = CropSettings(global_size=32, local_size=16, num_local=2)


@pytest.mark.parametrize('name,total', [('mnist5k', 5000), ('digits', 1797)])
def test_bundled_splits_are_fixed_and_disjoint(name, total):
  train, test = sources.open_source(f'{name}:train'), sources.open_source(f'{name}:test')
  assert len(train) + len(test) == total and train.num_classes == 10
  assert abs(len(test) - 0.2 * total) <= 1
  again = sources.open_source(name)            # train by default, same order
  np.testing.assert_array_equal(again.images, train.images)
  rows = {r.tobytes() for r in train.images}
  assert sum(r.tobytes() in rows for r in test.images) < 0.01 * len(test)   # duplicates only by content
  image = sources.decode_image(train[0]['image'])
  assert image.mode == 'RGB' and image.size == train.images.shape[1:3][::-1]
  assert set(np.unique(train.labels)) == set(range(10))


def save(image: Image.Image, path, **kwargs):
  path.parent.mkdir(parents=True, exist_ok=True)
  image.save(path, **kwargs)


@pytest.fixture
def folder(tmp_path):
  """Two classes with every kind of difficult file."""
  rng = np.random.default_rng(0)
  rgb = lambda h, w: Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
  for k in range(4):
    save(rgb(60, 80), tmp_path / 'cat' / f'ok{k}.jpg', quality=90)
    save(rgb(50, 40), tmp_path / 'dog' / f'ok{k}.png')
  save(rgb(40, 40).convert('CMYK'), tmp_path / 'cat' / 'cmyk.jpg')
  save(Image.fromarray((rng.integers(0, 65535, (30, 20))).astype(np.uint16)), tmp_path / 'cat' / 'deep.png')
  save(rgb(30, 30).convert('P'), tmp_path / 'dog' / 'palette.png', transparency=0)
  save(rgb(30, 30).convert('RGBA'), tmp_path / 'dog' / 'alpha.png')
  save(rgb(30, 30).convert('L'), tmp_path / 'dog' / 'grey.webp')
  save(rgb(2, 3), tmp_path / 'dog' / 'tiny.png')
  (tmp_path / 'cat' / 'corrupt.jpg').write_bytes(rng.integers(0, 255, 500, dtype=np.uint8).tobytes())
  buffer = io.BytesIO()
  rgb(64, 64).save(buffer, format='JPEG')
  (tmp_path / 'dog' / 'truncated.jpg').write_bytes(buffer.getvalue()[:400])
  (tmp_path / 'dog' / 'notes.txt').write_text('not an image')
  return tmp_path


def test_every_image_mode_becomes_rgb(folder):
  source = sources.open_source(f'imagefolder:{folder}')
  assert source.classes == ['cat', 'dog'] and len(source) == 16
  modes = {}
  for i, path in enumerate(source.paths):
    try:
      image = sources.decode_image(source[i]['image'])
    except sources.UnreadableImage:
      modes[path.split('/')[-1]] = 'unreadable'
      continue
    modes[path.split('/')[-1]] = image.mode
    assert min(image.size) >= 2
  assert modes['corrupt.jpg'] == modes['truncated.jpg'] == 'unreadable'
  assert {modes[k] for k in ('cmyk.jpg', 'deep.png', 'palette.png', 'alpha.png', 'grey.webp', 'tiny.png')} == {'RGB'}
  deep = np.asarray(sources.decode_image(source[source.paths.index(str(folder / 'cat' / 'deep.png'))]['image']))
  assert deep.max() > 100                       # 16-bit scaled to 8 bits, not clipped to 255


def test_pipeline_skips_and_counts_bad_files(folder, caplog):
  source = sources.open_source(f'imagefolder:{folder}')
  settings = PipelineSettings(seed=0, global_batch=8, crops=CROPS)
  with caplog.at_level(logging.WARNING):
    batches = list(InputPipeline(source, settings, num_steps=6, process_index=0, process_count=1))
  skipped = sum(int(b['skipped'].sum()) for b in batches)
  used = np.concatenate([b['index'] for b in batches])
  bad = {source.paths.index(str(folder / 'cat' / 'corrupt.jpg')),
         source.paths.index(str(folder / 'dog' / 'truncated.jpg'))}
  assert skipped >= 2 and not bad & set(used.tolist())
  warnings = [r.getMessage() for r in caplog.records if 'Skipping unreadable image' in r.getMessage()]
  assert any('corrupt.jpg' in w for w in warnings) and any('truncated.jpg' in w for w in warnings)
  assert all(b['global'].dtype == np.uint8 and b['global'].shape == (8, 2, 32, 32, 3) for b in batches)


def test_empty_and_non_image_files_are_named_as_such():
  with pytest.raises(sources.UnreadableImage, match=r'^empty file \(0 bytes\)$'):
    sources.decode_image(b'')
  with pytest.raises(sources.UnreadableImage, match=r'^not an image \(11 bytes in no format PIL reads\)$'):
    sources.decode_image(b'hello world')


def test_an_empty_class_folder_is_accepted_with_a_warning(tmp_path, caplog):
  """It still takes a label id (as in torchvision's ImageFolder), which shifts the later classes' ids."""
  save(Image.new('RGB', (8, 8)), tmp_path / 'a' / 'x.png')
  (tmp_path / 'b').mkdir()
  save(Image.new('RGB', (8, 8)), tmp_path / 'c' / 'y.png')
  with caplog.at_level(logging.WARNING):
    source = sources.open_source(f'imagefolder:{tmp_path}')
  assert source.classes == ['a', 'b', 'c'] and list(source.labels) == [0, 2]
  assert any('class folders b of' in r.getMessage() and 'shifted' in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize('spec,message', [
    ('imagefolder:/no/such/folder', 'does not exist'),
    ('imagefolder:{empty}', 'holds no images'),
    ('mnist5k:valid', 'splits train and test'),
    ('pictures:/x', 'Unknown data source'),
])
def test_bad_sources_fail_with_a_sentence(tmp_path, spec, message):
  (tmp_path / 'empty' / 'a').mkdir(parents=True)
  with pytest.raises(ValueError, match=message):
    sources.open_source(spec.format(empty=tmp_path / 'empty'))


def test_tfds_mock_data_through_the_pipeline():
  tfds = pytest.importorskip('tensorflow_datasets')
  with tfds.testing.mock_data(num_examples=16):
    source = sources.open_source('tfds:mnist:train')
    assert len(source) == 16 and source.num_classes == 10
    batch = next(InputPipeline(source, PipelineSettings(seed=0, global_batch=4, crops=CROPS),
                               num_steps=2, process_index=0, process_count=1))
  assert batch['global'].shape == (4, 2, 32, 32, 3) and batch['label'].min() >= 0


@functools.lru_cache(maxsize=None)   # tfds registers a builder class by name, once
def _tiny_builder(tfds):
  class TinyImages(tfds.core.GeneratorBasedBuilder):
    """Eight small images in three classes."""
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
          'image': tfds.features.Image(shape=(None, None, 3)),
          'label': tfds.features.ClassLabel(num_classes=3)}))

    def _split_generators(self, dl_manager):
      return {'train': self._generate_examples()}

    def _generate_examples(self):
      for i in range(8):
        yield i, {'image': np.full((20 + i, 24, 3), 20 * i, np.uint8), 'label': i % 3}
  return TinyImages


@pytest.mark.parametrize('file_format', ['array_record', 'tfrecord'])
def test_tfds_prepared_dataset_in_both_formats(tmp_path, file_format):
  """ArrayRecord through tfds.data_source; TFRecord through the in-memory fallback."""
  tfds = pytest.importorskip('tensorflow_datasets')
  builder = _tiny_builder(tfds)(data_dir=str(tmp_path), file_format=file_format)
  builder.download_and_prepare()
  source = sources.open_source('tfds:tiny_images:train', data_dir=str(tmp_path))
  assert len(source) == 8 and source.num_classes == 3
  values = sorted(int(np.asarray(sources.decode_image(source[i]['image']))[0, 0, 0]) for i in range(8))
  assert values == [20 * i for i in range(8)]
  with pytest.raises(ValueError, match='no split'):
    sources.open_source('tfds:tiny_images:validation', data_dir=str(tmp_path))


def test_tfds_dataset_not_prepared_says_how_to_prepare(tmp_path):
  with pytest.raises(ValueError, match='tfds build mnist --file_format=array_record'):
    sources.open_source('tfds:mnist:train', data_dir=str(tmp_path))
  assert not any(tmp_path.iterdir())           # nothing downloaded or written

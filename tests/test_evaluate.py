"""Evaluation: k-NN against brute force, the linear probe against scikit-learn, low-shot subsets, the
evaluation of a checkpoint, k-NN during training, pictures and the demo's table (on the shared run)."""

import json

import jax
import numpy as np
import pytest
from PIL import Image

from tests.helpers import restore
from udi_jax.evaluate import features, knn, linear
from udi_jax.models.networks import build_networks


def brute_force_knn(bank, bank_labels, queries, num_classes, k, temperature=0.07):
  """Plain NumPy: ties between equal similarities -> lower bank index; between classes -> lower id."""
  norm = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  sims = norm(queries.astype(np.float64)) @ norm(bank.astype(np.float64)).T
  out = []
  for row in sims:
    order = np.argsort(-row, kind='stable')[:k]
    scores = np.zeros(num_classes)
    for j in order:
      scores[bank_labels[j]] += np.exp(row[j] / temperature)
    out.append(np.argsort(-scores, kind='stable')[:5])
  return np.array(out)


def test_evaluation_crop_resizes_by_the_configured_ratio():
  """256/224 (the official protocol) resizes a 28-px digit to 32 and cuts the centre 28; 1.0 keeps it."""
  from udi_jax.data.sources import bundled, decode_image
  image = decode_image(bundled('mnist5k')[0]['image'])
  np.testing.assert_array_equal(features.center_crop(image, 28, 1.0), np.asarray(image))
  expected = np.asarray(image.resize((32, 32), Image.Resampling.BICUBIC))[2:30, 2:30]
  np.testing.assert_array_equal(features.center_crop(image, 28), expected)


def test_knn_equals_brute_force_with_ties():
  """Random features plus exact duplicates with other labels: equal similarities (index order decides)
  and equal class scores (class id decides) both occur."""
  rng = np.random.default_rng(0)
  bank = rng.normal(size=(600, 6)).astype(np.float32)
  labels = rng.integers(0, 7, 600)
  queries = rng.normal(size=(90, 6)).astype(np.float32)
  copies = rng.choice(600, 150, replace=False)
  bank[copies[75:]] = bank[copies[:75]]                  # duplicates: tied similarities
  queries[:30] = bank[copies[:30]]                       # queries sitting on duplicated points
  predictions = knn.knn_predict(bank, labels, queries, 7, ks=knn.KS, chunk=32)
  for k in knn.KS:
    np.testing.assert_array_equal(predictions[k], brute_force_knn(bank, labels, queries, 7, k), err_msg=f'k={k}')
  acc = knn.knn_accuracy(bank, labels, queries, labels[:90], 7, ks=(10,))
  assert set(acc) == {'top1@10', 'top5@10'} and acc['top5@10'] >= acc['top1@10']


@pytest.fixture(scope='module')
def digit_features(tiny_run):
  """Features ('linear' and token 0) of the shared run's teacher on the full digits splits."""
  from udi_jax.data.sources import open_source
  config, workdir = tiny_run
  state, _ = restore(workdir, config)
  nets = build_networks(config)
  return {split: features.extract(nets, state.teacher['backbone'], open_source(f'digits:{split}'),
                                  config.data.global_size, ('linear', 'cls'), 128)
          for split in ('train', 'test')}


def test_linear_probe_agrees_with_scikit_learn(digit_features):
  """The same objective on the same real features: scikit-learn's C corresponds to the probe's L2
  penalty 1/(C n). Features are standardised (for both) so that SGD converges in 100 epochs."""
  from sklearn.linear_model import LogisticRegression
  (train_f, train_y), (test_f, test_y) = digit_features['train'], digit_features['test']
  mean, std = train_f['linear'].mean(0), train_f['linear'].std(0) + 1e-6
  train_x, test_x = (train_f['linear'] - mean) / std, (test_f['linear'] - mean) / std
  reference = LogisticRegression(C=1.0, max_iter=10000).fit(train_x, train_y)
  theirs = 100.0 * np.mean(reference.predict(test_x) == test_y)
  ours = linear.train_classification_probe(train_x, train_y, test_x, test_y, 10, linear.ProbeSettings(
      epochs=100, batch_size=256, lr=1.0, weight_decay=1.0 / len(train_x)))
  print(f'linear probe top-1 on digits: JAX {ours["top1"]:.1f} %, scikit-learn {theirs:.1f} %')
  assert abs(ours['top1'] - theirs) <= 1.5
  assert len(ours['curve']) == 100 and ours['best_top1'] >= ours['top1']


@pytest.fixture(scope='module')
def digit_pixels():
  """Raw pixels (64-d) and labels of the digits splits: features on which the classifiers' optima are
  well determined, independent of any network."""
  from udi_jax.data.sources import open_source
  splits = {s: open_source(f'digits:{s}') for s in ('train', 'test')}
  return {s: (src.images.reshape(len(src), -1).astype(np.float32), src.labels) for s, src in splits.items()}


def test_lowshot_subsets_and_classifier(digit_pixels):
  (train_x, train_y), (test_x, test_y) = digit_pixels['train'], digit_pixels['test']
  for fraction in (0.01, 0.1):
    idx = linear.lowshot_indices(train_y, fraction, seed=0)
    for c in np.unique(train_y):
      count = np.sum(train_y == c)
      assert np.sum(train_y[idx] == c) == max(1, int(round(fraction * count)))
    np.testing.assert_array_equal(idx, linear.lowshot_indices(train_y, fraction, seed=0))
    # Another seed, another subset (at 1 %, one image of ~144 per class: all ten equal by chance ~1e-21).
    assert not np.array_equal(idx, linear.lowshot_indices(train_y, fraction, seed=1))
  results = linear.lowshot(train_x, train_y, test_x, test_y, (0.1,), seed=0)
  assert set(results) == {'0.1'} and results['0.1']['examples'] == len(linear.lowshot_indices(train_y, 0.1))
  # scikit-learn's low-shot classifier (lambda = 1/n, no intercept) against the JAX probe with the same
  # objective on the same subset and normalised features.
  idx = linear.lowshot_indices(train_y, 0.1, seed=0)
  normalise = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  x, y = normalise(train_x[idx]), train_y[idx]
  only_lambda_1 = linear.logistic_regression(x, y, normalise(test_x), test_y, lambdas=(1.0,))
  probe = linear.train_classification_probe(x, y, normalise(test_x), test_y, 10, linear.ProbeSettings(
      epochs=300, batch_size=len(idx), lr=50.0, weight_decay=1.0 / len(idx)))
  print(f'low-shot 10 % (lambda = 1/n): scikit-learn {only_lambda_1["top1"]:.1f} %, JAX probe {probe["top1"]:.1f} %')
  assert only_lambda_1['top1'] > 50.0                       # a real optimum, far from chance
  assert abs(only_lambda_1['top1'] - probe['top1']) <= 3.0


def test_split_file_selects_named_images(tmp_path):
  names = [f'/data/train/n01/img_{i}.JPEG' for i in range(10)]
  (tmp_path / '1percent.txt').write_text('img_3.JPEG\nimg_7.JPEG\n')
  np.testing.assert_array_equal(linear.indices_from_split_file(tmp_path / '1percent.txt', names), [3, 7])
  (tmp_path / 'bad.txt').write_text('img_99.JPEG\n')
  with pytest.raises(ValueError, match='not in the training source'):
    linear.indices_from_split_file(tmp_path / 'bad.txt', names)


def test_knn_during_training_is_logged(tiny_run):
  _, workdir = tiny_run
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  knn_rows = [r for r in rows if 'knn/cls/top1@20' in r]
  # 0: the network at initialisation; every 2 epochs of 4 steps, and the last epoch (the curve's end).
  assert [r['step'] for r in knn_rows] == [0, 8, 12]
  assert all(0.0 <= r['knn/cls_plus/top1@20'] <= 100.0 for r in knn_rows)
  assert all(1 <= r['diag/prototypes_used/patch'] <= 64 and 1 < r['diag/rankme/cls_plus'] for r in knn_rows)


def test_report_writes_the_table_and_pictures(tiny_run):
  _, workdir = tiny_run
  table = (workdir / 'eval' / 'knn_table.md').read_text()
  payload = json.loads((workdir / 'eval' / 'knn_table.json').read_text())
  assert [(r['features'], r['token']) for r in payload['rows']] == [
      ('raw pixels', '-'), ('initialisation', 'cls'), ('initialisation', 'cls_plus'),
      ('initialisation', 'concat'), ('pretrained teacher', 'cls'), ('pretrained teacher', 'cls_plus'),
      ('pretrained teacher', 'concat')]
  assert '| raw pixels | - |' in table
  dense_rows = json.loads((workdir / 'eval' / 'dense_table.json').read_text())['rows']
  assert [r['features'] for r in dense_rows] == ['initialisation', 'pretrained teacher']
  for row in dense_rows:
    for p in ('dense_linear', 'dense_knn'):
      assert row[p]['train_examples'] == 48 and row[p]['val_examples'] == 16 and 0 < row[p]['miou'] <= 100
    levels = row['diagnostics']['teacher']
    assert set(levels) == {'cls', 'cls_plus', 'patch'}
    assert all(1 <= v['prototypes_used'] <= 64 and 0 < v['entropy'] <= np.log(64) + 1e-4 for v in levels.values())
    assert 1 < row['diagnostics']['rankme']['cls'] <= 32 and -1e-6 <= row['diagnostics']['cka_cls_cls_plus'] <= 1
  assert 'linear mIoU % | k-NN mIoU %' in (workdir / 'eval' / 'dense_table.md').read_text()
  for name in ('attention_cls.png', 'attention_cls_plus.png', 'readout_attention.png', 'training_curves.png',
               'knn_curve.png'):
    with Image.open(workdir / 'pictures' / name) as image:
      assert image.size[0] > 200 and image.size[1] > 100, name


def test_evaluating_a_checkpoint_writes_json(tiny_run, tmp_path):
  from udi_jax import main
  config, workdir = tiny_run
  config = config.copy_and_resolve_references()
  config.eval.protocols = ('knn', 'linear', 'lowshot', 'dense_linear', 'dense_knn', 'diagnostics')
  config.eval.checkpoint = str(workdir)
  results = main.evaluate_checkpoint(config, tmp_path)
  written = json.loads((tmp_path / 'eval' / 'step12_teacher.json').read_text())
  assert set(written) >= {'knn', 'linear', 'lowshot', 'dense_linear', 'dense_knn', 'diagnostics', 'train_examples',
                          'test_examples'}
  report = json.loads((workdir / 'eval' / 'dense_table.json').read_text())['rows'][1]
  assert written['dense_knn']['miou'] == pytest.approx(report['dense_knn']['miou'])
  assert written['dense_linear']['miou'] == pytest.approx(report['dense_linear']['miou'])
  assert written['diagnostics']['rankme'] == pytest.approx(report['diagnostics']['rankme'])
  assert written['knn']['cls']['top1@20'] == pytest.approx(results['knn']['cls']['top1@20'])
  assert written['test_examples'] == 128 and 0 <= written['linear']['linear']['top1'] <= 100


def test_features_are_the_official_ones(tiny_run):
  """Token 0 after the final norm; linear = token 0 of the last 4 blocks (here 2 blocks: clamped)."""
  config, workdir = tiny_run
  state, _ = restore(workdir, config)
  nets = build_networks(config)
  images = np.random.default_rng(0).integers(0, 255, (3, 16, 16, 3), dtype=np.uint8)
  from udi_jax.data.photometric import preprocess
  out = nets.backbone.apply({'params': state.teacher['backbone']}, preprocess(images), return_last_blocks=2)
  feats = jax.jit(lambda p, x: features._features(nets, p, x, ('cls', 'concat', 'linear')))(
      state.teacher['backbone'], images)
  np.testing.assert_allclose(feats['cls'], out.cls[:, 0], atol=1e-6)
  np.testing.assert_allclose(feats['concat'], out.cls.reshape(3, -1), atol=1e-6)
  np.testing.assert_allclose(feats['linear'], out.cls_blocks[:, :, 0].reshape(3, -1), atol=1e-6)

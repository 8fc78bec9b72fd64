"""Dense evaluation and diagnostics: mIoU, the patch k-NN, the linear probe, RankMe/CKA, the sources."""

import numpy as np
import pytest
from absl import flags
from PIL import Image

from udi_jax.data import segmentation
from udi_jax.data.sources import UnreadableImage
from udi_jax.evaluate import dense, dense_whole, diagnostics
from udi_jax.evaluate.batches import ProcessRows

flags.FLAGS.mark_as_parsed()


def test_miou_equals_a_straightforward_confusion_matrix():
  rng = np.random.default_rng(0)
  classes = 5
  labels = rng.integers(0, classes, size=(3, 16, 16)).astype(np.uint8)
  labels[rng.random(labels.shape) < 0.2] = segmentation.IGNORE
  labels[labels == 4] = 0                  # class 4 never occurs in the labels ...
  predictions = rng.integers(0, classes - 1, size=labels.shape)   # ... nor in the predictions: left out
  matrix = np.zeros((classes, classes), np.int64)
  for t, p in zip(labels.reshape(-1), predictions.reshape(-1)):
    if t != segmentation.IGNORE:
      matrix[t, p] += 1
  np.testing.assert_array_equal(dense.confusion_matrix(labels, predictions, classes), matrix)
  ious = [matrix[c, c] / (matrix[c, :].sum() + matrix[:, c].sum() - matrix[c, c]) for c in range(classes - 1)]
  result = dense.scores(matrix)
  assert result['miou'] == pytest.approx(100 * np.mean(ious))
  assert result['pixel_accuracy'] == pytest.approx(100 * np.trace(matrix) / matrix.sum())
  assert result['iou'][-1] is None and len(result['iou']) == classes


def brute_force_patch_knn(train_x, train_masks, test_x, classes, patch, k):
  """Per test patch: majority labels of the bank patches, cosine top-k, exp(s/0.07) votes, loops."""
  grid = train_masks.shape[-1] // patch
  bank, bank_labels = [], []
  for image, mask in zip(train_x, train_masks):
    for a in range(grid):
      for b in range(grid):
        pixels = mask[a * patch:(a + 1) * patch, b * patch:(b + 1) * patch].reshape(-1)
        pixels = pixels[pixels != segmentation.IGNORE]
        if len(pixels):
          bank.append(image[a * grid + b])
          bank_labels.append(np.bincount(pixels, minlength=classes).argmax())
  bank = np.asarray(bank, np.float64)
  bank /= np.linalg.norm(bank, axis=1, keepdims=True)
  predictions = []
  for image in test_x:
    for token in image:
      sims = bank @ (token / np.linalg.norm(token))
      order = sorted(range(len(bank)), key=lambda i: (-sims[i], i))[:k]
      votes = np.zeros(classes)
      for i in order:
        votes[bank_labels[i]] += np.exp(sims[i] / 0.07)
      predictions.append(int(np.argmax(votes)))
  return np.asarray(predictions).reshape(len(test_x), grid, grid)


def test_dense_knn_equals_a_brute_force_vote():
  rng = np.random.default_rng(1)
  classes, patch, grid = 3, 4, 3
  train_x = rng.normal(size=(5, grid * grid, 6)).astype(np.float32)
  test_x = rng.normal(size=(2, grid * grid, 6)).astype(np.float32)
  train_masks = rng.integers(0, classes, size=(5, grid * patch, grid * patch)).astype(np.uint8)
  train_masks[0, :patch, :patch] = segmentation.IGNORE         # a patch with no label leaves the bank
  test_masks = rng.integers(0, classes, size=(2, grid * patch, grid * patch)).astype(np.uint8)
  predicted = brute_force_patch_knn(train_x, train_masks, test_x, classes, patch, k=7)
  pixels = np.repeat(np.repeat(predicted, patch, axis=1), patch, axis=2)
  want = dense.scores(dense.confusion_matrix(test_masks, pixels, classes))
  got = dense.knn_segment(train_x, train_masks, test_x, test_masks, classes, patch, k=7)
  assert got['bank_patches'] == 5 * grid * grid - 1
  assert got['miou'] == pytest.approx(want['miou']) and got['pixel_accuracy'] == pytest.approx(want['pixel_accuracy'])


def test_linear_probe_tells_features_that_carry_the_label_from_shuffled_ones():
  """Tokens holding their patch's class (one-hot plus noise; classes in blocks of 2x2 tokens) reach
  about 90 % mIoU (not 100: the bilinear upsampling of the token logits blurs the class boundaries, as in
  the protocol); the same features with the masks of other images stay near chance."""
  rng = np.random.default_rng(2)
  classes, patch, grid, n = 4, 4, 4, 48
  token_classes = np.repeat(np.repeat(rng.integers(0, classes, size=(n, grid // 2, grid // 2)), 2, 1), 2, 2)
  masks = np.repeat(np.repeat(token_classes, patch, axis=1), patch, axis=2).astype(np.uint8)
  feats = np.eye(classes)[token_classes.reshape(n, -1)] + 0.3 * rng.normal(size=(n, grid * grid, classes))
  feats = np.concatenate([feats, rng.normal(size=(n, grid * grid, 4))], -1).astype(np.float32)
  settings = dense.DenseProbeSettings(epochs=15, batch_size=8, lr=3e-2)
  good = dense.segmentation_probe_on_crops(feats[:32], masks[:32], feats[32:], masks[32:], classes, settings)
  shuffled = dense.segmentation_probe_on_crops(feats[:32], masks[:32][::-1], feats[32:], masks[32:][::-1], classes,
                                               settings)
  print(f'mIoU with the label in the features {good["miou"]:.1f}, shuffled {shuffled["miou"]:.1f}')
  assert good['miou'] > 85 and good['pixel_accuracy'] > 92
  assert shuffled['miou'] < 30 and shuffled['pixel_accuracy'] < 40


def test_rankme_recovers_the_rank_and_cka_tells_shared_from_independent():
  rng = np.random.default_rng(3)
  basis, _ = np.linalg.qr(rng.normal(size=(32, 5)))
  low_rank = rng.normal(size=(2000, 5)) @ basis.T             # rank 5, nearly equal singular values
  assert diagnostics.rankme(low_rank) == pytest.approx(5, abs=0.3)
  assert diagnostics.rankme(rng.normal(size=(4000, 16))) == pytest.approx(16, abs=0.5)
  x = rng.normal(size=(4000, 8))
  rotation, _ = np.linalg.qr(rng.normal(size=(8, 8)))
  assert diagnostics.linear_cka(x, x) == pytest.approx(1.0)
  assert diagnostics.linear_cka(x, 3.0 * x @ rotation) == pytest.approx(1.0)
  assert diagnostics.linear_cka(x, rng.normal(size=(4000, 8))) < 0.01


def test_segdigits_is_deterministic_and_its_masks_are_the_pasted_digits():
  images, masks, placements = segmentation.segdigits_arrays(0, 'training', 24)
  again, again_masks, _ = segmentation.segdigits_arrays.__wrapped__(0, 'training', 24)
  np.testing.assert_array_equal(images, again)
  np.testing.assert_array_equal(masks, again_masks)
  other, _, _ = segmentation.segdigits_arrays(1, 'training', 24)
  assert not np.array_equal(images, other)
  assert images.shape == (24, 56, 56, 3) and masks.max() <= 10
  for image, mask, placed in zip(images, masks, placements):
    covered = np.zeros(mask.shape, bool)
    for digit, top, left, side in placed:
      box = (slice(top, top + side), slice(left, left + side))
      inside = np.zeros(mask.shape, bool)
      inside[box] = True
      covered |= inside & (mask == digit + 1)
    # every labelled pixel belongs to a pasted digit of that class, and the last digit is visible
    assert np.array_equal(covered, mask > 0)
    digit, top, left, side = placed[-1]
    strokes = mask[top:top + side, left:left + side] == digit + 1
    assert strokes.sum() > 10
  # the labelled regions hold the strokes (pasted in colours 180-255), brighter than the background (0-120)
  brightness = images.max(-1).astype(float)
  assert brightness[masks > 0].mean() > brightness[masks == 0].mean() + 30


def write_png(path, array):
  Image.fromarray(np.asarray(array, np.uint8)).save(path)


def test_segfolder_refuses_a_wrong_layout_and_skips_bad_files(tmp_path, caplog):
  root = tmp_path / 'ade'
  with pytest.raises(ValueError, match=r'needs .*images/training/NAME.jpg .*annotations/training.*is missing'):
    segmentation.open_segmentation(f'segfolder:{root}', 'training', num_classes=5)
  (root / 'images' / 'training').mkdir(parents=True)
  (root / 'annotations' / 'training').mkdir(parents=True)
  rng = np.random.default_rng(0)
  for name in ('good', 'corrupt', 'out_of_range', 'unlabelled', 'wrong_size'):
    write_png(root / 'images' / 'training' / f'{name}.png', rng.integers(0, 255, size=(20, 24, 3)))
  (root / 'images' / 'training' / 'corrupt.png').write_bytes(b'not a png')
  for name, top in (('good', 4), ('corrupt', 4), ('out_of_range', 20)):
    write_png(root / 'annotations' / 'training' / f'{name}.png', np.full((20, 24), top, np.uint8))
  write_png(root / 'annotations' / 'training' / 'wrong_size.png', np.full((20, 25), 1, np.uint8))
  with pytest.raises(ValueError, match='dense.num_classes must give the number of classes'):
    segmentation.open_segmentation(f'segfolder:{root}', 'training')
  with caplog.at_level('WARNING'):
    source = segmentation.open_segmentation(f'segfolder:{root}', 'training', num_classes=5)
    assert len(source) == 4 and '1 of 5 images' in caplog.text and 'unlabelled.png' in caplog.text
    batch = ProcessRows(source, dense.SegmentationRow(16, 5), {'image': np.zeros((16, 16, 3), np.uint8),
                        'mask': np.full((16, 16), segmentation.IGNORE, np.uint8)}, 4, 0, 1)(0)
  # sorted: corrupt, good, out_of_range, wrong_size
  np.testing.assert_array_equal(batch['valid'], [False, True, False, False])
  assert (batch['mask'][1] == 4).all() and (batch['mask'][3] == segmentation.IGNORE).all()
  assert 'corrupt.png' in caplog.text and 'class ids [20] outside 0..4' in caplog.text
  assert 'wrong_size.png' in caplog.text and 'image (24, 20) and annotation (25, 20) differ in size' in caplog.text
  with pytest.raises(ValueError, match="is not a segmentation source"):
    segmentation.check_spec('segfolder')


def test_tfds_segmentation_source_reads_scene_parse150_records():
  """Through tfds (mock records of scene_parse150's features: random sizes, random ids up to 255)."""
  tfds = pytest.importorskip('tensorflow_datasets')
  from udi_jax.data.sources import UnreadableImage, decode_image
  with tfds.testing.mock_data(num_examples=3):
    source = segmentation.open_segmentation('tfds:scene_parse150', 'validation', num_classes=255)
    record = source[0]
    decode_image(record['image'])
    mask = segmentation.decode_mask(record['mask'], 255)
    assert len(source) == 3 and source.mask_key == 'annotation' and mask.dtype == np.uint8 and mask.ndim == 2
    with pytest.raises(UnreadableImage, match=r'class ids \[151, .* outside 0..150'):
      segmentation.decode_mask(record['mask'], 151)


def test_ade20k_ignores_class_0_and_shifts_the_others_down():
  """mmseg's reduce_zero_label (DINOv2, iBOT: ADE20K has 150 classes): raw 0 ("other") is ignored, 1..150
  become 0..149; the default for scene_parse150 and the ADE release folder, off elsewhere."""
  raw = np.array([[0, 1, 2], [150, 255, 7]], np.uint8)
  np.testing.assert_array_equal(segmentation.decode_mask(raw, 150, reduce_zero_label=True),
                                [[255, 0, 1], [149, 255, 6]])
  np.testing.assert_array_equal(segmentation.decode_mask(raw, 151), raw)
  with pytest.raises(UnreadableImage, match=r'class ids \[151\] outside 1..150'):
    segmentation.decode_mask(np.array([[151]], np.uint8), 150, reduce_zero_label=True)
  assert segmentation.reduces_zero_label('tfds:scene_parse150', None)
  assert segmentation.reduces_zero_label('segfolder:/data/ADEChallengeData2016/', None)
  assert not segmentation.reduces_zero_label('segfolder:/data/cityscapes', None)
  assert not segmentation.reduces_zero_label('segdigits', None)
  assert not segmentation.reduces_zero_label('tfds:scene_parse150', False)


def test_token_grid_scores_reach_the_label_resolution_as_torch_bilinear():
  """The grid's scores resized to odd label sizes (and through the padded, bucketed program) give the
  classes that torch's bilinear interpolation (align_corners=False) then argmax gives."""
  import torch
  rng = np.random.default_rng(4)
  for rows, cols, height, width in ((4, 7, 37, 61), (3, 3, 100, 101), (5, 9, 20, 35)):
    grid = rng.normal(size=(rows, cols, 6)).astype(np.float32)
    want = torch.nn.functional.interpolate(torch.from_numpy(grid).permute(2, 0, 1)[None], size=(height, width),
                                           mode='bilinear', align_corners=False)[0].argmax(0).numpy()
    got = dense_whole.labels_at_resolution(grid, height, width)
    assert got.shape == (height, width)
    assert (got != want).mean() < 1e-3       # float ties at most


class ColourFeatures:
  """A stand-in for `dense.PatchFeatures`: each token is its patch's mean colour."""
  batch_size, rows, size, patch = 4, 4, 32, 8

  def __call__(self, crops):
    n, g = len(crops), self.size // self.patch
    return crops.reshape(n, g, self.patch, g, self.patch, 3).mean((2, 4)).reshape(n, g * g, 3)


def test_whole_images_are_scored_at_their_label_resolution():
  """Images of several shapes, portrait and landscape, whose colour is their class (left and right halves,
  or top and bottom: regions of many tokens): every labelled pixel of every image is scored at the
  annotation's own size, and the classes come back where they are, up to a blur at the border."""
  records = []
  for height, width in ((40, 72), (72, 40), (48, 48), (50, 123)):
    mask = np.zeros((height, width), np.uint8)
    if width >= height:
      mask[:, width // 2:] = 1
    else:
      mask[height // 2:] = 1
    mask[:2, :2] = segmentation.IGNORE
    image = np.stack([mask * 200] * 3, -1).astype(np.uint8)
    records.append({'image': image, 'mask': mask, 'name': f'{height}x{width}'})
  colour_to_class = lambda tokens: np.stack([200 - tokens[..., 0], tokens[..., 0]], -1) / 200
  confusions, scored, skipped = dense_whole.whole_image_confusions(
      ColourFeatures(), RecordList(records, 2), {'colour': colour_to_class}, 2)
  confusion = confusions['colour']
  assert scored == 4 and skipped == 0
  assert confusion.sum() == sum(int((r['mask'] != segmentation.IGNORE).sum()) for r in records)
  accuracy = np.trace(confusion) / confusion.sum()
  print(f'whole-image accuracy of the colour classes: {100 * accuracy:.2f} %')
  assert accuracy > 0.97


class RecordList(list):
  def __init__(self, records, num_classes):
    super().__init__(records)
    self.num_classes = num_classes

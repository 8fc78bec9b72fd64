"""Evaluation of a checkpoint: k-NN, linear probe, low-shot, pictures, and the demo's comparison table.

`config.eval` chooses the splits, the network (teacher by default), the feature tokens and the protocols.
Results go to `workdir/eval/<name>.json` (and `.md` for tables); pictures to `workdir/pictures/`.
"""

from __future__ import annotations

import json
import pathlib
import time
from typing import Any, Optional

import jax
import numpy as np

from udi_jax.data import segmentation
from udi_jax.data.sources import Source, check_spec, decode_image, limit, open_source, probe_source
from udi_jax.errors import config_errors
from udi_jax.evaluate import attention, dense, dense_whole, diagnostics, features, knn, linear
from udi_jax.models.networks import CLS, CLS_PLUS, Networks

DENSE_PROTOCOLS = ('dense_linear', 'dense_knn')
PROTOCOLS = ('knn', 'linear', 'lowshot') + DENSE_PROTOCOLS + ('diagnostics',)
NETWORKS = ('teacher', 'student')


def check_config(config) -> None:
  """Refuses unknown `config.eval` values (network, tokens, protocols, splits) with one sentence."""
  ev = config.eval
  if ev.network not in NETWORKS:
    raise ValueError(f'config.eval.network={ev.network!r} is not known; use one of {NETWORKS}.')
  unknown = [t for t in ev.tokens if t not in features.TOKEN_KINDS]
  if unknown or not ev.tokens:
    raise ValueError(f'config.eval.tokens holds {list(unknown or ev.tokens)}; choose from {features.TOKEN_KINDS}.')
  unknown = [p for p in ev.protocols if p not in PROTOCOLS]
  if unknown:
    raise ValueError(f'config.eval.protocols holds {unknown}; choose from {PROTOCOLS}.')
  if not ev.resize_ratio >= 1.0:
    raise ValueError(f'config.eval.resize_ratio={ev.resize_ratio} must be at least 1 (256/224 in the official '
                     'protocol; 1.0 keeps the images at the crop size).')
  if not ev.knn_ks or min(ev.knn_ks) < 1:
    raise ValueError(f'config.eval.knn_ks={tuple(ev.knn_ks)} must list positive neighbour counts.')
  for field in ('train_source', 'test_source'):
    if ev[field]:
      check_spec(ev[field], f'config.eval.{field}')
  dense_asked = [p for p in ev.protocols if p in DENSE_PROTOCOLS]
  if dense_asked and not ev.dense_source:
    raise ValueError(f'config.eval.protocols holds {dense_asked}, which need config.eval.dense_source '
                     f'({segmentation.FORMS}).')
  if ev.dense_source:
    segmentation.check_spec(ev.dense_source)
  if ev.dense_blocks not in (1, 4):
    raise ValueError(f'config.eval.dense_blocks={ev.dense_blocks} is not supported; use 1 (the last block) or '
                     '4 (the last four, concatenated).')
  size = ev.dense_size or config.data.global_size
  if size % config.model.patch_size:
    raise ValueError(f'config.eval.dense_size={size} is not a multiple of config.model.patch_size='
                     f'{config.model.patch_size}; choose a multiple of it.')


def probe_sources(config) -> None:
  """Refuses, before a run trains, evaluation sources that it would fail to open at its k-NN or report
  (checked cheaply: nothing is read, an image folder is not walked)."""
  ev = config.eval
  if not ev.train_source or not ev.test_source:
    raise ValueError('config.eval.train_source and config.eval.test_source must name the splits to '
                     'evaluate on, e.g. mnist5k:train and mnist5k:test (or set config.eval.report=False and '
                     'config.eval.knn_every_epochs=0).')
  for field in ('train_source', 'test_source'):
    probe_source(ev[field], config.data.data_dir or None, f'config.eval.{field}')
  if ev.dense_source:
    segmentation.probe_segmentation(ev.dense_source, config.data.data_dir or None, ev.dense_num_classes)


def evaluated_network(config, state) -> dict:
  """The params `config.eval.network` names, of a TrainState."""
  return state.teacher if config.eval.network == 'teacher' else state.student


def reported_k(config) -> int:
  """The k that tables and summaries report: 20 when it is evaluated, else the first."""
  return 20 if 20 in config.eval.knn_ks else config.eval.knn_ks[0]


def eval_sources(config) -> tuple[Source, Source]:
  """(k-NN bank / training split, test split), limited by config.eval.max_*_examples."""
  ev = config.eval
  if not ev.train_source or not ev.test_source:
    raise ValueError('config.eval.train_source and config.eval.test_source must name the splits to '
                     'evaluate on, e.g. mnist5k:train and mnist5k:test.')
  data_dir = config.data.data_dir or None
  with config_errors():
    train = limit(open_source(ev.train_source, data_dir), ev.max_train_examples)
    test = limit(open_source(ev.test_source, data_dir), ev.max_test_examples)
  return train, test


def token_kinds(config, nets: Networks) -> tuple[str, ...]:
  """`config.eval.tokens` without those a 1-token model lacks."""
  tokens = tuple(config.eval.tokens)
  if nets.backbone.num_cls_tokens < 2:
    tokens = tuple(t for t in tokens if t not in features.TWO_TOKEN_KINDS)
  return tokens


def knn_results(nets, backbone_params, train: Source, test: Source, config, tokens,
                with_features: bool = False):
  """{token: k-NN accuracies}; with `with_features` also the test split's features {kind: (N, D)}."""
  crop, batch, ratio = config.data.global_size, config.eval.batch_size, config.eval.resize_ratio
  bank, bank_labels = features.extract(nets, backbone_params, train, crop, tokens, batch, 'k-NN bank', ratio)
  queries, labels = features.extract(nets, backbone_params, test, crop, tokens, batch, 'k-NN queries', ratio)
  classes = int(max(train.num_classes, bank_labels.max() + 1, labels.max() + 1))
  results = {t: knn.knn_accuracy(bank[t], bank_labels, queries[t], labels, classes, tuple(config.eval.knn_ks))
             for t in tokens}
  return (results, queries) if with_features else results


def dense_sources(config) -> tuple[Any, Any]:
  """The training and validation splits of config.eval.dense_source, limited by dense_max_*_examples."""
  ev = config.eval
  counts = (ev.dense_max_train_examples or None, ev.dense_max_test_examples or None)
  with config_errors():   # (segdigits makes only the examples used; the others are read lazily)
    opened = [segmentation.open_segmentation(ev.dense_source, split, config.data.data_dir or None,
                                             ev.dense_num_classes, count)
              for split, count in zip(segmentation.SPLITS, counts)]
  return (limit(opened[0], ev.dense_max_train_examples), limit(opened[1], ev.dense_max_test_examples))


def dense_results(config, nets: Networks, backbone_params, protocols=DENSE_PROTOCOLS) -> dict[str, Any]:
  """The dense protocols on frozen patch tokens (`dense.py`): trained on the training split's crops, scored
  on the validation split's whole images at their label resolution (`dense_whole.py`)."""
  ev = config.eval
  train, test = dense_sources(config)
  size, blocks, batch = ev.dense_size or config.data.global_size, ev.dense_blocks, ev.batch_size
  reduce_zero_label = segmentation.reduces_zero_label(ev.dense_source, ev.dense_reduce_zero_label)
  train_x, train_m, skipped_train = dense.extract(nets, backbone_params, train, size, batch, blocks,
                                                  'dense training features', reduce_zero_label)
  classes = int(train.num_classes)
  scorers, about = {}, {}
  if 'dense_linear' in protocols:
    settings = dense.DenseProbeSettings(epochs=ev.dense_linear_epochs, batch_size=ev.dense_linear_batch_size,
                                        lr=ev.dense_linear_lr, seed=config.seed)
    probe = dense.fit_segmentation_probe(train_x, train_m, classes, settings)
    scorers['dense_linear'] = probe.token_scores
    about['dense_linear'] = {'final_train_loss': probe.final_train_loss, 'epochs': settings.epochs}
  if 'dense_knn' in protocols:
    bank = dense.patch_bank(train_x, train_m, classes, nets.backbone.patch_size, k=ev.dense_knn_k,
                            bank_size=ev.dense_knn_bank, seed=config.seed)
    scorers['dense_knn'] = bank.token_scores
    about['dense_knn'] = {'k': bank.k, 'bank_patches': int(len(bank.labels))}
  del train_x
  features = dense.PatchFeatures(nets, backbone_params, size, batch, blocks)
  confusions, scored, skipped_test = dense_whole.whole_image_confusions(
      features, test, scorers, classes, reduce_zero_label, 'dense validation (whole images)')
  out: dict[str, Any] = {'source': ev.dense_source, 'size': size, 'blocks': blocks, 'classes': classes,
                         'reduce_zero_label': reduce_zero_label, 'train_examples': len(train_m),
                         'val_examples': scored, 'skipped_examples': skipped_train + skipped_test,
                         'scored_on': 'whole validation images at label resolution (sliding windows)'}
  for name in scorers:
    out[name] = {**dense.scores(confusions[name]), **about[name]}
  return out


def diagnostics_results(config, nets: Networks, params: dict, centres: Optional[dict], test: Source,
                        token_features: Optional[dict] = None) -> dict[str, Any]:
  """RankMe per class token, CKA(token 0, token 1), and the teacher's entropy and prototypes used per
  level, on the first config.eval.diagnostics_examples images of the test split."""
  count = min(len(test), config.eval.diagnostics_examples or len(test))
  crop, ratio = config.data.global_size, config.eval.resize_ratio
  kinds = (CLS, CLS_PLUS) if nets.backbone.num_cls_tokens > 1 else (CLS,)
  if token_features is None or any(k not in token_features for k in kinds):
    token_features, _ = features.extract(nets, params['backbone'], limit(test, count), crop, kinds,
                                         config.eval.batch_size, 'diagnostics features', ratio)
  feats = {k: token_features[k][:count] for k in kinds}
  out: dict[str, Any] = {'examples': count, 'rankme': {k: diagnostics.rankme(v) for k, v in feats.items()}}
  if CLS_PLUS in feats:
    out['cka_cls_cls_plus'] = diagnostics.linear_cka(feats[CLS], feats[CLS_PLUS])
  images = np.stack([features.center_crop(decode_image(test[i]['image']), crop, ratio) for i in range(count)])
  out['teacher'] = diagnostics.teacher_levels(config, nets, params, centres, images)
  return out


def knn_during_training(config, nets: Networks, state) -> tuple[dict[str, Any], dict[str, float]]:
  """k-NN of the evaluated network of a TrainState, per token (`config.eval.knn_every_epochs`), and with
  'diagnostics' in config.eval.protocols the scalars of `diagnostics_results` as {'diag/...': value}."""
  train, test = eval_sources(config)
  network = evaluated_network(config, state)
  results, test_features = knn_results(nets, network['backbone'], train, test, config, token_kinds(config, nets),
                                       with_features=True)
  if 'diagnostics' not in config.eval.protocols:
    return results, {}
  found = diagnostics_results(config, nets, network, state.centres, test, test_features)
  scalars = {f'diag/rankme/{k}': v for k, v in found['rankme'].items()}
  if 'cka_cls_cls_plus' in found:
    scalars['diag/cka_cls_cls_plus'] = found['cka_cls_cls_plus']
  for level, values in found['teacher'].items():
    scalars.update({f'diag/{name}/{level}': v for name, v in values.items()})
  return results, scalars


def raw_pixel_knn(train: Source, test: Source, config) -> dict[str, float]:
  """The k-NN baseline on the evaluation crops' pixels."""
  crop, ratio = config.data.global_size, config.eval.resize_ratio
  pixels = lambda src: np.stack([features.center_crop(decode_image(src[i]['image']), crop, ratio).reshape(-1)
                                 for i in range(len(src))]).astype(np.float32)
  labels = lambda src: np.asarray([src[i]['label'] for i in range(len(src))])
  classes = int(train.num_classes)
  return knn.knn_accuracy(pixels(train), labels(train), pixels(test), labels(test), classes,
                          tuple(config.eval.knn_ks))


def evaluate(config, nets: Networks, params: dict, workdir: pathlib.Path, name: str,
             protocols=PROTOCOLS, centres: Optional[dict] = None) -> dict[str, Any]:
  """Runs the protocols on one network's params (with the run's `centres` for the diagnostics); writes
  eval/<name>.json; returns the results."""
  unknown = [p for p in protocols if p not in PROTOCOLS]
  if unknown:
    raise ValueError(f'Unknown evaluation protocols {unknown}; choose from {PROTOCOLS}.')
  train, test = eval_sources(config)
  tokens = token_kinds(config, nets)
  results: dict[str, Any] = {'network': config.eval.network, 'train_source': config.eval.train_source,
                             'test_source': config.eval.test_source, 'train_examples': len(train),
                             'test_examples': len(test)}
  started = time.time()
  if 'knn' in protocols:
    results['knn'] = knn_results(nets, params['backbone'], train, test, config, tokens)
  if 'linear' in protocols or 'lowshot' in protocols:
    crop, batch, ratio = config.data.global_size, config.eval.batch_size, config.eval.resize_ratio
    kinds = ('linear', CLS)             # the official probe feature; low-shot on token 0
    train_x, train_y = features.extract(nets, params['backbone'], train, crop, kinds, batch, 'train features', ratio)
    test_x, test_y = features.extract(nets, params['backbone'], test, crop, kinds, batch, 'test features', ratio)
    classes = int(max(train.num_classes, train_y.max() + 1))
    if 'linear' in protocols:
      settings = linear.ProbeSettings(epochs=config.eval.linear_epochs, batch_size=config.eval.linear_batch_size,
                                      lr=config.eval.linear_lr, seed=config.seed)
      results['linear'] = linear.train_classification_probe(train_x['linear'], train_y, test_x['linear'], test_y,
                                                            classes, settings)
    if 'lowshot' in protocols:
      split_dir = config.eval.lowshot_split_dir
      split_files = ({f: str(pathlib.Path(split_dir) / f'{f * 100:g}percent.txt')
                      for f in config.eval.lowshot_fractions} if split_dir else None)
      results['lowshot'] = linear.lowshot(train_x[CLS], train_y, test_x[CLS], test_y,
                                          tuple(config.eval.lowshot_fractions), seed=config.seed,
                                          split_files=split_files, names=getattr(train, 'paths', None))
  if set(protocols) & set(DENSE_PROTOCOLS):
    results['dense'] = dense_results(config, nets, params['backbone'], protocols)
  if 'diagnostics' in protocols:
    results['diagnostics'] = diagnostics_results(config, nets, params, centres, test)
  results['seconds'] = round(time.time() - started, 1)
  write_json(workdir / 'eval' / f'{name}.json', results)
  return results


def write_json(path: pathlib.Path, payload: dict):
  if jax.process_index() != 0:
    return
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(payload, indent=2, default=float))


def comparison_table(config, nets: Networks, init_params: dict, trained_params: dict,
                     workdir: pathlib.Path) -> tuple[str, dict, dict]:
  """The demo's k-NN table: raw pixels, the network at initialisation, the trained network per token.
  Returns (markdown, payload, the test split's features {'init', 'trained'} for the diagnostics)."""
  train, test = eval_sources(config)
  tokens = token_kinds(config, nets)
  k = reported_k(config)
  rows = [('raw pixels', '-', raw_pixel_knn(train, test, config))]
  init, init_features = knn_results(nets, init_params['backbone'], train, test, config, tokens, True)
  trained, trained_features = knn_results(nets, trained_params['backbone'], train, test, config, tokens, True)
  rows += [('initialisation', t, init[t]) for t in tokens]
  rows += [(f'pretrained {config.eval.network}', t, trained[t]) for t in tokens]
  lines = [f'k-NN on {config.eval.test_source} ({len(test)} images; bank {config.eval.train_source}, '
           f'{len(train)} images), k = {k}, T = {knn.TEMPERATURE}', '',
           '| features | token | top-1 % | top-5 % |', '|---|---|---|---|']
  lines += [f'| {what} | {tok} | {r[f"top1@{k}"]:.1f} | {r[f"top5@{k}"]:.1f} |' for what, tok, r in rows]
  table = '\n'.join(lines)
  payload = {'k': k, 'rows': [{'features': w, 'token': t, **r} for w, t, r in rows]}
  write_json(workdir / 'eval' / 'knn_table.json', payload)
  if jax.process_index() == 0:
    (workdir / 'eval' / 'knn_table.md').write_text(table + '\n')
  return table, payload, {'init': init_features, 'trained': trained_features}


def dense_table(config, nets: Networks, init_params: dict, trained_params: dict, centres: Optional[dict],
                workdir: pathlib.Path, test_features: Optional[dict] = None) -> tuple[str, dict]:
  """The report's dense table: the dense protocols (with config.eval.dense_source) and the diagnostics of
  the network at initialisation and trained (`centres`: the run's; zero at initialisation)."""
  _, test = eval_sources(config)
  test_features = test_features or {}
  rows = []
  for what, params, run_centres, key in (('initialisation', init_params, None, 'init'),
                                         (f'pretrained {config.eval.network}', trained_params, centres, 'trained')):
    row: dict[str, Any] = {'features': what}
    if config.eval.dense_source:
      row['dense'] = dense_results(config, nets, params['backbone'])
    row['diagnostics'] = diagnostics_results(config, nets, params, run_centres, test, test_features.get(key))
    rows.append(row)
  levels = list(rows[0]['diagnostics']['teacher'])
  per_level = lambda d, field: ' / '.join(f'{d["teacher"][lv][field]:.2f}' for lv in levels)
  ranks = lambda d: ' / '.join(f'{v:.1f}' for v in d['rankme'].values())
  dense_cells = lambda r: (f'{r["dense"]["dense_linear"]["miou"]:.1f} | {r["dense"]["dense_knn"]["miou"]:.1f} | '
                           if 'dense' in r else '')
  header = ('| features | ' + ('linear mIoU % | k-NN mIoU % | ' if config.eval.dense_source else '') +
            f'RankMe {" / ".join(rows[0]["diagnostics"]["rankme"])} | CKA cls, cls_plus | prototypes used '
            f'({" / ".join(levels)}) | teacher entropy ({" / ".join(levels)}) |')
  lines = []
  if config.eval.dense_source:
    d = rows[0]['dense']
    lines += [f'Dense: {d["source"]} ({d["train_examples"]} training crops of {d["size"]} px, {d["val_examples"]} '
              f'whole validation images, {d["classes"]} classes); diagnostics on {rows[0]["diagnostics"]["examples"]} '
              f'images of {config.eval.test_source}; ln K = {np.log(config.model.out_dim):.2f}', '']
  lines += [header, '|' + '---|' * header.count(' | ') + '---|']
  for r in rows:
    d = r['diagnostics']
    cka = f'{d["cka_cls_cls_plus"]:.2f}' if 'cka_cls_cls_plus' in d else '-'
    lines.append(f'| {r["features"]} | {dense_cells(r)}{ranks(d)} | {cka} | {per_level(d, "prototypes_used")} | '
                 f'{per_level(d, "entropy")} |')
  table = '\n'.join(lines)
  payload = {'rows': rows}
  write_json(workdir / 'eval' / 'dense_table.json', payload)
  if jax.process_index() == 0:
    (workdir / 'eval' / 'dense_table.md').write_text(table + '\n')
  return table, payload


def pictures(config, nets: Networks, params: dict, workdir: pathlib.Path, count: int = 6) -> list[pathlib.Path]:
  """Attention pictures on `count` test images spread over the split, and the training curves."""
  if jax.process_index() != 0:
    return []
  _, test = eval_sources(config)
  crop = config.data.global_size
  spread = np.unique(np.linspace(0, len(test) - 1, min(count, len(test))).astype(int))   # sorted data: spread out
  images = np.stack([features.center_crop(decode_image(test[int(i)]['image']), crop, config.eval.resize_ratio)
                     for i in spread])
  directory = workdir / 'pictures'
  written = attention.draw_attention(nets, params, images, directory, seed=config.seed,
                                     window=config.udi.global_window)
  curves = attention.draw_curves(workdir / 'metrics.jsonl', directory / 'training_curves.png', reported_k(config))
  return written + ([curves] if curves else [])

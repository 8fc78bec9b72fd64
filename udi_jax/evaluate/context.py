"""What the evaluation protocols evaluate, and what they share.

One `EvalContext` holds one network's params and the run's config. The protocols of one evaluation read the
same splits, and the class-token features they ask for are extracted once for all of them (one pass over
each split, for the union of the kinds the protocols declare with `feature_kinds`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import numpy as np

from udi_jax.data.sources import Source, limit, open_source
from udi_jax.errors import config_errors
from udi_jax.evaluate import features
from udi_jax.models.networks import Networks

SPLITS = ('train', 'test')


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


@dataclasses.dataclass
class EvalContext:
  """One network under evaluation (`params`: its 'backbone' and heads; `centres`: its run's teacher
  centres, None at initialisation) and the features its protocols share."""
  config: Any
  nets: Networks
  params: dict
  centres: Optional[dict] = None
  # The whole-image scorers of this evaluation's dense protocols by name: one scoring pass serves them all.
  dense_scorers: dict = dataclasses.field(default_factory=dict)
  _splits: Optional[tuple[Source, Source]] = None
  _features: dict = dataclasses.field(default_factory=dict)     # (split, kind) -> (N, D)
  _labels: dict = dataclasses.field(default_factory=dict)       # split -> (N,)
  _made: dict = dataclasses.field(default_factory=dict)         # what `shared` made, by key

  @property
  def backbone(self) -> dict:
    return self.params['backbone']

  @property
  def tokens(self) -> tuple[str, ...]:
    return token_kinds(self.config, self.nets)

  def splits(self) -> tuple[Source, Source]:
    if self._splits is None:
      self._splits = eval_sources(self.config)
    return self._splits

  def features(self, split: str, kinds: tuple[str, ...]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """({kind: (N, D)}, labels (N,)) of the centre crops of `split` ('train' or 'test'); kinds not yet
    extracted are extracted together in one pass."""
    missing = tuple(k for k in dict.fromkeys(kinds) if (split, k) not in self._features)
    if missing:
      source = self.splits()[SPLITS.index(split)]
      ev = self.config.eval
      found, labels = features.extract(self.nets, self.backbone, source, self.config.data.global_size, missing,
                                       ev.batch_size, f'{split} features', ev.resize_ratio)
      self._features.update({(split, k): v for k, v in found.items()})
      self._labels[split] = labels
    return {k: self._features[(split, k)] for k in kinds}, self._labels[split]

  def extracted(self, split: str, kinds: tuple[str, ...]) -> Optional[dict[str, np.ndarray]]:
    """The features of `kinds` on `split` when all were extracted already, else None."""
    if all((split, k) in self._features for k in kinds):
      return {k: self._features[(split, k)] for k in kinds}
    return None

  def shared(self, key: str, make: Callable[[], Any]) -> Any:
    """`make()` once per context: what several protocols need (the dense training features, say)."""
    if key not in self._made:
      self._made[key] = make()
    return self._made[key]

  def forget(self, key: str) -> None:
    """Lets what `shared` made under `key` go (memory)."""
    self._made.pop(key, None)

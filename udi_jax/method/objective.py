"""The UDI objective: teacher targets, student outputs, the level losses, the centre update (docs/method.md §4).

Per-device code, read as five stages that `udi_objective` composes:

1. `teacher_targets` (§4.1–4.3): the teacher backbone once on both global views, the read-out at every
   point, and the targets T0, T1 (the multimodal cls+ blend), T2 with the centres before this step;
2. `student_outputs` (§4.2): the student's log-probabilities at every level, one backbone call per crop
   resolution, the read-out at its own samples of the global views;
3. `level_losses` (§4.2, §4.4): the five cross-entropy terms and the per-level weighting;
4. `updated_centres` (§4.4): c ← m c + (1 − m) μ;
5. `health_metrics`: teacher entropy and KL per level, fraction of valid samples.

With `axis_name` set (inside `shard_map`/`pmap` over the `data` axis) every reduction is global: the
reported losses and the centres are those of the whole batch, pooled with `psum` (docs/method.md §8.3 and
§8.8), so they do not depend on the number of devices.

Levels (docs/design.md, contract 5): `cls` (z_cls vs the teacher's cls distribution), `cls_plus` (z_cls+ vs the
multimodal blend of teacher cls and read-out logits), `patch` (student read-outs vs teacher read-outs at
corresponding points). The total loss is the mean over the active levels.

Two exact rewrites of the official computation (docs/method.md §8.1, §8.6), tested against the straightforward
form: the teacher backbone runs once on the global views and reads out all 16 + 9*n_l points per view in
one call; and because the head's last layer is linear and bias-free, the masked means behind the cls+
targets and the patch centre are taken over the 256-d bottleneck vectors and projected once, instead of
projecting every local read-out to K logits.

Returned loss: the per-device share whose sum over devices is the global total, so that the gradient
summed over devices is the gradient of the global loss (pmap semantics; a shard_map with `check_vma`
sums it for you).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from udi_jax.method.sampling import Samples
from udi_jax.models.networks import CLS, CLS_PLUS, PATCH, TOKEN_LEVELS, Networks, Params

MASKED_MEAN_EPS = 1e-5   # official: sum(m x) / (sum(m) + 1e-5), also when every row is valid
PATCH_LOSS_NORMS = ('global', 'per_device')
TARGET_MIXING = ('logit', 'prob')
HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class ObjectiveSettings:
  alpha: float = 0.5             # weight of the patch part in the cls+ target
  student_temp: float = 0.1
  center_momentum: float = 0.9
  patch_loss_norm: str = 'global'   # 'global': psum/psum valid count; 'per_device': mean of device means
  target_mixing: str = 'logit'      # 'logit' (official product of experts) or 'prob' (mixture, §9.2)
  local_patch_loss: bool = False    # add a patch term for the local crops against both global views

  def __post_init__(self):
    if self.target_mixing not in TARGET_MIXING:
      raise ValueError(f'config.udi.target_mixing={self.target_mixing!r} is not known; use one of '
                       f'{TARGET_MIXING}.')
    if self.patch_loss_norm not in PATCH_LOSS_NORMS:
      raise ValueError(f'config.udi.patch_loss_norm={self.patch_loss_norm!r} is not known; '
                       f'use one of {PATCH_LOSS_NORMS}.')
    if not 0.0 <= self.alpha <= 1.0:
      raise ValueError(f'config.udi.alpha={self.alpha} is outside [0, 1]; choose a blend weight in it.')
    if self.student_temp <= 0:
      raise ValueError(f'config.udi.student_temp={self.student_temp} must be positive.')
    if not 0.0 <= self.center_momentum < 1.0:
      raise ValueError(f'config.udi.center_momentum={self.center_momentum} must lie in [0, 1).')

  @classmethod
  def from_config(cls, config) -> 'ObjectiveSettings':
    udi = config.udi
    if udi.local_patch_loss and not (udi.include_patch and config.data.num_local > 0):
      raise ValueError('config.udi.local_patch_loss=True needs the patch branch and local crops; set '
                       'config.udi.include_patch=True and config.data.num_local > 0, or '
                       'local_patch_loss=False.')
    return cls(alpha=udi.alpha, student_temp=udi.student_temp, center_momentum=udi.center_momentum,
               patch_loss_norm=udi.patch_loss_norm, target_mixing=udi.target_mixing,
               local_patch_loss=udi.local_patch_loss)


@dataclasses.dataclass(frozen=True)
class ObjectiveOutput:
  loss: jax.Array                     # global total loss (mean over active levels)
  levels: dict[str, jax.Array]        # global loss per level
  components: dict[str, jax.Array]    # g_cls, l_cls, g_cls_plus, l_cls_plus, g_patch (global values)
  centres: dict[str, jax.Array]       # updated centres (K,) per level
  metrics: dict[str, jax.Array]       # teacher entropy per level, fraction of valid samples
  targets: dict[str, jax.Array]       # the teacher's global-view targets per level (rows of teacher views)


jax.tree_util.register_dataclass(
    ObjectiveOutput, data_fields=['loss', 'levels', 'components', 'centres', 'metrics', 'targets'],
    meta_fields=[])


def init_centres(nets: Networks) -> dict[str, jax.Array]:
  return {level: jnp.zeros((nets.head.out_dim,), jnp.float32) for level in nets.levels}


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  """sum_i m_i x_i / (sum_i m_i + 1e-5) over axis -2: x (..., S, C), mask (..., S) -> (..., C)."""
  total = jnp.einsum('...sc,...s->...c', x, mask, precision=HIGHEST)
  return total / (mask.sum(-1, keepdims=True) + MASKED_MEAN_EPS)


def cross_entropy(target: jax.Array, log_probs: jax.Array) -> jax.Array:
  return -jnp.sum(target * log_probs, axis=-1)


def entropy(probs: jax.Array) -> jax.Array:
  """−Σ p log p over the last axis (a zero probability adds 0)."""
  return -jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-30)), axis=-1)


@dataclasses.dataclass(frozen=True)
class Rows:
  """This device's share of the batch: `batch` images with `n_local` local crops each.

  Global-view rows are view-major: row v*B + b is view v of image b, and `swap` pairs it with view 1 - v.
  Local rows are crop-major: row k*B + b is local crop k of image b. `total` sums over devices.
  """
  batch: int
  n_local: int
  axis_name: Optional[str] = None

  def total(self, x):
    return jax.lax.psum(x, self.axis_name) if self.axis_name else x

  @property
  def num_devices(self):
    return jax.lax.psum(1, self.axis_name) if self.axis_name else 1

  def swap(self, x: jax.Array) -> jax.Array:
    return jnp.concatenate([x[self.batch:], x[:self.batch]])

  def weighted(self, global_term: jax.Array, local_term: Optional[jax.Array]) -> jax.Array:
    """(2 L^g + 2 n_l L^l) / (2 + 2 n_l) (§4.4), or L^g without a local term."""
    if local_term is None:
      return global_term
    return (2 * global_term + 2 * self.n_local * local_term) / (2 + 2 * self.n_local)


def view_major(x: jax.Array) -> jax.Array:
  """(B, V, ...) -> (V*B, ...): row v*B + b is view (or crop) v of image b."""
  return jnp.swapaxes(x, 0, 1).reshape((-1,) + x.shape[2:])


@dataclasses.dataclass(frozen=True)
class TeacherTargets:
  """The teacher's side of a step (no gradient); rows view-major, (2B, ...), before the view swap."""
  cls_logits: jax.Array                       # t_cls (2B, K)
  probs: dict[str, jax.Array]                 # T0 (2B, K), T1 (2B, K), T2 (2B, Sg, K) of the global rows
  plus_local: Optional[jax.Array] = None      # T1[k, v] (2B, n_l, K)
  plus_logits: tuple = ()                     # ℓ⁺ of the global (2B, K) and local (2B, n_l, K) rows ('logit')
  point_u: Optional[jax.Array] = None         # bottleneck vectors at every read-out point (2B, St, Db)
  point_mask: Optional[jax.Array] = None      # m^t (2B, St)
  patch_local: Optional[jax.Array] = None     # T2 at the local crops' points (2B, n_l, Sl, K), if needed
  patch_logits: Optional[jax.Array] = None    # the read-outs' raw logits at the global points (2B, Sg, K)


def teacher_targets(nets: Networks, settings: ObjectiveSettings, teacher: Params, centres: dict[str, jax.Array],
                    global_rows: jax.Array, samples: Optional[Samples], temperature: jax.Array,
                    rows: Rows) -> TeacherTargets:
  """§4.1–4.3: T_j = σ((ℓ_j − c_j)/τ_t) for t_cls (T0), the read-outs R (T2) and the blend ℓ⁺ (T1).

  The backbone runs once on both global views; the read-out takes every point of a view in one call:
  the other view's samples first (Sg), then each local crop's (Sl each). The head embeds the class
  token and the read-outs together, then projects everything that needs logits together.
  """
  sharpen = lambda logits, level: jax.nn.softmax((logits - centres[level]) / temperature, axis=-1)
  out = nets.backbone.apply({'params': teacher['backbone']}, global_rows)
  if PATCH not in nets.levels:
    cls_logits = nets.apply_heads(teacher, {CLS: (CLS, out.cls[:, 0])})[CLS]                # (2B, K)
    return TeacherTargets(cls_logits=cls_logits, probs={CLS: sharpen(cls_logits, CLS)})
  n_global = samples.student_idx.shape[1]
  read = nets.readout.apply({'params': teacher['readout']}, out.patch, samples.teacher_idx, samples.teacher_w)
  embedded = nets.embed_heads(teacher, {CLS: (CLS, out.cls[:, 0]), PATCH: (PATCH, read)})
  u, mask = embedded[PATCH], samples.teacher_mask                                     # (2B, St, Db), (2B, St)
  groups = {'global': (u[:, :n_global], mask[:, :n_global])}
  if rows.n_local:
    groups['local'] = (u[:, n_global:].reshape(2 * rows.batch, rows.n_local, -1, u.shape[-1]),
                       mask[:, n_global:].reshape(2 * rows.batch, rows.n_local, -1))   # (2B, n_l, Sl, ·)
  to_project = {CLS: (CLS, embedded[CLS]), PATCH: (PATCH, groups['global'][0])}
  if rows.n_local and (settings.target_mixing == 'prob' or settings.local_patch_loss):
    to_project['patch_local'] = (PATCH, groups['local'][0])
  blend = CLS_PLUS in nets.levels
  if blend and settings.target_mixing == 'logit':      # W 𝓜(u, m^t) = 𝓜(W u, m^t): W is linear
    to_project.update({f'mean_{g}': (PATCH, masked_mean(*groups[g])) for g in groups})
  logits = nets.project_heads(teacher, to_project)
  cls_logits = logits[CLS]                                                                  # (2B, K)
  probs = {CLS: sharpen(cls_logits, CLS), PATCH: sharpen(logits[PATCH], PATCH)}
  patch_local = sharpen(logits['patch_local'], PATCH) if 'patch_local' in logits else None  # (2B, n_l, Sl, K)
  targets = TeacherTargets(cls_logits=cls_logits, probs=probs, point_u=u, point_mask=mask,
                           patch_local=patch_local, patch_logits=logits[PATCH])
  if not blend:
    return targets
  plus = {}
  for g, (_, group_mask) in groups.items():
    cls = cls_logits if g == 'global' else cls_logits[:, None]
    plus[g] = multimodal_target(settings, sharpen, cls, logits.get(f'mean_{g}'),
                                probs[PATCH] if g == 'global' else patch_local, group_mask)
  probs[CLS_PLUS] = plus['global'][0]
  plus_local = plus['local'][0] if rows.n_local else None
  plus_logits = ((plus['global'][1], plus['local'][1] if rows.n_local else None)
                 if settings.target_mixing == 'logit' else ())
  return dataclasses.replace(targets, probs=probs, plus_local=plus_local, plus_logits=plus_logits)


def multimodal_target(settings: ObjectiveSettings, sharpen: Callable, cls_logits: jax.Array,
                      mean_logits: Optional[jax.Array], patch_probs: Optional[jax.Array],
                      mask: jax.Array) -> tuple[jax.Array, Optional[jax.Array]]:
  """T1 of one group of rows, and its logits ℓ⁺ (None for the mixture); mask m^t (..., S).

  'logit' (§4.3, official): T1 = σ((ℓ⁺ − c₁)/τ_t), ℓ⁺ = α W 𝓜(u, m^t) + (1 − α) t_cls, a product of
  experts (`mean_logits` = W 𝓜(u, m^t)). 'prob' (§9): the mixture α mean_i T2_i + (1 − α) T0 of the
  `patch_probs` (..., S, K); with no valid sample the patch weight goes to T0, so it sums to 1.
  """
  alpha = settings.alpha
  if settings.target_mixing == 'logit':
    logits = alpha * mean_logits + (1.0 - alpha) * cls_logits
    return sharpen(logits, CLS_PLUS), logits
  weight = mask.sum(-1, keepdims=True)
  mean = jnp.einsum('...sk,...s->...k', patch_probs, mask, precision=HIGHEST) / jnp.maximum(weight, 1e-12)
  a = alpha * (weight > 0)
  return a * mean + (1.0 - a) * sharpen(cls_logits, CLS), None


@dataclasses.dataclass(frozen=True)
class StudentOutputs:
  """log σ(s/τ_s) per level: class tokens of the global rows (2B, K) and of the local rows (n_l B, K);
  the read-out at the global rows' own samples (2B, Sg, K) and, with the local patch loss, at the local
  rows' samples (n_l B, Sl, K)."""
  global_rows: dict[str, jax.Array]
  local_rows: dict[str, jax.Array]


def student_outputs(nets: Networks, settings: ObjectiveSettings, student: Params, global_rows: jax.Array,
                    local_rows: Optional[jax.Array], samples: Optional[Samples],
                    drop_path_keys: Optional[jax.Array], rows: Rows) -> StudentOutputs:
  """§4.2 student side: one backbone call per resolution group, heads on every class token, the read-out
  at the student's own samples. Drop path draws from `drop_path_keys` (B,) folded with the crop id."""
  def row_keys(crop_ids):
    if drop_path_keys is None:
      return None
    keys = jax.vmap(lambda k: jax.vmap(lambda c: jax.random.fold_in(k, c))(jnp.asarray(crop_ids)))(
        drop_path_keys)                                                                     # (B, crops)
    return view_major(keys)

  def read_out(patch_tokens, idx):                       # one token per sample: weight 1
    return nets.readout.apply({'params': student['readout']}, patch_tokens, idx[..., None],
                              jnp.ones(idx.shape + (1,)))

  token_levels = [(t, level) for t, level in enumerate(TOKEN_LEVELS) if level in nets.levels]
  on_global = nets.backbone.apply({'params': student['backbone']}, global_rows, drop_path_keys=row_keys([0, 1]))
  inputs = {('global', level): (level, on_global.cls[:, t]) for t, level in token_levels}
  if PATCH in nets.levels:
    inputs[('global', PATCH)] = (PATCH, read_out(on_global.patch, samples.student_idx))
  if rows.n_local:
    on_local = nets.backbone.apply({'params': student['backbone']}, local_rows,
                                   drop_path_keys=row_keys(list(range(2, 2 + rows.n_local))))
    inputs.update({('local', level): (level, on_local.cls[:, t]) for t, level in token_levels})
    if settings.local_patch_loss:
      local_idx = jnp.tile(samples.local_idx, (rows.n_local, 1))                          # (n_l B, Sl)
      inputs[('local', PATCH)] = (PATCH, read_out(on_local.patch, local_idx))
  log_probs = {key: jax.nn.log_softmax(logits / settings.student_temp, axis=-1)
               for key, logits in nets.apply_heads(student, inputs).items()}
  outputs = {level: v for (where, level), v in log_probs.items() if where == 'global'}
  on_local_rows = {level: v for (where, level), v in log_probs.items() if where == 'local'}
  return StudentOutputs(global_rows=outputs, local_rows=on_local_rows)


def level_losses(nets: Networks, settings: ObjectiveSettings, teacher: TeacherTargets,
                 student: StudentOutputs, samples: Optional[Samples],
                 rows: Rows) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
  """§4.2 and §4.4: this device's shares of the terms g_<level>, l_<level> and of each level's loss.

  Shares sum over devices to the global value. Global cls pairs are cross-view only; every local crop
  meets both teacher views. The patch term is Σ m^s H / Σ m^s, the count pooled over devices ('global')
  or per device ('per_device', official).
  """
  b, n_local = rows.batch, rows.n_local
  shares = {}
  for level in (lv for lv in TOKEN_LEVELS if lv in nets.levels):
    s_global = student.global_rows[level]
    shares[f'g_{level}'] = cross_entropy(rows.swap(teacher.probs[level]), s_global).mean() / rows.num_devices
    if n_local:
      s_local = student.local_rows[level].reshape(n_local, b, -1)
      if level == CLS:      # T0[v] is shared by every local crop
        ce = -jnp.einsum('vbk,nbk->vbn', teacher.probs[CLS].reshape(2, b, -1), s_local, precision=HIGHEST)
      else:                 # T1[k, v]: one target per local crop and teacher view
        ce = -jnp.einsum('vbnk,nbk->vbn', teacher.plus_local.reshape(2, b, n_local, -1), s_local,
                         precision=HIGHEST)
      shares[f'l_{level}'] = ce.mean() / rows.num_devices

  def patch_share(ce, mask):
    if settings.patch_loss_norm == 'global':
      return jnp.sum(ce * mask) / jnp.maximum(rows.total(jnp.sum(mask)), 1.0)
    return jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1.0) / rows.num_devices

  if PATCH in nets.levels:
    mask = samples.student_mask
    ce = jnp.where(mask > 0, cross_entropy(rows.swap(teacher.probs[PATCH]), student.global_rows[PATCH]), 0.0)
    shares['g_patch'] = patch_share(ce, mask)
    if PATCH in student.local_rows:
      # The student's local read-out vs the teacher's read-outs of the same points in each global view
      # (valid where the point lies inside that view).
      n_global = samples.student_idx.shape[1]
      s_local = student.local_rows[PATCH].reshape(n_local, b, -1, teacher.patch_local.shape[-1])
      t_local = teacher.patch_local.reshape(2, b, n_local, -1, teacher.patch_local.shape[-1])
      valid = samples.teacher_valid[:, n_global:].reshape(2, b, n_local, -1)
      ce_local = -jnp.einsum('vbnsk,nbsk->vbns', t_local, s_local, precision=HIGHEST)
      shares['l_patch'] = patch_share(jnp.where(valid > 0, ce_local, 0.0), valid)
  level_shares = {level: rows.weighted(shares[f'g_{level}'], shares.get(f'l_{level}')) for level in nets.levels}
  return shares, level_shares


def updated_centres(nets: Networks, settings: ObjectiveSettings, teacher_params: Params,
                    centres: dict[str, jax.Array], teacher: TeacherTargets, rows: Rows) -> dict[str, jax.Array]:
  """§4.4: c_j ← m c_j + (1 − m) μ_j, μ pooled over devices; the targets above used the old centres.

  μ0: mean of t_cls over the global rows; μ1: mean of ℓ⁺ over the global and local rows (the mixture has
  no logits to centre: c1 is carried unchanged); μ2: the m^t-weighted mean of the read-out logits over
  every point, projected once from the weighted mean of the bottleneck vectors.
  """
  momentum = settings.center_momentum
  update = lambda level, total, count: momentum * centres[level] + (1 - momentum) * total / count
  two_b = 2 * rows.batch
  new = {CLS: update(CLS, rows.total(teacher.cls_logits.sum(0)), rows.total(two_b))}
  if CLS_PLUS in nets.levels and teacher.plus_logits:
    plus_global, plus_local = teacher.plus_logits
    total = plus_global.sum(0) + (plus_local.sum((0, 1)) if rows.n_local else 0.0)
    new[CLS_PLUS] = update(CLS_PLUS, rows.total(total), rows.total(two_b * (1 + rows.n_local)))
  elif CLS_PLUS in nets.levels:
    new[CLS_PLUS] = centres[CLS_PLUS]
  if PATCH in nets.levels:
    u_total = rows.total(jnp.einsum('rsc,rs->c', teacher.point_u, teacher.point_mask, precision=HIGHEST))
    weight = rows.total(teacher.point_mask.sum())
    new[PATCH] = jnp.where(
        weight > 0, update(PATCH, nets.project(teacher_params, PATCH, u_total), jnp.maximum(weight, 1e-12)),
        centres[PATCH])
  return new


def spread_over_images(logits: jax.Array, weights: jax.Array, rows: Rows) -> jax.Array:
  """The standard deviation of raw logits (N, K) across the batch's weighted rows (all devices),
  averaged over the prototypes: the per-image signal, near 0 when every image looks the same. NaN when no
  row has weight (no valid patch point in the global batch): the metrics log reads it as not measured."""
  count = rows.total(weights.sum())
  safe = jnp.maximum(count, 1e-12)
  mean = rows.total(jnp.sum(logits * weights[:, None], 0)) / safe
  variance = rows.total(jnp.sum((logits - mean) ** 2 * weights[:, None], 0)) / safe   # two passes: exact
  return jnp.where(count > 0, jnp.sqrt(variance).mean(), jnp.nan)


def prototypes_used(probs: jax.Array, weights: jax.Array, rows: Rows) -> jax.Array:
  """exp(entropy of the batch-mean distribution): K when all prototypes are used evenly, 1 when one is;
  NaN (not measured) when no row has weight."""
  count = rows.total(weights.sum())
  mean = rows.total(jnp.sum(probs * weights[:, None], 0)) / jnp.maximum(count, 1e-12)
  return jnp.where(count > 0, jnp.exp(entropy(mean)), jnp.nan)


def collapse_monitor(nets: Networks, teacher: TeacherTargets) -> dict[str, tuple]:
  """Per level: the teacher's (raw logits or None, probabilities, row weights), rows flattened."""
  ones = lambda x: jnp.ones(x.shape[0], jnp.float32)
  levels = {CLS: (teacher.cls_logits, teacher.probs[CLS], ones(teacher.cls_logits))}
  if CLS_PLUS in nets.levels:
    logits = teacher.plus_logits[0] if teacher.plus_logits else None
    levels[CLS_PLUS] = (logits, teacher.probs[CLS_PLUS], ones(teacher.probs[CLS_PLUS]))
  if PATCH in nets.levels:
    n_global, k = teacher.probs[PATCH].shape[1], teacher.probs[PATCH].shape[-1]
    weights = (teacher.point_mask[:, :n_global] > 0).astype(jnp.float32).reshape(-1)
    levels[PATCH] = (teacher.patch_logits.reshape(-1, k), teacher.probs[PATCH].reshape(-1, k), weights)
  return levels


def health_metrics(nets: Networks, teacher: TeacherTargets, components: dict[str, jax.Array],
                   samples: Optional[Samples], rows: Rows) -> dict[str, jax.Array]:
  """Global means: the teacher's entropy per level (ln K at a collapse to uniform), KL(teacher ||
  student) on the global rows (cross-entropy − entropy), and the fractions of valid samples; the collapse
  monitor per level: the spread of the teacher's raw logits across images and the number of prototypes
  its batch-mean distribution uses."""
  two_b = rows.total(2 * rows.batch)
  metrics = {f'teacher_entropy/{level}': rows.total(entropy(teacher.probs[level]).sum()) / two_b
             for level in TOKEN_LEVELS if level in nets.levels}
  if PATCH in nets.levels:
    mask = samples.student_mask
    valid = rows.total(jnp.sum(mask))
    metrics[f'teacher_entropy/{PATCH}'] = rows.total(
        jnp.sum(entropy(rows.swap(teacher.probs[PATCH])) * mask)) / jnp.maximum(valid, 1.0)
    metrics['valid_fraction/global'] = valid / rows.total(mask.size)
    if rows.n_local:
      n_global = samples.student_idx.shape[1]
      local_valid = (samples.teacher_mask[:, n_global:] > 0).astype(jnp.float32)
      metrics['valid_fraction/local'] = rows.total(local_valid.sum()) / rows.total(local_valid.size)
  for level in nets.levels:
    metrics[f'kl/{level}'] = components[f'g_{level}'] - metrics[f'teacher_entropy/{level}']
  for level, (logits, probs, weights) in collapse_monitor(nets, teacher).items():
    metrics[f'prototypes_used/{level}'] = prototypes_used(probs, weights, rows)
    if logits is not None:
      metrics[f'logit_spread/{level}'] = spread_over_images(logits, weights, rows)
  return metrics


def udi_objective(nets: Networks, settings: ObjectiveSettings, student: Params, teacher: Params,
                  centres: dict[str, jax.Array], global_crops: jax.Array,
                  local_crops: Optional[jax.Array], samples: Optional[Samples], teacher_temp: jax.Array,
                  drop_path_keys: Optional[jax.Array] = None,
                  axis_name: Optional[str] = None) -> tuple[jax.Array, ObjectiveOutput]:
  """One step's objective on this device's share of the batch.

  global_crops (B, 2, Hg, Wg, 3), local_crops (B, n_l, Hl, Wl, 3) or None: normalised float crops.
  samples: the sampling and correspondences (`sampling.draw_samples`, or injected); None without the
  patch branch. drop_path_keys (B,): per-example keys for the student's stochastic depth, or None.
  Returns (this device's share of the loss, the global ObjectiveOutput).
  """
  rows = Rows(batch=global_crops.shape[0], n_local=0 if local_crops is None else local_crops.shape[1],
              axis_name=axis_name)
  teacher = jax.lax.stop_gradient(teacher)
  centres = jax.lax.stop_gradient(centres)
  global_rows = view_major(global_crops)
  local_rows = view_major(local_crops) if rows.n_local else None
  targets = teacher_targets(nets, settings, teacher, centres, global_rows, samples,
                            jnp.asarray(teacher_temp, jnp.float32), rows)
  outputs = student_outputs(nets, settings, student, global_rows, local_rows, samples, drop_path_keys, rows)
  shares, level_shares = level_losses(nets, settings, targets, outputs, samples, rows)
  loss_share = sum(level_shares.values()) / len(level_shares)
  components = {k: rows.total(v) for k, v in shares.items()}
  output = ObjectiveOutput(
      loss=rows.total(loss_share),
      levels={k: rows.total(v) for k, v in level_shares.items()},
      components=components,
      centres=updated_centres(nets, settings, teacher, centres, targets, rows),
      metrics=health_metrics(nets, targets, components, samples, rows),
      targets={level: targets.probs[level] for level in TOKEN_LEVELS if level in targets.probs})
  return loss_share, output

"""The UDI objective: teacher targets, the three level losses, the centre update (UDI_SPEC §4).

Per-device code. With `axis_name` set (inside `shard_map`/`pmap` over the `data` axis) every reduction is
global: the reported losses and the centres are those of the whole batch, pooled with `psum` (UDI_SPEC §8.3
and §8.8), so they do not depend on the number of devices.

Levels (DESIGN contract 5): `cls` (z_cls vs the teacher's cls distribution), `cls_plus` (z_cls+ vs the
multimodal blend of teacher cls and read-out logits), `patch` (student read-outs vs teacher read-outs at
corresponding points). The total loss is the mean over the active levels.

Two exact rewrites of the official computation (UDI_SPEC §8.1, §8.6), tested against the straightforward
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
from typing import Optional

import jax
import jax.numpy as jnp

from udi_jax.method.sampling import Samples
from udi_jax.models.networks import Networks, Params

MASKED_MEAN_EPS = 1e-5   # official: sum(m x) / (sum(m) + 1e-5), also when every row is valid
PATCH_LOSS_NORMS = ('global', 'per_device')
TARGET_MIXING = ('logit', 'prob')


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

  @classmethod
  def from_config(cls, config) -> 'ObjectiveSettings':
    udi = config.udi
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
  total = jnp.einsum('...sc,...s->...c', x, mask, precision=jax.lax.Precision.HIGHEST)
  return total / (mask.sum(-1, keepdims=True) + MASKED_MEAN_EPS)


def cross_entropy(target: jax.Array, log_probs: jax.Array) -> jax.Array:
  return -jnp.sum(target * log_probs, axis=-1)


def entropy(probs: jax.Array) -> jax.Array:
  return -jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-30)), axis=-1)


def udi_objective(nets: Networks, settings: ObjectiveSettings, student: Params, teacher: Params,
                  centres: dict[str, jax.Array], global_crops: jax.Array,
                  local_crops: Optional[jax.Array], samples: Optional[Samples], teacher_temp: jax.Array,
                  drop_path_keys: Optional[jax.Array] = None,
                  axis_name: Optional[str] = None) -> tuple[jax.Array, ObjectiveOutput]:
  """One step's objective on this device's share of the batch.

  global_crops (B, 2, Hg, Wg, 3), local_crops (B, n_l, Hl, Wl, 3) or None: normalised float crops.
  samples: the sampling and correspondences (`sampling.draw_samples`, or injected); None without the
  patch branch. drop_path_keys (B,): per-example keys for the student's stochastic depth, or None.
  """
  levels = nets.levels
  batch = global_crops.shape[0]
  n_local = 0 if local_crops is None else local_crops.shape[1]
  teacher = jax.lax.stop_gradient(teacher)
  centres = {k: jax.lax.stop_gradient(v) for k, v in centres.items()}
  teacher_temp = jnp.asarray(teacher_temp, jnp.float32)
  gsum = (lambda x: jax.lax.psum(x, axis_name)) if axis_name else (lambda x: x)
  num_devices = jax.lax.psum(1, axis_name) if axis_name else 1
  hi = jax.lax.Precision.HIGHEST

  # Rows are view-major: row v*B + b is view v of image b; `swap` pairs it with view 1-v.
  view_major = lambda x: jnp.swapaxes(x, 0, 1).reshape((-1,) + x.shape[2:])
  swap = lambda x: jnp.concatenate([x[batch:], x[:batch]])
  target = lambda logits, level: jax.nn.softmax((logits - centres[level]) / teacher_temp, axis=-1)
  student_log_probs = lambda logits: jax.nn.log_softmax(logits / settings.student_temp, axis=-1)

  # ---- Teacher: backbone once on both global views; read-out at every point (no gradient).
  global_rows = view_major(global_crops)
  t_out = nets.backbone.apply({'params': teacher['backbone']}, global_rows)
  t_cls = nets.project(teacher, 'cls', nets.embed(teacher, 'cls', t_out.cls[:, 0]))       # (2B, K)
  if 'patch' in levels:
    n_global = samples.student_idx.shape[1]
    t_read = nets.readout.apply({'params': teacher['readout']}, t_out.patch, samples.teacher_idx,
                                samples.teacher_w)                                          # (2B, St, D)
    t_u = nets.embed(teacher, 'patch', t_read)                                              # (2B, St, Db)
    t_mask = samples.teacher_mask
    t_patch = nets.project(teacher, 'patch', t_u[:, :n_global])                             # (2B, Sg, K)
  if 'patch' in levels and n_local:
    u_local = t_u[:, n_global:].reshape(2 * batch, n_local, -1, t_u.shape[-1])       # (2B, n_l, Sl, Db)
    m_local = t_mask[:, n_global:].reshape(2 * batch, n_local, -1)
    needs_local_logits = settings.target_mixing == 'prob' or settings.local_patch_loss
    t_patch_local = nets.project(teacher, 'patch', u_local) if needs_local_logits else None
  plus_global = plus_local = None                                    # cls+ targets (probabilities)
  if 'cls_plus' in levels and settings.target_mixing == 'logit':
    # l+ = alpha * W mean_i(u_i) + (1 - alpha) * l_cls, per teacher row; then per (row, local crop).
    blend = lambda u_mean, cls_logits: (settings.alpha * nets.project(teacher, 'patch', u_mean)
                                        + (1.0 - settings.alpha) * cls_logits)
    t_plus_global = blend(masked_mean(t_u[:, :n_global], t_mask[:, :n_global]), t_cls)    # (2B, K)
    plus_global = target(t_plus_global, 'cls_plus')
    if n_local:
      t_plus_local = blend(masked_mean(u_local, m_local), t_cls[:, None])                # (2B, n_l, K)
      plus_local = target(t_plus_local, 'cls_plus')
  elif 'cls_plus' in levels:
    # alpha * mean_i softmax((l_i - c2)/T) + (1 - alpha) * softmax((l_cls - c0)/T); with no valid
    # sample the patch weight goes to the cls part, so the target always sums to 1. c1 is unused.
    def mixture(patch_logits, mask, cls_probs):
      probs = target(patch_logits, 'patch')
      weight = mask.sum(-1, keepdims=True)
      mean = jnp.einsum('...sk,...s->...k', probs, mask, precision=hi) / jnp.maximum(weight, 1e-12)
      a = settings.alpha * (weight > 0)
      return a * mean + (1.0 - a) * cls_probs
    cls_probs = target(t_cls, 'cls')
    plus_global = mixture(t_patch, t_mask[:, :n_global], cls_probs)
    if n_local:
      plus_local = mixture(t_patch_local, m_local, cls_probs[:, None])

  # ---- Student: one backbone call per resolution group; read-out on the global views only.
  def row_keys(crop_ids):
    if drop_path_keys is None:
      return None
    keys = jax.vmap(lambda k: jax.vmap(lambda c: jax.random.fold_in(k, c))(jnp.asarray(crop_ids)))(
        drop_path_keys)                                                                     # (B, crops)
    return view_major(keys)

  s_global = nets.backbone.apply({'params': student['backbone']}, global_rows,
                                 drop_path_keys=row_keys([0, 1]))
  if n_local:
    s_local = nets.backbone.apply({'params': student['backbone']}, view_major(local_crops),
                                  drop_path_keys=row_keys(list(range(2, 2 + n_local))))
  head = lambda level, x: student_log_probs(nets.project(student, level, nets.embed(student, level, x)))

  # ---- Losses as per-device shares: summed over devices they give the global value.
  share = {}
  targets = {'cls': target(t_cls, 'cls')}                                                  # (2B, K)
  if 'cls_plus' in levels:
    targets['cls_plus'] = plus_global
  for token, level in enumerate(('cls', 'cls_plus')):
    if level not in levels:
      continue
    s_lp = head(level, s_global.cls[:, token])
    share[f'g_{level}'] = cross_entropy(swap(targets[level]), s_lp).mean() / num_devices
    if n_local:
      # Every local crop n of image b against both teacher views v.
      s_loc = head(level, s_local.cls[:, token]).reshape(n_local, batch, -1)
      if level == 'cls':
        ce = -jnp.einsum('vbk,nbk->vbn', targets['cls'].reshape(2, batch, -1), s_loc, precision=hi)
      else:
        t_loc = plus_local.reshape(2, batch, n_local, -1)
        ce = -jnp.einsum('vbnk,nbk->vbn', t_loc, s_loc, precision=hi)
      share[f'l_{level}'] = ce.mean() / num_devices

  if 'patch' in levels:
    s_read = nets.readout.apply({'params': student['readout']}, s_global.patch,
                                samples.student_idx[..., None], jnp.ones(samples.student_idx.shape + (1,)))
    s_lp = head('patch', s_read)                                                            # (2B, Sg, K)
    targets['patch'] = swap(target(t_patch, 'patch'))
    s_mask = samples.student_mask
    ce = jnp.where(s_mask > 0, cross_entropy(targets['patch'], s_lp), 0.0)
    patch_share = lambda ce, mask: (jnp.sum(ce * mask) / jnp.maximum(gsum(jnp.sum(mask)), 1.0)
                                    if settings.patch_loss_norm == 'global'
                                    else jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1.0) / num_devices)
    share['g_patch'] = patch_share(ce, s_mask)
    if settings.local_patch_loss and n_local:
      # The student's own local read-out at its local samples vs the teacher's read-outs of the same
      # points in each global view (valid where the point lies inside that view).
      local_idx = jnp.tile(samples.local_idx, (n_local, 1))[..., None]                 # (n_l*B, Sl, 1)
      s_read_local = nets.readout.apply({'params': student['readout']}, s_local.patch, local_idx,
                                        jnp.ones(local_idx.shape))
      s_lp_local = head('patch', s_read_local).reshape(n_local, batch, -1, t_patch_local.shape[-1])
      t_local_probs = target(t_patch_local, 'patch').reshape(2, batch, n_local, -1, t_patch_local.shape[-1])
      valid = samples.teacher_valid[:, n_global:].reshape(2, batch, n_local, -1)
      ce_local = -jnp.einsum('vbnsk,nbsk->vbns', t_local_probs, s_lp_local, precision=hi)
      share['l_patch'] = patch_share(jnp.where(valid > 0, ce_local, 0.0), valid)

  level_share = {}
  for level in ('cls', 'cls_plus'):
    if level in levels:
      g = share[f'g_{level}']
      level_share[level] = (2 * g + 2 * n_local * share[f'l_{level}']) / (2 + 2 * n_local) if n_local else g
  if 'patch' in levels:
    level_share['patch'] = (share['g_patch'] if 'l_patch' not in share else
                            (2 * share['g_patch'] + 2 * n_local * share['l_patch']) / (2 + 2 * n_local))
  loss_share = sum(level_share.values()) / len(level_share)

  # ---- Centres: c <- m c + (1 - m) mean, pooled over devices; targets above used the old centres.
  momentum = settings.center_momentum
  update = lambda level, total, count: momentum * centres[level] + (1 - momentum) * total / count
  new_centres = {'cls': update('cls', gsum(t_cls.sum(0)), gsum(2 * batch))}
  if 'cls_plus' in levels and settings.target_mixing == 'logit':
    total = t_plus_global.sum(0) + (t_plus_local.sum((0, 1)) if n_local else 0.0)
    new_centres['cls_plus'] = update('cls_plus', gsum(total), gsum(2 * batch * (1 + n_local)))
  elif 'cls_plus' in levels:
    new_centres['cls_plus'] = centres['cls_plus']          # unused by probability mixing
  if 'patch' in levels:
    u_total = gsum(jnp.einsum('rsc,rs->c', t_u, t_mask, precision=hi))
    weight = gsum(t_mask.sum())
    new_centres['patch'] = jnp.where(
        weight > 0, update('patch', nets.project(teacher, 'patch', u_total), jnp.maximum(weight, 1e-12)),
        centres['patch'])

  # ---- Health metrics (global means).
  metrics = {f'teacher_entropy/{level}': gsum(entropy(targets[level]).sum()) / gsum(2 * batch)
             for level in ('cls', 'cls_plus') if level in levels}
  if 'patch' in levels:
    valid = gsum(jnp.sum(samples.student_mask))
    metrics['teacher_entropy/patch'] = gsum(jnp.sum(entropy(targets['patch']) * samples.student_mask)) \
        / jnp.maximum(valid, 1.0)
    metrics['valid_fraction/global'] = valid / gsum(samples.student_mask.size)
    if n_local:
      local_valid = (samples.teacher_mask[:, n_global:] > 0).astype(jnp.float32)
      metrics['valid_fraction/local'] = gsum(local_valid.sum()) / gsum(local_valid.size)

  components = {k: gsum(v) for k, v in share.items()}
  for level in levels:   # KL(teacher || student) on the global rows = cross-entropy - teacher entropy
    metrics[f'kl/{level}'] = components[f'g_{level}'] - metrics[f'teacher_entropy/{level}']

  output = ObjectiveOutput(
      loss=gsum(loss_share),
      levels={k: gsum(v) for k, v in level_share.items()},
      components=components,
      centres=new_centres,
      metrics=metrics,
      targets={k: v for k, v in targets.items() if k != 'patch'})
  return loss_share, output

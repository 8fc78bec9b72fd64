"""A straightforward UDI loss written the way the official code computes it, as a test reference.

It consumes the official data layout (dense src/tgt maps, valid rows anywhere, golden README §2) and
follows `main_udi.py` step by step: the teacher backbone runs on the REVERSED global batch, once per map
group (global maps, then the local maps); the read-out is dense-map attention written here with plain
jnp from the params; every read-out point is projected to K logits and the cls+ targets are blended in
logit space. It shares only the backbone and head modules with the library.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from udi_jax.method.sampling import Samples

HI = jax.lax.Precision.HIGHEST


def official_maps(samples: Samples, batch: int, num_local: int, global_grid: int, local_grid: int):
  """Our `Samples` -> the official maps (src_maps/k, tgt_maps/k as in the golden README), unpacked."""
  n_glob = samples.student_idx.shape[1]
  n_tgt = global_grid ** 2
  onehot = np.eye(global_grid ** 2, dtype=np.float32)
  student_idx, student_mask = np.asarray(samples.student_idx), np.asarray(samples.student_mask)
  src = onehot[student_idx] * student_mask[..., None]                                  # (2B, Sg, N)
  idx, w = np.asarray(samples.teacher_idx), np.asarray(samples.teacher_w)
  dense = np.zeros(idx.shape[:2] + (n_tgt,), np.float32)
  np.add.at(dense, (np.arange(idx.shape[0])[:, None, None], np.arange(idx.shape[1])[None, :, None], idx), w)
  view0, view1 = dense[:batch], dense[batch:]
  maps = {'src_maps/0': src[:batch], 'src_maps/1': src[batch:],
          'tgt_maps/0': view1[:, :n_glob], 'tgt_maps/1': view0[:, :n_glob]}
  n_loc = (dense.shape[1] - n_glob) // max(num_local, 1)
  for k in range(num_local):
    part = slice(n_glob + k * n_loc, n_glob + (k + 1) * n_loc)
    maps[f'tgt_maps/{2 + 2 * k}'] = view1[:, part]
    maps[f'tgt_maps/{3 + 2 * k}'] = view0[:, part]
  return maps


def _layer_norm(x, p):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / jnp.sqrt(var + 1e-6) * p['scale'] + p['bias']


def dense_readout(params, patch_tokens, maps, num_heads):
  """Official MaskedAttention: tokens (R, N, D), maps (R, S, N) -> (R, S, D)."""
  x = _layer_norm(patch_tokens, params['norm1'])
  attn = params['attn']
  rows, n, width = x.shape
  dh = width // num_heads
  qkv = (jnp.einsum('rnd,de->rne', x, attn['qkv']['kernel'], precision=HI) + attn['qkv']['bias'])
  q, k, v = [qkv[..., i * width:(i + 1) * width].reshape(rows, n, num_heads, dh) for i in range(3)]
  q = jnp.einsum('rsn,rnhd->rhsd', maps, q, precision=HI)
  logits = jnp.einsum('rhsd,rnhd->rhsn', q, k, precision=HI) * dh ** -0.5
  invalid = (maps.sum(-1) <= 0)[:, None, :, None]
  probs = jax.nn.softmax(jnp.where(invalid, 1e-9, logits), axis=-1)
  out = jnp.einsum('rhsn,rnhd->rshd', probs, v, precision=HI).reshape(rows, -1, width)
  out = jnp.einsum('rsd,de->rse', out, attn['proj']['kernel'], precision=HI) + attn['proj']['bias']
  residual = jnp.einsum('rsn,rnd->rsd', maps, x, precision=HI)
  return _layer_norm(out + residual, attn['norm'])


def reference_loss(nets, student, teacher, centre_table, crops_global, crops_local, maps, teacher_temp,
                   alpha=0.5, student_temp=0.1, center_momentum=0.9):
  """Official UDILoss on one device. crops (B, V, H, W, 3); centre_table (3, K) rows cls, cls+, patch.

  Returns (total, components dict with the official names, new centre table).
  """
  batch, n_local = crops_global.shape[0], crops_local.shape[1]
  two_tokens = nets.backbone.num_cls_tokens == 2
  heads = nets.readout.num_heads
  logits = lambda params, x: nets.head.apply({'params': params['head']}, x)   # full DINOHead
  teacher = jax.lax.stop_gradient(teacher)

  student_global = jnp.concatenate([crops_global[:, 0], crops_global[:, 1]])
  student_local = jnp.concatenate([crops_local[:, k] for k in range(n_local)])
  teacher_batch = jnp.concatenate([crops_global[:, 1], crops_global[:, 0]])        # reversed
  src_global = jnp.concatenate([maps['src_maps/0'], maps['src_maps/1']])
  tgt_global = jnp.concatenate([maps['tgt_maps/0'], maps['tgt_maps/1']])
  tgt_local = jnp.stack([jnp.concatenate([maps[f'tgt_maps/{2 + 2 * k}'], maps[f'tgt_maps/{3 + 2 * k}']])
                         for k in range(n_local)])                                   # (nl, 2B, 9, N)

  # Teacher, pass 1 (global maps) and pass 2 (local maps): the backbone runs twice.
  t1 = nets.backbone.apply({'params': teacher['backbone']}, teacher_batch)
  t_cls = logits(teacher, t1.cls[:, 0])                                              # (2B, K)
  t_patch = logits(teacher, dense_readout(teacher['readout'], t1.patch, tgt_global, heads))
  t2 = nets.backbone.apply({'params': teacher['backbone']}, teacher_batch)
  t_local = jnp.stack([logits(teacher, dense_readout(teacher['readout'], t2.patch, tgt_local[k], heads))
                       for k in range(n_local)])                                     # (nl, 2B, 9, K)
  m_global, m_local = tgt_global.sum(-1), tgt_local.sum(-1)

  s_g = nets.backbone.apply({'params': student['backbone']}, student_global)
  s_l = nets.backbone.apply({'params': student['backbone']}, student_local)
  s_patch = logits(student, dense_readout(student['readout'], s_g.patch, src_global, heads))

  soft = lambda x, c: jax.nn.softmax((x - c) / teacher_temp, axis=-1)
  log_soft = lambda x: jax.nn.log_softmax(x / student_temp, axis=-1)
  ce = lambda t, s: -jnp.sum(t * s, -1)
  tile_local = lambda x: jnp.tile(x.reshape(2, batch, -1).transpose(1, 0, 2), (n_local, 1, 1))

  comps = {}
  comps['g_cl'] = ce(soft(t_cls, centre_table[0]), log_soft(logits(student, s_g.cls[:, 0]))).mean()
  comps['l_cl'] = ce(tile_local(soft(t_cls, centre_table[0])),
                     log_soft(logits(student, s_l.cls[:, 0]))[:, None]).mean()
  mmean = lambda x, m: jnp.einsum('...sk,...s->...k', x, m, precision=HI) / (m.sum(-1)[..., None] + 1e-5)
  plus_global = alpha * mmean(t_patch, m_global) + (1 - alpha) * t_cls               # (2B, K)
  plus_local = alpha * mmean(t_local, m_local) + (1 - alpha) * t_cls[None]           # (nl, 2B, K)
  plus_local = plus_local.reshape(n_local, 2, batch, -1).transpose(0, 2, 1, 3).reshape(
      n_local * batch, 2, -1)
  if two_tokens:
    comps['g_mcl'] = ce(soft(plus_global, centre_table[1]),
                        log_soft(logits(student, s_g.cls[:, 1]))).mean()
    comps['l_mcl'] = ce(soft(plus_local, centre_table[1]),
                        log_soft(logits(student, s_l.cls[:, 1]))[:, None]).mean()
  s_mask = src_global.sum(-1)
  s_lp = jnp.where(s_mask[..., None] > 0, log_soft(s_patch), log_soft(jnp.full_like(s_patch, 1e-9)))
  patch_ce = ce(soft(t_patch, centre_table[2]), s_lp)
  comps['g_pch'] = jnp.sum(jnp.where(s_mask > 0, patch_ce, 0.0) * s_mask) / s_mask.sum()

  level = lambda glob, loc: (2 * glob + 2 * n_local * loc) / (2 + 2 * n_local)
  levels = [level(comps['g_cl'], comps['l_cl']), comps['g_pch']]
  if two_tokens:
    levels.insert(1, level(comps['g_mcl'], comps['l_mcl']))
  total = sum(levels) / len(levels)

  mu_cls = t_cls.mean(0)
  mu_plus = (plus_global.sum(0) + plus_local.sum((0, 1))) / (2 * batch + 2 * n_local * batch)
  patch_sum = (jnp.einsum('rsk,rs->k', t_patch, m_global, precision=HI)
               + jnp.einsum('nrsk,nrs->k', t_local, m_local, precision=HI))
  mu_patch = patch_sum / (m_global.sum() + m_local.sum())
  means = jnp.stack([mu_cls, mu_plus if two_tokens else jnp.zeros_like(mu_cls), mu_patch])
  new_table = center_momentum * centre_table + (1 - center_momentum) * means
  return total, comps, new_table


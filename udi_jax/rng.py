"""Per-example randomness on the device (docs/design.md, contract 2).

Every draw that concerns one example comes from a key folded from (seed, step, global example index) and
a named stream, never from a device or process index, so results do not depend on how the batch is split.
"""

from __future__ import annotations

import jax

# Stream ids: one independent key family per purpose.
STREAMS = {'sampling': 1, 'drop_path': 2, 'photometric': 3, 'geometric': 4}


def example_keys(seed: int | jax.Array, step: jax.Array, index: jax.Array) -> jax.Array:
  """Keys (B,) for the examples with global indices `index` (B,) at training step `step`."""
  step_key = jax.random.fold_in(jax.random.key(seed), step)
  return jax.vmap(jax.random.fold_in, (None, 0))(step_key, index)


def stream(keys: jax.Array, name: str) -> jax.Array:
  """The keys (B,) of one purpose, derived from the example keys (B,)."""
  return jax.vmap(jax.random.fold_in, (0, None))(keys, STREAMS[name])

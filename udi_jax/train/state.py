"""The train state pytree, created from shapes and placed directly on the mesh."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from udi_jax import mesh as meshes
from udi_jax.method.objective import init_centres
from udi_jax.models.networks import Networks


@dataclasses.dataclass(frozen=True)
class TrainState:
  step: jax.Array           # int32 (): the global step, from which every schedule is read
  student: Any              # params
  teacher: Any              # params, EMA of the student
  opt: Any                  # optax state
  centres: dict[str, jax.Array]   # (K,) per level


jax.tree_util.register_dataclass(TrainState, data_fields=['step', 'student', 'teacher', 'opt', 'centres'],
                                 meta_fields=[])


def init_state(nets: Networks, tx: optax.GradientTransformation, rng: jax.Array) -> TrainState:
  student = nets.init(rng)
  return TrainState(step=jnp.zeros((), jnp.int32), student=student,
                    teacher=jax.tree.map(jnp.copy, student),   # the teacher starts as an exact copy
                    opt=tx.init(student), centres=init_centres(nets))


def replicated_tree(mesh: Mesh, tree) -> Any:
  """A sharding for every leaf of `tree`: each replicated on every device."""
  return jax.tree.map(lambda _: meshes.replicated(mesh), tree)


def create_state(nets: Networks, tx: optax.GradientTransformation, rng: jax.Array, mesh: Mesh) -> TrainState:
  """Shapes first, then every array created where it lives (never gathered on one device)."""
  abstract = jax.eval_shape(lambda r: init_state(nets, tx, r), rng)
  return jax.jit(lambda r: init_state(nets, tx, r), out_shardings=replicated_tree(mesh, abstract))(rng)


def abstract_state(nets: Networks, tx: optax.GradientTransformation, mesh: Mesh) -> TrainState:
  """ShapeDtypeStructs with shardings: the target of a checkpoint restore."""
  abstract = jax.eval_shape(lambda r: init_state(nets, tx, r), jax.random.key(0))
  shardings = replicated_tree(mesh, abstract)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)

"""Sums as matrix products and scans instead of reductions.

On XLA:CPU every reduction-like operation in a compiled program (reduce,
reduce-window, scatter, sort) costs each run of the program a little, even
inside a ``lax.cond`` branch that does not run (``python -m
experiments.overhead``, section "untaken branch", measures it per cumulative
sum; README, Performance). CG-ALR's measurement sits in
such a branch of every training step, so the sums it needs are written here
as matrix-vector products, which XLA keeps as products as long as one
operand is a matrix, and as associative scans (slices and adds). Each is
exact where its use needs it: counts of 0/1 values below 2^24, sums with a
single nonzero term, integer prefix sums.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def matvec(m: jax.Array, v: jax.Array) -> jax.Array:
  """``m @ v`` in float32 at full precision (``m`` a matrix or a stack of
  them, ``v`` a vector)."""
  return jnp.dot(m.astype(jnp.float32), v.astype(jnp.float32),
                 precision=jax.lax.Precision.HIGHEST)


def total(v: jax.Array) -> jax.Array:
  """Sum of a vector, as its product with a ``[n, 2]`` matrix of ones (with
  a single column XLA turns the product back into a reduction). Propagates
  NaN and infinities like a sum."""
  if v.ndim != 1:
    raise ValueError(f"total: expected a vector, got shape {v.shape}.")
  return jnp.dot(v.astype(jnp.float32), jnp.ones((v.shape[0], 2), jnp.float32),
                 precision=jax.lax.Precision.HIGHEST)[0]


def cumsum(x: jax.Array, axis: int = 0) -> jax.Array:
  """Inclusive cumulative sum along ``axis`` (``jnp.cumsum`` is a tree of
  reduce-windows on XLA:CPU); exact on integers."""
  return jax.lax.associative_scan(jnp.add, x, axis=axis)

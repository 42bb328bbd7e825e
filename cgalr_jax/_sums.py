"""Sums as matrix products and scans instead of reductions.

On XLA:CPU every reduction-like operation in a compiled program (reduce,
reduce-window, scatter, sort) costs each run of the program a little, even
inside a ``lax.cond`` branch that does not run (``python -m
experiments.overhead``, section "untaken branch", measures it per cumulative
sum; README, Performance). CG-ALR's measurement sits in
such a branch of every training step, so the sums it needs are written here
as matrix-vector products, which XLA keeps as products as long as one
operand is a matrix, and as associative scans (slices and adds); prefix
sums of counts are products with triangular matrices where float32 holds
them exactly (faster than the scan). Each is exact where its use needs it:
counts of 0/1 values below 2^24, sums with a single nonzero term, integer
prefix sums.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


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


# Integer prefix sums through float32 products are exact while every
# partial sum stays below 2^24.
EXACT_COUNT_LIMIT = 1 << 24
_TILE = 128  # count_cumsum's tile: a 64 KB triangular constant


def count_cumsum(x: jax.Array, total_bound: int, axis: int = -1) -> jax.Array:
  """Inclusive cumulative sum of non-negative counts along ``axis``, int32.

  When ``total_bound`` (static: no row's total exceeds it) is
  below 2^24, the sum is a product with a triangular matrix of ones, in
  tiles of 128 on longer axes (zero-padded to whole tiles; one product
  within the tiles, one for their offsets): exact, and on XLA:CPU faster
  than the associative scan at the radix selection's sizes (2^14 counts,
  rows of 64, K slot ids). Otherwise the associative scan.
  """
  x = jnp.asarray(x).astype(jnp.int32)
  axis = axis % x.ndim
  n = x.shape[axis]
  if total_bound >= EXACT_COUNT_LIMIT or n < 2:
    return cumsum(x, axis=axis)
  block = min(n, _TILE)
  tiles = -(-n // block)
  moved = jnp.moveaxis(x, axis, -1).astype(jnp.float32)
  padded = jnp.pad(moved, [(0, 0)] * (x.ndim - 1) + [(0, tiles * block - n)])
  upper = jnp.asarray(np.triu(np.ones((block, block), np.float32)))
  within = jnp.dot(padded.reshape(moved.shape[:-1] + (tiles, block)), upper,
                   precision=jax.lax.Precision.HIGHEST)
  if tiles > 1:
    earlier = jnp.asarray(np.triu(np.ones((tiles, tiles), np.float32), 1))
    within = within + jnp.dot(within[..., -1], earlier,
                              precision=jax.lax.Precision.HIGHEST)[..., None]
  out = within.reshape(padded.shape)[..., :n].astype(jnp.int32)
  return jnp.moveaxis(out, -1, axis)

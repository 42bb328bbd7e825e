"""Sums as matrix products and scans instead of reductions.

Every run of a compiled XLA:CPU program sets up a table of the program's
buffers, and in it each constant and each value of a reduction's, scatter's
or sort's combining function is a small heap object, allocated and freed at
every run even where it sits inside a ``lax.cond`` branch that does not run
(``python -m experiments.overhead``, sections "untaken branch" and
"never-measuring step", measure what that costs; README, Performance).
CG-ALR's measurement sits in such a branch of every training step, so the
sums it needs are written here as matrix-vector products, which XLA keeps
as products as long as one operand is a matrix, and as associative scans
(slices and adds); prefix sums of counts are products with triangular
matrices of ones, built from iotas rather than held as constants, where
float32 holds them exactly (faster than the scan). Each is exact where its
use needs it: counts of 0/1 values below 2^24, sums with a single nonzero
term, integer prefix sums. Sums of floats as products (the statistics'
column sums, the distance) round differently from a reduction, which
nothing that uses them depends on.
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


def column_sums(x: jax.Array) -> jax.Array:
  """Sums over the leading axis of a ``[n, m]`` matrix, as the product of a
  vector of ones with it (``ones @ x``: no transpose is materialised, as
  ``matvec(x.T, ones)`` would be)."""
  return jnp.dot(jnp.ones((x.shape[0],), jnp.float32), x.astype(jnp.float32),
                 precision=jax.lax.Precision.HIGHEST)


def cumsum(x: jax.Array, axis: int = 0) -> jax.Array:
  """Inclusive cumulative sum along ``axis`` (``jnp.cumsum`` is a tree of
  reduce-windows on XLA:CPU); exact on integers."""
  return jax.lax.associative_scan(jnp.add, x, axis=axis)


# Integer prefix sums through float32 products are exact while every
# partial sum stays below 2^24.
EXACT_COUNT_LIMIT = 1 << 24
_TILE = 128  # count_cumsum's tile: a 128 x 128 triangle of ones


def triangle(n: int, strict: bool = False) -> jax.Array:
  """``[n, n]`` float32 upper triangle of ones (above the diagonal only
  where ``strict``), built from iotas rather than held as a constant: each
  array constant of a compiled program is a buffer that every run of it
  sets up, even inside a branch that does not run; an iota comparison is
  computed only where it runs."""
  row = jax.lax.broadcasted_iota(jnp.int32, (n, n), 0)
  col = jax.lax.broadcasted_iota(jnp.int32, (n, n), 1)
  return ((row < col) if strict else (row <= col)).astype(jnp.float32)


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
  within = jnp.dot(padded.reshape(moved.shape[:-1] + (tiles, block)),
                   triangle(block),
                   precision=jax.lax.Precision.HIGHEST)
  if tiles > 1:
    within = within + jnp.dot(within[..., -1], triangle(tiles, strict=True),
                              precision=jax.lax.Precision.HIGHEST)[..., None]
  out = within.reshape(padded.shape)[..., :n].astype(jnp.int32)
  return jnp.moveaxis(out, -1, axis)

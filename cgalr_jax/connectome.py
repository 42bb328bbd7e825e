"""Functional connectome: sufficient statistics -> |Pearson| matrix.

DESIGN.md section 2, "Connectome". Runs under ``jit`` on the device, or in
NumPy (``xp=numpy``) inside the host measurement. The connectome is built
from sufficient statistics (sample count, shifted sums, shifted Gram matrix)
so that chunks of a sample, batches of a pool, or shards on several devices
can be summed before the single division that turns them into
correlations. Reading activations into signals and
accumulating the statistics is :mod:`cgalr_jax.measure`'s job.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# A signal whose standard deviation is below this fraction of its mean
# magnitude is indistinguishable from a constant in float32 (rounding of the
# mean alone leaves a residue of ~1e-7 relative): it is a dead unit.
_DEAD_RELATIVE_STD = 1e-5
# Absolute floor so that an all-zero signal is dead too.
_DEAD_ABSOLUTE_VAR = 1e-30


class SignalStats(NamedTuple):
  """Sufficient statistics of a sample of signals (all float32).

  Attributes:
    n: number of samples, scalar.
    shift: per-signal offset ``[P]`` subtracted before accumulating; any
      value works mathematically, the batch mean keeps float32 accurate.
    total: ``sum_i (a_i - shift)``, shape ``[P]``.
    gram: ``sum_i (a_i - shift)(a_i - shift)^T``, shape ``[P, P]``.
  """

  n: jax.Array
  shift: jax.Array
  total: jax.Array
  gram: jax.Array


def diagonal(x):
  """The diagonal of a square matrix as a strided slice (NumPy or JAX; a
  single fusible operation under XLA, where ``jnp.diagonal`` is a gather)."""
  return x.reshape(-1)[::x.shape[0] + 1]


def live_signals(stats: SignalStats) -> jax.Array:
  """Boolean ``[P]`` mask of signals whose variance is not ~0."""
  mu = stats.total / stats.n
  var = diagonal(stats.gram) / stats.n - mu * mu
  mean = stats.shift + mu
  threshold = (_DEAD_RELATIVE_STD * mean) ** 2 + _DEAD_ABSOLUTE_VAR
  return var > threshold


def correlation_from_stats(stats: SignalStats, xp: Any = jnp) -> jax.Array:
  """``M = |rho|`` clipped to [0, 1], zero diagonal, dead rows/columns 0.

  Each weight ``M[i, j] = M[j, i]`` (``i < j``) is computed once, from the
  Gram entry ``(i, j)``: the matrix is exactly symmetric and its upper
  triangle is :func:`condensed_from_stats`, bit for bit. With ``xp=numpy``
  the arithmetic is the same float32 arithmetic (the reciprocal square root
  may differ in the last bit from XLA's).
  """
  m = _weights(stats, xp)
  p = m.shape[0]
  row = xp.arange(p)[:, None]
  col = xp.arange(p)[None, :]
  lower = _transposed(m) if xp is jnp else m.T
  return xp.where(col > row, m, xp.where(col < row, lower, 0.0))


def condensed_from_stats(stats: SignalStats, xp: Any = jnp) -> jax.Array:
  """The upper triangle of :func:`correlation_from_stats`, row-major
  (``M[i, j]``, ``i < j``), without forming the matrix: what a host
  summary reads. Under ``jit`` the compiler computes the weights straight
  from the Gram entries it gathers (one pass, no transposed reads)."""
  m = _weights(stats, xp)
  return m.reshape(-1)[upper_indices(m.shape[0])]


# Flat indices into a P x P matrix are int32 under JAX (without x64).
MAX_NODES_INDEXED = 46340  # the largest P with P * P < 2^31


def upper_indices(num_nodes: int) -> np.ndarray:
  """int32 flat indices of ``M[i, j]``, ``i < j``, row-major (static).

  Raises:
    ValueError: above :data:`MAX_NODES_INDEXED` nodes, where they would
      overflow int32 (use a node budget, ``max_nodes``).
  """
  p = int(num_nodes)
  if p > MAX_NODES_INDEXED:
    raise ValueError(
        f"a {p}-node connectome is too large to index with int32 (at most "
        f"{MAX_NODES_INDEXED} nodes); set max_nodes.")
  if p < 2:
    return np.zeros((0,), np.int32)
  # Row by row, in int32 from the start (P (P - 1) / 2 entries).
  return np.concatenate([np.arange(i * p + i + 1, (i + 1) * p, dtype=np.int32)
                         for i in range(p)])


def _weights(stats: SignalStats, xp: Any) -> jax.Array:
  """``|rho_ij|`` from Gram entry ``(i, j)``, clipped, non-finite to 0 (the
  two triangles may differ in the last bit)."""
  if xp is jnp:
    stats = _separately(stats)
  mu = stats.total / stats.n
  cov = stats.gram / stats.n - xp.outer(mu, mu)
  live = live_signals(stats)
  var = xp.where(live, diagonal(cov), 1.0)
  inv_std = xp.where(live, _rsqrt(xp.maximum(var, xp.float32(1e-38)), xp), 0.0)
  rho = cov * inv_std[:, None] * inv_std[None, :]
  m = xp.clip(xp.abs(rho), 0.0, 1.0)
  return xp.where(xp.isfinite(m), m, 0.0)


def _separately(stats: SignalStats) -> SignalStats:
  """The statistics, computed apart from what reads them.

  An optimisation barrier keeps the compiler from fusing the Gram product
  with the correlation's elementwise steps. Two reasons:

  * the weights are then the same bits in every program that computes
    them (fused with what surrounds them they can move by one ulp), so the
    host backend's upper triangle and the device backend's matrix,
    computed in different programs, agree bit for bit;
  * XLA:CPU fused and laid the two out together at a cost (README,
    Performance, "The connectome").
  """
  return SignalStats(*jax.lax.optimization_barrier(tuple(stats)))


@jax.custom_jvp
def _transposed(m: jax.Array) -> jax.Array:
  """``m.T`` (a matrix) bit for bit; on a CPU, as its own row-major copy.

  XLA:CPU fuses ``where(upper, m, m.T)`` and the elementwise steps before
  it into one loop that reads half its inputs down columns, slower at large
  P than writing the transpose out first (a plain transposing copy) and
  selecting from two row-major arrays (README, Performance). The copy is carried through a
  loop that runs zero times (once if ``m[0, 0]`` is NaN, and then it
  selects the same values): XLA keeps what a loop carries as a separate
  buffer, so it can neither fuse the copy into the selection nor change
  its layout. Other platforms transpose in tiles inside the fusion
  and take ``m.T``. Differentiable (the derivative of a transpose is a
  transpose).
  """
  def on_cpu(x):
    runs = jnp.isnan(x[0, 0]).astype(jnp.int32)
    _, flat = jax.lax.while_loop(
        lambda c: c[0] < runs,
        lambda c: (c[0] + 1, jnp.where(c[0] < 0, -c[1], c[1])),
        (jnp.int32(0), x.T.reshape(-1)))
    return flat.reshape(x.shape[::-1])

  return jax.lax.platform_dependent(m, cpu=on_cpu, default=lambda x: x.T)


@_transposed.defjvp
def _transposed_jvp(primals, tangents):
  (m,), (dm,) = primals, tangents
  return _transposed(m), dm.T


def _rsqrt(x, xp):
  if xp is jnp:
    return jax.lax.rsqrt(x)
  return (1 / xp.sqrt(x)).astype(x.dtype)

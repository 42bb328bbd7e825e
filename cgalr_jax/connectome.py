"""Functional connectome: sufficient statistics -> |Pearson| matrix.

DESIGN.md section 2, "Connectome". Pure JAX, runs under ``jit`` on the
device. The connectome is built from sufficient statistics (sample count,
shifted sums, shifted Gram matrix) so that chunks of a sample, batches of a
pool, or shards on several devices can be summed before the single division
that turns them into correlations. Reading activations into signals and
accumulating the statistics is :mod:`cgalr_jax.measure`'s job.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

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


def live_signals(stats: SignalStats) -> jax.Array:
  """Boolean ``[P]`` mask of signals whose variance is not ~0."""
  mu = stats.total / stats.n
  var = jnp.diagonal(stats.gram) / stats.n - mu * mu
  mean = stats.shift + mu
  threshold = (_DEAD_RELATIVE_STD * mean) ** 2 + _DEAD_ABSOLUTE_VAR
  return var > threshold


def correlation_from_stats(stats: SignalStats) -> jax.Array:
  """``M = |rho|`` clipped to [0, 1], zero diagonal, dead rows/columns 0.

  The result is exactly symmetric, so a weight read from row i equals the
  one read from row j bit for bit.
  """
  mu = stats.total / stats.n
  cov = stats.gram / stats.n - jnp.outer(mu, mu)
  live = live_signals(stats)
  var = jnp.where(live, jnp.diagonal(cov), 1.0)
  inv_std = jnp.where(live, jax.lax.rsqrt(jnp.maximum(var, 1e-38)), 0.0)
  rho = cov * inv_std[:, None] * inv_std[None, :]
  m = jnp.clip(jnp.abs(rho), 0.0, 1.0)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  m = 0.5 * (m + m.T)
  return m * (1.0 - jnp.eye(m.shape[0], dtype=m.dtype))

"""Functional connectome: |Pearson correlation| between activation signals.

DESIGN.md section 2, "Signals" and "Connectome". Everything here is pure JAX
and runs under ``jit`` on the device. The connectome is built from sufficient
statistics (sample count, shifted sums, shifted Gram matrix) so that chunks of
a batch, or shards of it on several devices, can be summed before the single
division that turns them into correlations.
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
  """Sufficient statistics of a batch of signals (all float32).

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


def _leaf_signals(leaf: jax.Array) -> jax.Array:
  """One leaf -> ``[N, C]``: dense as is, conv channels pooled over space."""
  if leaf.ndim == 0:
    raise ValueError(
        "activations: every leaf needs a leading sample axis; got a scalar.")
  leaf = jnp.asarray(leaf)
  if not (jnp.issubdtype(leaf.dtype, jnp.floating)
          or jnp.issubdtype(leaf.dtype, jnp.integer)
          or leaf.dtype == jnp.bool_):
    raise TypeError(
        f"activations: leaves must be real numbers, got dtype {leaf.dtype}.")
  leaf = leaf.astype(jnp.float32)
  if leaf.ndim == 1:
    return leaf[:, None]
  if leaf.ndim == 2:
    return leaf
  return jnp.mean(leaf, axis=tuple(range(1, leaf.ndim - 1)))


def num_signals(activations: Any) -> int:
  """Number of signals ``P`` the activations pytree holds (static)."""
  total = 0
  for leaf in jax.tree.leaves(activations):
    shape = np.shape(leaf)
    if len(shape) == 0:
      raise ValueError(
          "activations: every leaf needs a leading sample axis; got a scalar.")
    total += 1 if len(shape) == 1 else shape[-1]
  return total


def node_subset(total: int, max_nodes: int | None, seed: int) -> np.ndarray | None:
  """The fixed signal indices kept under a node budget, or None for all.

  Drawn once from ``seed`` with NumPy at trace time, so every step of a run
  (and every replica) keeps the same signals and consecutive connectomes stay
  comparable.
  """
  if max_nodes is None or total <= max_nodes:
    return None
  rng = np.random.default_rng(seed)
  return np.sort(rng.choice(total, size=max_nodes, replace=False))


def signals(activations: Any, *, max_nodes: int | None = None,
            seed: int = 0) -> jax.Array:
  """Concatenate an activations pytree to a float32 ``[N, P]`` signal matrix.

  Leaves of shape ``[N, P]`` contribute P dense signals; leaves of shape
  ``[N, ..., C]`` (channels last) contribute C signals, each the mean over the
  middle axes; leaves of shape ``[N]`` one signal. Leaves are taken in
  ``jax.tree.leaves`` order.

  Args:
    activations: pytree of arrays sharing the leading sample axis.
    max_nodes: optional budget; keeps a fixed subset of that many signals.
    seed: seed of the subset draw.

  Returns:
    float32 array of shape ``[N, P]`` (``P <= max_nodes`` when given).
  """
  leaves = jax.tree.leaves(activations)
  if not leaves:
    raise ValueError("activations: the pytree has no leaves.")
  parts = [_leaf_signals(leaf) for leaf in leaves]
  sizes = {part.shape[0] for part in parts}
  if len(sizes) != 1:
    raise ValueError(
        "activations: all leaves must share the leading sample axis; got "
        f"sample counts {sorted(sizes)}.")
  a = jnp.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
  a = jax.lax.stop_gradient(a)
  keep = node_subset(a.shape[1], max_nodes, seed)
  if keep is not None:
    a = a[:, keep]
  return a


def signal_stats(a: jax.Array, shift: jax.Array | None = None, *,
                 axis_name: Any = None) -> SignalStats:
  """Sufficient statistics of ``[N, P]`` signals.

  Args:
    a: float32 signals.
    shift: optional common per-signal offset. Any value gives the same
      correlations; the default, the batch mean, keeps float32 accurate.
    axis_name: in ``shard_map``/``pmap`` data parallelism, the data axis:
      the statistics are summed across it (one ``psum`` of ``P^2 + P + 1``
      floats) so every replica describes the global batch. Under ``jit``
      with sharded inputs (GSPMD) leave it None: the sums are global already.
  """
  a = a.astype(jnp.float32)
  if shift is None:
    shift = jnp.mean(a, axis=0)
    if axis_name is not None:
      # Every shard must use the same shift for the sums to add up.
      shift = jax.lax.pmean(shift, axis_name)
  centred = a - shift
  n = jnp.asarray(a.shape[0], jnp.float32)
  total = jnp.sum(centred, axis=0)
  gram = jnp.matmul(centred.T, centred, precision=jax.lax.Precision.HIGHEST)
  if axis_name is not None:
    n, total, gram = jax.lax.psum((n, total, gram), axis_name)
  return SignalStats(n=n, shift=shift, total=total, gram=gram)


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


def connectome(activations: Any, *, max_nodes: int | None = None,
               seed: int = 0) -> jax.Array:
  """The functional connectome of a batch of activations.

  Builds signals (DESIGN.md section 2), their sufficient statistics and the
  absolute Pearson correlation matrix. Works under ``jit``.

  Args:
    activations: pytree of ``[N, P]`` dense or ``[N, ..., C]`` conv leaves.
    max_nodes: optional node budget (fixed subset drawn from ``seed``).
    seed: seed of the subset draw.

  Returns:
    float32 ``[P, P]`` matrix in [0, 1] with zero diagonal.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from cgalr_jax import connectome
    >>> acts = jax.random.normal(jax.random.key(0), (64, 8))
    >>> connectome(acts).shape
    (8, 8)
  """
  return correlation_from_stats(signal_stats(
      signals(activations, max_nodes=max_nodes, seed=seed)))

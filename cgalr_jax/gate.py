"""Robust score, hysteresis gate and bounded scale (DESIGN.md section 2).

Pure JAX, fixed shapes: the distance history is a ring buffer of ``window``
log distances with a count of how many slots are filled.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

HOLD = 0
BRAKE = -1
BOOST = 1

# 1.4826 * MAD estimates a standard deviation for Gaussian data.
MAD_TO_STD = 1.4826
# Added to the scaled MAD; z is computed on log distances, so this is a
# floor on the log-scale spread, independent of the distances' units.
Z_EPS = 1e-6
# Distances are clamped here before the log. Connectome weights are float32
# in [0, 1]; below this, two connectomes differ by rounding noise only, and
# "identical" must not read as an outlier against a history of near-zeros.
MIN_DISTANCE = 1e-12


def log_distance(distance: jax.Array) -> jax.Array:
  """``log(max(distance, MIN_DISTANCE))`` in float32."""
  return jnp.log(jnp.maximum(jnp.asarray(distance, jnp.float32), MIN_DISTANCE))


def robust_z(history: jax.Array, count: jax.Array, value: jax.Array) -> jax.Array:
  """Median/MAD score of ``value`` against the filled part of ``history``.

  Args:
    history: ``[window]`` ring buffer of past log distances.
    count: number of filled slots (any value >= window means full).
    value: the current log distance (not in ``history``).

  Returns:
    ``(value - median) / (1.4826 * MAD + eps)``; 0 when the buffer is empty.
  """
  filled = jnp.arange(history.shape[0]) < count
  past = jnp.where(filled, history, jnp.nan)
  med = jnp.nanmedian(past)
  mad = jnp.nanmedian(jnp.abs(past - med))
  z = (value - med) / (MAD_TO_STD * mad + Z_EPS)
  return jnp.where(jnp.any(filled), z, 0.0).astype(jnp.float32)


def push(history: jax.Array, count: jax.Array, value: jax.Array):
  """Write ``value`` into the ring buffer; returns ``(history, count)``.

  Once the buffer is full, ``count`` stays in ``[window, 2 window)`` (it
  wraps by ``window``, never overflows) so that ``count % window`` keeps
  pointing at the oldest slot.
  """
  window = history.shape[0]
  history = history.at[count % window].set(value.astype(history.dtype))
  nxt = count + 1
  nxt = jnp.where(nxt >= 2 * window, nxt - window, nxt)
  return history, nxt.astype(count.dtype)


def next_gate(gate: jax.Array, z: jax.Array, enter_z: float,
              exit_z: float) -> jax.Array:
  """One step of the hysteresis state machine.

  ``z >= enter_z`` -> BRAKE; ``z <= -enter_z`` -> BOOST; in BRAKE,
  ``z <= exit_z`` -> HOLD; in BOOST, ``z >= -exit_z`` -> HOLD; otherwise the
  state stays.
  """
  gate = jnp.asarray(gate, jnp.int32)
  new = jnp.where((gate == BRAKE) & (z <= exit_z), HOLD, gate)
  new = jnp.where((gate == BOOST) & (z >= -exit_z), HOLD, new)
  new = jnp.where(z >= enter_z, BRAKE, new)
  new = jnp.where(z <= -enter_z, BOOST, new)
  return new.astype(jnp.int32)


def next_scale(scale: jax.Array, gate: jax.Array, *, brake: float,
               boost: float, min_scale: float, max_scale: float) -> jax.Array:
  """Multiply by ``brake``/``boost``/1 according to ``gate``, then clip."""
  factor = jnp.where(gate == BRAKE, brake, jnp.where(gate == BOOST, boost, 1.0))
  return jnp.clip(scale * factor, min_scale, max_scale).astype(scale.dtype)

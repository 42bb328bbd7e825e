"""Robust score, hysteresis gate and bounded scale (DESIGN.md section 2).

Pure JAX, fixed shapes: the distance history is a ring buffer of ``window``
log distances with a count of how many slots are filled. The gate's
constants live in one validated :class:`GateConfig`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cgalr_jax import _sums

HOLD = 0
BRAKE = -1
BOOST = 1

SCORES = ("trailing", "detrended")

# 1.4826 * MAD estimates a standard deviation for Gaussian data.
MAD_TO_STD = 1.4826
# Added to the scaled MAD; z is computed on log distances, so this is a
# floor on the log-scale spread, independent of the distances' units.
Z_EPS = 1e-6
# Distances are clamped here before the log. Connectome weights are float32
# in [0, 1]; below this, two connectomes differ by rounding noise only, and
# "identical" must not read as an outlier against a history of near-zeros.
MIN_DISTANCE = 1e-12
# A robust line needs this many past points before the detrended score uses
# it.
MIN_TREND_POINTS = 5


def is_concrete(value: Any) -> bool:
  """True unless ``value`` is a tracer (a value only known at run time)."""
  return not isinstance(value, jax.core.Tracer)


def concrete_float(value: Any) -> float | None:
  """``float(value)`` for a concrete scalar, ``None`` for a tracer."""
  if not is_concrete(value):
    return None
  if isinstance(value, (str, bytes, bool)) or value is None:
    return math.nan
  try:
    return float(value)
  except (TypeError, ValueError):
    return math.nan


def static_int(owner: str, name: str, value: Any) -> int:
  """An int that shapes the state; concrete 0-d arrays are accepted.

  ``optax.inject_hyperparams`` turns every numeric argument into an array.
  Sizes (``window``, ``resolution``...) fix array shapes and must be known
  when the program is traced, so a traced value is refused with the remedy.
  """
  if isinstance(value, bool):
    raise ValueError(f"{owner}: {name} must be an int, got {value!r}.")
  if isinstance(value, int):
    return value
  if not is_concrete(value):
    raise TypeError(
        f"{owner}: {name} sets array shapes and cannot be a traced value. "
        f"Under optax.inject_hyperparams pass static_args=({name!r},) or "
        "leave it at its default.")
  shape = getattr(value, "shape", None)
  dtype = getattr(value, "dtype", None)
  if shape == () and dtype is not None and (
      jnp.issubdtype(dtype, jnp.integer) or (
          jnp.issubdtype(dtype, jnp.floating) and float(value).is_integer())):
    return int(value)
  raise ValueError(f"{owner}: {name} must be an int, got {value!r}.")


@dataclasses.dataclass(frozen=True)
class GateConfig:
  """The gate's constants, validated at construction (DESIGN.md section 2).

  Float fields may be arrays (``optax.inject_hyperparams`` passes them that
  way); they are validated whenever their value is concrete.

  Attributes:
    window: number of past log distances the robust score reads.
    min_history: distances needed before the gate may act (``<= window``).
    enter_z: ``z >= enter_z`` enters BRAKE, ``z <= -enter_z`` enters BOOST.
    exit_z: BRAKE returns to HOLD at ``z <= exit_z``, BOOST at
      ``z >= -exit_z``; ``0 <= exit_z < enter_z``.
    boost: factor per measurement in BOOST, ``> 1``.
    brake: factor per measurement in BRAKE, in ``(0, 1)``.
    min_scale: lower bound of the multiplier, in ``(0, 1]``.
    max_scale: upper bound of the multiplier, ``>= 1``.
    score: ``"detrended"`` scores the departure of log d from the robust
      (Theil-Sen) line through the window, so a steady fall of the distance
      as training settles reads as normal; ``"trailing"`` scores it against
      the window's median, so the fall itself reads as stability.
  """

  # Chosen by the validation study in experiments/README.md ("Gate study"):
  # one setting for every dataset; boost and brake are reciprocal, so the
  # gate is neutral on average in log space.
  window: int = 20
  min_history: int = 5
  enter_z: Any = 1.5
  exit_z: Any = 0.5
  boost: Any = 1.1
  brake: Any = 1 / 1.1
  min_scale: Any = 0.25
  max_scale: Any = 4.0
  score: str = "detrended"

  def __post_init__(self):
    owner = "GateConfig"
    window = static_int(owner, "window", self.window)
    min_history = static_int(owner, "min_history", self.min_history)
    object.__setattr__(self, "window", window)
    object.__setattr__(self, "min_history", min_history)
    _require(window >= 2, "window", "an int >= 2", window)
    _require(1 <= min_history <= window, "min_history",
             f"an int in [1, window={window}]", min_history)
    _require(self.score in SCORES, "score", f"one of {SCORES}", self.score)
    v = {k: concrete_float(getattr(self, k)) for k in
         ("enter_z", "exit_z", "boost", "brake", "min_scale", "max_scale")}
    ok = lambda x, test: x is None or (math.isfinite(x) and test(x))  # noqa: E731
    _require(ok(v["enter_z"], lambda x: x > 0), "enter_z",
             "a finite float > 0", self.enter_z)
    enter = v["enter_z"]
    _require(ok(v["exit_z"], lambda x: x >= 0 and (enter is None or x < enter)),
             "exit_z", f"a float in [0, enter_z={self.enter_z})", self.exit_z)
    _require(ok(v["boost"], lambda x: x > 1), "boost", "a finite float > 1",
             self.boost)
    _require(ok(v["brake"], lambda x: 0 < x < 1), "brake", "a float in (0, 1)",
             self.brake)
    _require(ok(v["min_scale"], lambda x: 0 < x <= 1), "min_scale",
             "a float in (0, 1]", self.min_scale)
    _require(ok(v["max_scale"], lambda x: x >= 1), "max_scale",
             "a finite float >= 1", self.max_scale)


def _require(ok: bool, name: str, allowed: str, value: Any) -> None:
  if not ok:
    raise ValueError(f"GateConfig: {name} must be {allowed}, got {value!r}.")


def log_distance(distance: jax.Array, xp: Any = jnp) -> jax.Array:
  """``log(max(distance, MIN_DISTANCE))`` in float32."""
  return xp.log(xp.maximum(xp.asarray(distance, xp.float32),
                           xp.float32(MIN_DISTANCE)))


def _ages(window: int, count: jax.Array, xp: Any = jnp) -> jax.Array:
  """Age of each ring-buffer slot: 1 for the newest entry, ``window`` oldest."""
  slots = xp.arange(window)
  return (count - 1 - slots) % window + 1


def _nanmedian(x, xp):
  """Median of the non-NaN entries (NaN when there are none).

  On the host, ``np.median`` of the non-NaN values: ``np.nanmedian`` is slow
  on the gate's small arrays and warns on an empty slice.
  """
  if xp is jnp:
    return _nanmedian_by_ranks(x)
  x = np.asarray(x, np.float32).reshape(-1)
  v = x[~np.isnan(x)]
  return np.float32(np.median(v) if v.size else np.nan)


def _nanmedian_by_ranks(x: jax.Array) -> jax.Array:
  """``jnp.nanmedian`` of a small array (flattened) without a sort.

  Each value's stable rank among the non-NaN values comes from pairwise
  comparisons, and the two middle ranks are picked by masks. The window is
  at most a few hundred values, for which this is cheaper than XLA:CPU's
  sort.

  The counts and the picks are matrix-vector products, exact here (sums of
  0/1 below 2^24; one nonzero term per pick), not reductions: the gate runs
  inside the training step's measuring branch (see :mod:`cgalr_jax._sums`).
  """
  x = x.astype(jnp.float32).reshape(-1)
  valid = ~jnp.isnan(x)
  n = x.shape[0]
  below = (x[None, :] < x[:, None]) | (
      (x[None, :] == x[:, None])
      & (jnp.arange(n)[None, :] < jnp.arange(n)[:, None]))
  # Rows: each value's rank among the valid values; the last row counts them.
  counts = _sums.matvec(jnp.concatenate([below, jnp.ones((1, n), bool)]),
                        valid).astype(jnp.int32)
  rank, count = counts[:n], counts[n]
  half = (count - 1).astype(jnp.float32) / 2
  lo, hi = jnp.floor(half).astype(rank.dtype), jnp.ceil(half).astype(
      rank.dtype)
  picks = _sums.matvec(jnp.where(valid & (rank[None, :] == jnp.stack([lo, hi])[
      :, None]), x, 0.0), jnp.ones((n,), jnp.float32))
  w = half - jnp.floor(half)
  median = picks[0] * (1 - w) + picks[1] * w
  return jnp.where(count > 0, median, jnp.nan).astype(jnp.float32)


@functools.lru_cache(maxsize=None)
def _pairs(window: int) -> tuple[np.ndarray, np.ndarray]:
  """Slot indices ``(i, j)``, ``i < j``, of every unordered pair (static;
  cached so the host gate does not rebuild them at every measurement)."""
  return np.triu_indices(window, k=1)


def _pairs_device(window: int) -> tuple[jax.Array, jax.Array]:
  """:func:`_pairs` in the same order, computed from an iota where it is
  used rather than held as constants (each constant is a buffer every run
  of the training step sets up, measuring or not: see cgalr_jax._sums).

  Pair ``e`` lies in row ``i``, the number of rows ``r >= 1`` whose first
  pair, ``r W - r (r + 1) / 2``, is at or before ``e`` (a count, as a
  product), and ``j = e - first(i) + i + 1``.
  """
  first = lambda r: r * window - r * (r + 1) // 2  # noqa: E731
  pair = jax.lax.iota(jnp.int32, window * (window - 1) // 2)
  rows = jnp.arange(1, window, dtype=jnp.int32)
  i = _sums.matvec(first(rows)[None, :] <= pair[:, None],
                   jnp.ones((window - 1,), jnp.float32)).astype(jnp.int32)
  return i, pair - first(i) + i + 1


def robust_z(history: jax.Array, count: jax.Array, value: jax.Array,
             score: str = "trailing", xp: Any = jnp) -> jax.Array:
  """Robust score of ``value`` against the filled part of ``history``.

  Args:
    history: ``[window]`` ring buffer of past log distances.
    count: number of filled slots (any value >= window means full).
    value: the current log distance (not in ``history``).
    score: ``"trailing"``: ``(value - median) / (1.4826 MAD + eps)``.
      ``"detrended"``: the same on residuals from the Theil-Sen line of the
      history against measurement age, evaluated at the current measurement
      (falls back to trailing below ``MIN_TREND_POINTS`` points: through
      three or four points the residuals' MAD is often exactly 0).
    xp: ``jax.numpy`` (traced) or ``numpy`` (the host measurement; the same
      float32 arithmetic).

  Returns:
    float32 score; 0 when the buffer is empty.
  """
  window = history.shape[0]
  filled = xp.arange(window) < count
  past = xp.where(filled, history, xp.float32(xp.nan))
  if score == "detrended":
    x = -_ages(window, count, xp).astype(xp.float32)  # the current value at 0
    # Every unordered pair of slots once (ages are distinct, so dx != 0):
    # a pair's slope does not depend on its order, and half the values make
    # the median's pairwise ranking four times cheaper.
    i, j = _pairs_device(window) if xp is jnp else _pairs(window)
    pair = filled[i] & filled[j]
    slopes = xp.where(pair, (past[i] - past[j]) / xp.where(
        pair, x[i] - x[j], 1.0), xp.float32(xp.nan))
    slope = xp.where(xp.minimum(count, window) >= MIN_TREND_POINTS,
                      _nanmedian(slopes, xp), xp.float32(0.0))
    past = past - slope * x  # residuals up to the intercept; current at x=0
  med = _nanmedian(past, xp)
  mad = _nanmedian(xp.abs(past - med), xp)
  z = (value - med) / (MAD_TO_STD * mad + Z_EPS)
  return xp.where(count > 0, z, 0.0).astype(xp.float32)


def push(history: jax.Array, count: jax.Array, value: jax.Array,
         xp: Any = jnp):
  """Write ``value`` into the ring buffer; returns ``(history, count)``.

  Once the buffer is full, ``count`` stays in ``[window, 2 window)`` (it
  wraps by ``window``, never overflows) so that ``count % window`` keeps
  pointing at the oldest slot.
  """
  window = history.shape[0]
  slot = xp.arange(window) == count % window
  history = xp.where(slot, xp.asarray(value, history.dtype), history)
  nxt = count + 1
  nxt = xp.where(nxt >= 2 * window, nxt - window, nxt)
  return history, nxt.astype(count.dtype)


def next_gate(gate: jax.Array, z: jax.Array, enter_z, exit_z,
              xp: Any = jnp) -> jax.Array:
  """One step of the hysteresis state machine.

  ``z >= enter_z`` -> BRAKE; ``z <= -enter_z`` -> BOOST; in BRAKE,
  ``z <= exit_z`` -> HOLD; in BOOST, ``z >= -exit_z`` -> HOLD; otherwise the
  state stays.
  """
  gate = xp.asarray(gate, xp.int32)
  new = xp.where((gate == BRAKE) & (z <= exit_z), HOLD, gate)
  new = xp.where((gate == BOOST) & (z >= -exit_z), HOLD, new)
  new = xp.where(z >= enter_z, BRAKE, new)
  new = xp.where(z <= -enter_z, BOOST, new)
  return new.astype(xp.int32)


def next_scale(scale: jax.Array, gate: jax.Array, *, brake, boost, min_scale,
               max_scale, xp: Any = jnp) -> jax.Array:
  """Multiply by ``brake``/``boost``/1 according to ``gate``, then clip."""
  factor = xp.where(gate == BRAKE, brake, xp.where(gate == BOOST, boost, 1.0))
  return xp.clip(scale * factor, min_scale, max_scale).astype(scale.dtype)


def step(config: GateConfig, history: jax.Array, count: jax.Array,
         gate: jax.Array, scale: jax.Array, log_d: jax.Array, xp: Any = jnp):
  """Score ``log_d`` and move the gate and scale; returns ``(z, gate, scale)``.

  Until ``min_history`` distances exist, z is 0 and nothing changes.
  """
  ready = count >= config.min_history
  z = xp.where(ready, robust_z(history, count, log_d, config.score, xp), 0.0)
  new_gate = xp.where(ready, next_gate(gate, z, config.enter_z,
                                        config.exit_z, xp), gate)
  new_scale = xp.where(ready, next_scale(
      scale, new_gate, brake=config.brake, boost=config.boost,
      min_scale=config.min_scale, max_scale=config.max_scale, xp=xp), scale)
  return z.astype(xp.float32), new_gate, new_scale

"""The Robbins-Monro envelope (DESIGN.md section 2, "Multiplier and envelope")."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import optax


def robbins_monro(init_value: float, *, t0: float = 100.0,
                  power: float = 0.75) -> optax.Schedule:
  """Step size ``init_value * (1 + t / t0) ** (-power)``.

  With ``1/2 < power <= 1`` the steps satisfy the Robbins-Monro conditions:
  their sum diverges and the sum of their squares converges. Multiplying by
  CG-ALR's scale, which stays in ``[min_scale, max_scale]``, keeps both.

  Args:
    init_value: step size at ``t = 0``, > 0.
    t0: time constant, > 0; the step halves (for power 1) after ``t0`` steps.
    power: decay exponent in ``(0.5, 1]``.

  Returns:
    An ``optax.Schedule``.

  References:
    Robbins & Monro, "A Stochastic Approximation Method", Ann. Math. Statist.
    22(3), 1951.

  Example:
    >>> from cgalr_jax import robbins_monro
    >>> schedule = robbins_monro(0.1, t0=10.0, power=1.0)
    >>> round(float(schedule(10)), 6)
    0.05
  """
  if not (math.isfinite(init_value) and init_value > 0):
    raise ValueError(
        f"robbins_monro: init_value must be a finite float > 0, got "
        f"{init_value}.")
  if not (math.isfinite(t0) and t0 > 0):
    raise ValueError(f"robbins_monro: t0 must be a finite float > 0, got {t0}.")
  if not 0.5 < power <= 1.0:
    raise ValueError(
        f"robbins_monro: power must be in (0.5, 1], got {power}.")

  # t0 outside float32's normal range would round to 0 or inf (and 0 / 0 at
  # t = 0 to NaN); clamped, the schedule stays finite with the same meaning.
  f32 = np.finfo(np.float32)
  t0_f32 = float(np.clip(t0, f32.tiny, f32.max))

  def schedule(count):
    t = jnp.asarray(count, jnp.float32)
    return init_value * (1.0 + t / t0_f32) ** (-power)

  return schedule

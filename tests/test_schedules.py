"""cgalr_jax.robbins_monro against its formula (DESIGN.md 2, envelope)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cgalr_jax import robbins_monro


@pytest.mark.parametrize("init_value, t0, power",
                         [(0.1, 100.0, 0.75), (1.0, 10.0, 1.0),
                          (3e-3, 1.0, 0.51), (0.5, 2500.0, 0.9)])
def test_values_match_formula(init_value, t0, power, maybe_jit):
  schedule = maybe_jit(robbins_monro(init_value, t0=t0, power=power))
  for t in [0, 1, 7, 100, 12345, 10 ** 6]:
    expected = init_value * (1.0 + t / t0) ** (-power)
    assert float(schedule(jnp.int32(t))) == pytest.approx(expected, rel=1e-5)


def test_defaults_and_halving_after_t0():
  default = robbins_monro(0.2)
  assert float(default(100)) == pytest.approx(0.2 * 2.0 ** -0.75, rel=1e-6)
  schedule = robbins_monro(0.2, t0=50.0, power=1.0)
  assert float(schedule(50)) == pytest.approx(0.1, rel=1e-6)
  assert float(schedule(0)) == pytest.approx(0.2, rel=1e-7)


def test_robbins_monro_conditions_hold_numerically():
  # sum eta_t diverges (grows like T^(1-power)), sum eta_t^2 converges.
  schedule = jax.jit(jax.vmap(robbins_monro(1.0, t0=10.0, power=0.75)))
  t = np.arange(2 * 10 ** 6)
  eta = np.asarray(schedule(t), np.float64)
  assert np.all(np.diff(eta) <= 0) and np.all(eta > 0)
  half, full = eta[: 10 ** 6], eta
  # Doubling T multiplies the partial sum by ~2^(1 - power): no limit.
  assert full.sum() / half.sum() == pytest.approx(2 ** 0.25, rel=0.02)
  tail_sq = (full ** 2)[10 ** 6:].sum()
  assert tail_sq < 0.05 * (half ** 2).sum()      # squares have converged


@pytest.mark.parametrize("kwargs, name", [
    (dict(init_value=0.0), "init_value"),
    (dict(init_value=-0.1), "init_value"),
    (dict(init_value=math.nan), "init_value"),
    (dict(t0=0.0), "t0"),
    (dict(t0=-5.0), "t0"),
    (dict(power=0.5), "power"),
    (dict(power=0.3), "power"),
    (dict(power=1.01), "power"),
    (dict(power=0.0), "power"),
])
def test_bad_arguments_raise_naming_the_parameter(kwargs, name):
  args = dict(init_value=0.1) | kwargs
  init_value = args.pop("init_value")
  with pytest.raises(ValueError, match=name):
    robbins_monro(init_value, **args)

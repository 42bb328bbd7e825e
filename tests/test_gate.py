"""cgalr_jax.gate: robust score, hysteresis table, bounded scale (DESIGN.md 2)."""

from __future__ import annotations

import collections
import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cgalr_jax import BOOST, BRAKE, HOLD
from cgalr_jax import gate

HYPOTHESIS = hypothesis.settings(max_examples=60, deadline=None,
                                 derandomize=True)


def reference_z(past_logs, value):
  """Plain NumPy median/MAD score."""
  past = np.asarray(past_logs, np.float64)
  if past.size == 0:
    return 0.0
  med = np.median(past)
  mad = np.median(np.abs(past - med))
  return (value - med) / (1.4826 * mad + 1e-6)


def reference_gate(state, z, enter_z, exit_z):
  """The hysteresis table of DESIGN.md 2, written as plain Python."""
  if z >= enter_z:
    return "BRAKE"
  if z <= -enter_z:
    return "BOOST"
  if state == "BRAKE" and z <= exit_z:
    return "HOLD"
  if state == "BOOST" and z >= -exit_z:
    return "HOLD"
  return state


CODE = {"HOLD": HOLD, "BRAKE": BRAKE, "BOOST": BOOST}


def fill(values, window):
  """History and count after pushing ``values`` one by one."""
  history = jnp.zeros((window,), jnp.float32)
  count = jnp.zeros((), jnp.int32)
  for v in values:
    history, count = gate.push(history, count, jnp.float32(v))
  return history, count


@pytest.mark.parametrize("num_values", [1, 2, 5, 8, 13, 31])
def test_robust_z_matches_numpy_median_mad(num_values, maybe_jit):
  window = 8
  rng = np.random.default_rng(num_values)
  values = rng.normal(size=num_values).astype(np.float32)
  history, count = fill(values, window)
  current = np.float32(0.7)
  z = maybe_jit(gate.robust_z)(history, count, jnp.float32(current))
  past = values[-window:]  # the ring buffer keeps the last `window` values
  assert float(z) == pytest.approx(reference_z(past, current), rel=1e-4,
                                   abs=1e-4)


def test_ring_buffer_keeps_the_last_window_values():
  window = 5
  history, count = fill(range(1, 13), window)
  # Slot order is the ring's; as a multiset it is the last five values.
  assert sorted(np.asarray(history).tolist()) == [8, 9, 10, 11, 12]
  assert window <= int(count) < 2 * window
  buffer = collections.deque(maxlen=window)
  history, count = fill([], window)
  for v in [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0]:
    history, count = gate.push(history, count, jnp.float32(v))
    buffer.append(v)
    z = gate.robust_z(history, count, jnp.float32(2.5))
    assert float(z) == pytest.approx(reference_z(list(buffer), 2.5),
                                     rel=1e-4, abs=1e-4)


def test_z_is_zero_with_empty_history(maybe_jit):
  history = jnp.full((6,), 123.0, jnp.float32)  # stale contents ignored
  z = maybe_jit(gate.robust_z)(history, jnp.int32(0), jnp.float32(50.0))
  assert float(z) == 0.0


@pytest.mark.parametrize("factor", [1e-6, 1e-3, 0.5, 7.0, 1e4])
def test_robust_z_is_invariant_to_rescaling_distances(factor):
  rng = np.random.default_rng(0)
  # Heavy-tailed positive distances, as a TOP stream is.
  distances = np.exp(rng.normal(size=12)) * np.where(rng.random(12) < .2,
                                                    20.0, 1.0)
  current = float(distances.max() * 1.5)

  def z_of(scale):
    history, count = fill([gate.log_distance(scale * d) for d in distances],
                          window=10)
    return float(gate.robust_z(history, count,
                               gate.log_distance(scale * current)))

  assert z_of(1.0) > 1.0  # a spike really scores high
  assert z_of(factor) == pytest.approx(z_of(1.0), rel=1e-4, abs=1e-4)


def test_zero_distance_is_clamped_not_minus_infinity():
  assert np.isfinite(float(gate.log_distance(0.0)))
  history, count = fill([0.1, 0.2, 0.3], 4)
  assert np.isfinite(float(gate.robust_z(history, count,
                                         gate.log_distance(0.0))))


# Scripted z sequences with enter_z=1, exit_z=0.25 and the expected state
# after each step, written out by hand from the table in DESIGN.md 2.
SCRIPTS = {
    "enter-stay-exit-brake": (
        [0.0, 1.0, 0.5, 0.26, 0.25, 0.5],
        ["HOLD", "BRAKE", "BRAKE", "BRAKE", "HOLD", "HOLD"]),
    "enter-stay-exit-boost": (
        [-0.9, -1.0, -0.5, -0.26, -0.25, -0.9],
        ["HOLD", "BOOST", "BOOST", "BOOST", "HOLD", "HOLD"]),
    "exit-far-past-threshold": (
        [2.0, -0.5, -3.0, 0.9],
        ["BRAKE", "HOLD", "BOOST", "HOLD"]),
    "direct-jumps": (
        [1.5, -1.5, 1.2, 0.9, -1.0, 1.0],
        ["BRAKE", "BOOST", "BRAKE", "BRAKE", "BOOST", "BRAKE"]),
    "hold-in-the-dead-band": (
        [0.99, -0.99, 0.3, -0.3],
        ["HOLD", "HOLD", "HOLD", "HOLD"]),
}


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_next_gate_follows_the_hysteresis_table(name, maybe_jit):
  zs, expected = SCRIPTS[name]
  step = maybe_jit(functools.partial(gate.next_gate, enter_z=1.0,
                                     exit_z=0.25))
  state, ref_state = jnp.int32(HOLD), "HOLD"
  for z, want in zip(zs, expected):
    state = step(state, jnp.float32(z))
    ref_state = reference_gate(ref_state, z, 1.0, 0.25)
    assert ref_state == want, (name, z)  # the reference agrees with the script
    assert int(state) == CODE[want], (name, z)
    assert state.dtype == jnp.int32


@jax.jit
def _gate_trace(zs, enter_z, exit_z):
  """Gate states after each z of a fixed-length sequence (compiled once)."""

  def body(state, z):
    new = gate.next_gate(state, z, enter_z, exit_z)
    return new, new

  return jax.lax.scan(body, jnp.int32(HOLD), zs)[1]


@HYPOTHESIS
@hypothesis.given(
    # Free values, plus exact thresholds (the table's boundaries).
    zs=st.lists(st.one_of(st.floats(-3, 3, width=32),
                          st.sampled_from(["+enter", "-enter", "+exit",
                                           "-exit"])),
                min_size=32, max_size=32),
    enter_z=st.floats(0.1, 2.0),
    exit_fraction=st.floats(0.0, 0.99))
def test_next_gate_matches_the_reference_table(zs, enter_z, exit_fraction):
  enter_z = np.float32(enter_z)
  exit_z = np.float32(enter_z * exit_fraction)
  named = {"+enter": enter_z, "-enter": -enter_z, "+exit": exit_z,
           "-exit": -exit_z}
  zs = [np.float32(named.get(z, z)) for z in zs]
  got = np.asarray(_gate_trace(np.asarray(zs, np.float32), enter_z, exit_z))
  state = "HOLD"
  for z, g in zip(zs, got):
    state = reference_gate(state, z, enter_z, exit_z)
    assert g == CODE[state]


@HYPOTHESIS
@hypothesis.given(
    scale=st.floats(0.0, 10.0),
    gates=st.lists(st.sampled_from([HOLD, BRAKE, BOOST]), min_size=1,
                   max_size=200),
    brake=st.floats(0.01, 0.999),
    boost=st.floats(1.001, 5.0),
    min_scale=st.floats(0.01, 1.0),
    max_scale=st.floats(1.0, 8.0))
def test_next_scale_never_leaves_bounds(scale, gates, brake, boost, min_scale,
                                        max_scale):
  lo, hi = np.float32(min_scale), np.float32(max_scale)
  s = jnp.clip(jnp.float32(scale), lo, hi)
  for g in gates:
    prev = float(s)
    s = gate.next_scale(s, jnp.int32(g), brake=brake, boost=boost,
                        min_scale=min_scale, max_scale=max_scale)
    assert s.dtype == jnp.float32
    assert lo <= float(s) <= hi
    factor = {HOLD: 1.0, BRAKE: brake, BOOST: boost}[g]
    assert float(s) == pytest.approx(float(np.clip(prev * factor, lo, hi)),
                                     rel=1e-6)


def test_next_scale_values(maybe_jit):
  step = maybe_jit(functools.partial(gate.next_scale, brake=0.5, boost=2.0,
                                     min_scale=0.25, max_scale=3.0))
  assert float(step(jnp.float32(1.0), jnp.int32(BRAKE))) == 0.5
  assert float(step(jnp.float32(1.0), jnp.int32(BOOST))) == 2.0
  assert float(step(jnp.float32(1.0), jnp.int32(HOLD))) == 1.0
  assert float(step(jnp.float32(0.4), jnp.int32(BRAKE))) == 0.25  # clipped
  assert float(step(jnp.float32(2.0), jnp.int32(BOOST))) == 3.0   # clipped


# ----------------------------------------------------------------------------
# Detrended score and GateConfig.


def theil_sen_z(past_oldest_first, value):
  """Brute-force reference: residuals from the median pairwise slope."""
  past = np.asarray(past_oldest_first, np.float64)
  x = np.arange(-len(past), 0, dtype=np.float64)
  slope = np.median([(past[i] - past[j]) / (x[i] - x[j])
                     for i in range(len(past)) for j in range(i)])
  resid = past - slope * x
  med = np.median(resid)
  return (value - med) / (1.4826 * np.median(np.abs(resid - med)) + 1e-6)


@pytest.mark.parametrize("pushes", [5, 7, 12])
def test_detrended_z_matches_a_brute_force_theil_sen_reference(pushes):
  rng = np.random.default_rng(pushes)
  # A falling trend with noise, pushed through a window-5 ring buffer so the
  # buffer wraps.
  values = -0.3 * np.arange(pushes) + 0.1 * rng.normal(size=pushes)
  history, count = jnp.zeros(5, jnp.float32), jnp.int32(0)
  for v in values:
    history, count = gate.push(history, count, jnp.float32(v))
  current = -0.3 * pushes + 0.5
  got = float(gate.robust_z(history, count, jnp.float32(current),
                            "detrended"))
  want = theil_sen_z(values[-5:], current)
  assert got == pytest.approx(want, rel=1e-3, abs=1e-3)


def test_detrended_score_reads_a_steady_fall_as_normal():
  history, count = jnp.zeros(10, jnp.float32), jnp.int32(0)
  for t in range(10):
    history, count = gate.push(history, count, jnp.float32(-0.5 * t))
  on_trend = jnp.float32(-5.0)  # the next point of the line
  trailing = float(gate.robust_z(history, count, on_trend, "trailing"))
  detrended = float(gate.robust_z(history, count, on_trend, "detrended"))
  assert trailing < -1.0  # the fall itself reads as "more stable"
  assert abs(detrended) < 1e-2


def test_gate_config_validates_and_accepts_arrays():
  gate.GateConfig()
  gate.GateConfig(enter_z=jnp.float32(2.0), boost=np.float64(1.1))
  for bad in (dict(window=1), dict(min_history=0), dict(min_history=21),
              dict(enter_z=0.0), dict(exit_z=2.0), dict(boost=1.0),
              dict(brake=1.0), dict(min_scale=0.0), dict(max_scale=0.5),
              dict(score="mean"), dict(enter_z=jnp.float32(-1.0))):
    name = next(iter(bad))
    with pytest.raises(ValueError, match=rf"GateConfig: {name} must"):
      gate.GateConfig(**bad)
  # Traced values cannot be checked and pass through (inject_hyperparams).
  jax.jit(lambda e: gate.GateConfig(enter_z=e).enter_z * 2)(jnp.float32(1.0))
  with pytest.raises(TypeError, match="static_args"):
    jax.jit(lambda w: gate.GateConfig(window=w))(jnp.int32(4))


@pytest.mark.parametrize("shape", [(1,), (7,), (20,), (6, 6), (20, 20)])
def test_sort_free_median_equals_nanmedian(shape):
  # The traced gate picks the middle ranks by pairwise comparisons (no sort
  # operation); the host gate sorts in NumPy. Both must be the median
  # jnp.nanmedian and np.nanmedian compute, ties and NaNs included.
  rng = np.random.default_rng(sum(shape))
  for trial in range(20):
    x = rng.normal(size=shape).astype(np.float32)
    if trial % 2:
      x = np.round(x, 1)  # ties
    x[rng.random(shape) < 0.3 * (trial % 4)] = np.nan
    want = float(jnp.nanmedian(jnp.asarray(x)))
    traced = float(jax.jit(gate._nanmedian_by_ranks)(jnp.asarray(x)))  # pylint: disable=protected-access
    host = float(gate._nanmedian(x, np))  # pylint: disable=protected-access
    if np.isnan(want):
      assert np.isnan(traced) and np.isnan(host)
    else:
      assert traced == want
      assert host == pytest.approx(float(np.nanmedian(x)), rel=1e-6)


def test_device_pairs_match_numpy_triu_indices():
  # The gate's pair indices on the device come from an iota; the host's
  # from numpy.triu_indices, in the same order.
  for window in [1, 2, 3, 5, 20, 64, 101]:
    i, j = jax.jit(gate._pairs_device, static_argnums=0)(window)
    want_i, want_j = np.triu_indices(window, k=1)
    np.testing.assert_array_equal(np.asarray(i), want_i, err_msg=window)
    np.testing.assert_array_equal(np.asarray(j), want_j, err_msg=window)

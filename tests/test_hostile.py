"""Hostile input: every case ends in a clear error or a counted skip.

Expected behaviour (README, "Robustness"): misuse raises ``ValueError`` or
``TypeError`` at construction or trace time; a measurement that cannot be
taken is skipped with the scale unchanged; updates and parameters never hold
a NaN and training never crashes.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st

import cgalr_jax
from cgalr_jax import topology

PARAMS = {"w": jnp.ones((3,))}
GRADS = {"w": jnp.full((3,), 0.5)}
F32_MAX = float(np.finfo(np.float32).max)


def _primed(backend="device", **kwargs):
  """An optimizer state whose scale has moved away from 1 (so a change shows)."""
  opt = cgalr_jax.scale_by_connectome(every=1, backend=backend, window=4, min_history=2,
                                      **kwargs)
  update = jax.jit(opt.update)
  state = opt.init(PARAMS)
  for t in range(8):
    acts = jax.random.normal(jax.random.key(t), (16, 6)) * (1 + 3 * (t % 2))
    acts = acts.at[:, :3].multiply(1 + t)
    _, state = update(GRADS, state, PARAMS, activations=acts)
  return opt, update, state


def _assert_skipped(state_before, update, activations):
  updates, state = update(GRADS, state_before, PARAMS, activations=activations)
  assert int(state.skipped) == int(state_before.skipped) + 1
  assert int(state.measured) == int(state_before.measured)
  assert float(state.scale) == float(state_before.scale)
  np.testing.assert_array_equal(state.reference, state_before.reference)
  np.testing.assert_array_equal(state.history, state_before.history)
  assert np.all(np.isfinite(np.asarray(updates["w"])))
  np.testing.assert_allclose(updates["w"], 0.5 * float(state.scale), rtol=1e-6)
  return state


@pytest.fixture(scope="module")
def primed():
  return _primed()


def _normal(n=16, p=6, seed=0):
  return jax.random.normal(jax.random.key(100 + seed), (n, p))


@pytest.mark.parametrize("case", [
    "nan", "inf", "neg_inf", "near_f32_max", "identical_samples",
    "all_zero"])
def test_bad_values_are_skipped(primed, case):
  _, update, state = primed
  acts = _normal()
  if case == "nan":
    acts = acts.at[3, 2].set(jnp.nan)
  elif case == "inf":
    acts = acts.at[0, 0].set(jnp.inf)
  elif case == "neg_inf":
    acts = acts.at[5, 1].set(-jnp.inf)
  elif case == "near_f32_max":
    acts = jnp.sign(acts) * 0.9 * F32_MAX
  elif case == "identical_samples":
    acts = jnp.broadcast_to(acts[:1], acts.shape)
  elif case == "all_zero":
    acts = jnp.zeros_like(acts)
  _assert_skipped(state, update, acts)


def test_one_sample_is_skipped(primed):
  _, update, state = primed
  _assert_skipped(state, update, _normal(n=1))


def test_one_signal_is_skipped():
  _, update, state = _primed()
  # A new node count would re-reference; P = 1 never gets that far.
  _assert_skipped(state, update, _normal(p=1))


@pytest.mark.parametrize("backend", ["device", "host"])
def test_two_samples_are_skipped_and_two_signals_measured(backend):
  opt = cgalr_jax.scale_by_connectome(every=1, backend=backend)
  update = jax.jit(opt.update)
  state = opt.init(PARAMS)
  for t, shape in enumerate([(2, 6), (2, 6), (16, 2), (16, 2), (3, 2)]):
    acts = _normal(*shape, seed=t)
    updates, state = update(GRADS, state, PARAMS, activations=acts)
    assert np.all(np.isfinite(np.asarray(updates["w"])))
  # Two samples make every |rho| exactly 1 (rounding, not a measurement):
  # both (2,6) steps are skipped; (16,2) is the reference, then two measured
  # (16,2)/(3,2) steps.
  assert int(state.measured) == 3 and int(state.skipped) == 2
  assert float(state.scale) == 1.0
  assert int(state.reference_nodes) == 2
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state)
             if jnp.issubdtype(x.dtype, jnp.floating))


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.int8, jnp.bfloat16,
                                   jnp.float16, jnp.bool_])
def test_integer_and_low_precision_activations_are_measured(dtype):
  opt = cgalr_jax.scale_by_connectome(every=1, backend="device")
  update = jax.jit(opt.update)
  state = opt.init(PARAMS)
  for t in range(3):
    acts = _normal(32, 5, seed=t) * 4
    acts = (acts > 0) if dtype == jnp.bool_ else acts.astype(dtype)
    _, state = update(GRADS, state, PARAMS, activations=acts)
  assert int(state.measured) == 3 and int(state.skipped) == 0
  assert 0.0 < float(state.distance) < math.inf


def test_complex_activations_are_a_type_error():
  opt = cgalr_jax.scale_by_connectome(every=1)
  with pytest.raises(TypeError, match="real numbers"):
    opt.update(PARAMS, opt.init(PARAMS),
               activations=jnp.ones((4, 3), jnp.complex64))


def test_mismatched_sample_axes_are_a_trace_time_error():
  opt = cgalr_jax.scale_by_connectome(every=1)
  with pytest.raises(ValueError, match="share the sample axis"):
    jax.jit(opt.update)(PARAMS, opt.init(PARAMS), PARAMS,
                        activations=[jnp.ones((4, 3)), jnp.ones((5, 3))])


def test_changing_signal_count_re_references_and_counts_a_skip():
  opt = cgalr_jax.scale_by_connectome(every=1, backend="device")
  update = jax.jit(opt.update)
  state = opt.init(PARAMS)
  _, state = update(GRADS, state, PARAMS, activations=_normal(16, 6))
  _, state = update(GRADS, state, PARAMS, activations=_normal(16, 6, seed=1))
  assert int(state.history_count) == 1
  _, state = update(GRADS, state, PARAMS, activations=_normal(16, 9))
  assert int(state.skipped) == 1 and int(state.reference_nodes) == 9
  assert int(state.history_count) == 1  # no distance across node counts
  _, state = update(GRADS, state, PARAMS, activations=_normal(16, 9, seed=2))
  assert int(state.history_count) == 2 and int(state.skipped) == 1


@pytest.mark.parametrize("failure", ["raise", "nan", "wrong_shape"])
def test_failing_host_step_is_skipped(monkeypatch, failure):
  _, update, state = _primed(backend="host")

  def broken(m, resolution):
    if failure == "raise":
      raise RuntimeError("persistence failed")
    if failure == "nan":
      return np.full((2, resolution), np.nan, np.float32)
    return np.zeros((3,), np.float32)

  monkeypatch.setattr(topology, "top_summary_host", broken)
  _assert_skipped(state, update, _normal(seed=9))


def test_failing_wd_host_step_is_skipped(monkeypatch):
  _, update, state = _primed(backend="auto", distance="wd", resolution=32)
  assert int(state.measured) == 8

  def broken(*args, **kwargs):
    raise RuntimeError("ripser failed")

  monkeypatch.setattr(topology, "persistence_diagrams", broken)
  _assert_skipped(state, update, _normal(seed=9))


def test_training_through_garbage_never_reaches_parameters():
  """A loop where two of every three batches carry NaN or Inf activations."""
  opt = cgalr_jax.cgalr(0.05, every=1, backend="device", window=4, min_history=2)
  params = {"w": jax.random.normal(jax.random.key(0), (8, 5))}
  state = opt.init(params)

  @jax.jit
  def step(params, state, x, poison):
    def loss(p):
      h = jnp.tanh(x @ p["w"])
      return jnp.mean(h ** 2), h

    (_, h), g = jax.value_and_grad(loss, has_aux=True)(params)
    h = jnp.where(poison == 1, h.at[0, 0].set(jnp.nan),
                  jnp.where(poison == 2, h * jnp.inf, h))
    updates, state = opt.update(g, state, params, activations=h)
    return optax.apply_updates(params, updates), state

  for t in range(30):
    x = jax.random.normal(jax.random.key(t), (16, 8))
    params, state = step(params, state, x, t % 3)
    assert np.all(np.isfinite(np.asarray(params["w"])))
  assert int(state[1].skipped) == 20 and int(state[1].measured) == 10


# ---------------------------------------------------------------------------
# Constructor arguments at, just inside and just outside their ranges.

# name -> (valid values at/inside the range, invalid values just outside)
BOUNDARIES = {
    "window": ([2, 3], [1, 0, 2.0]),
    "min_history": ([1, 20], [0, 21]),
    # enter_z must exceed exit_z (0.25 here), exit_z stay below enter_z (1).
    "enter_z": ([0.25 + 1e-6, 5.0], [0.25, 0.0, -1e-6, math.inf, math.nan]),
    "exit_z": ([0.0, 0.999], [-1e-9, 1.0, 1.5]),
    "boost": ([1.0 + 1e-6, 2.0], [1.0, 0.99, math.inf]),
    "brake": ([1e-6, 1.0 - 1e-6], [0.0, 1.0, -0.5]),
    "min_scale": ([1e-6, 1.0], [0.0, 1.0 + 1e-6, -1.0]),
    "max_scale": ([1.0, 1e6], [1.0 - 1e-6, math.inf, math.nan]),
    "every": ([1, 1000], [0, -1, 1.5]),
    "max_nodes": ([None, 2, 4096], [1, 0, 2.5]),
    "resolution": ([1, 4096], [0, -3, 1.0]),
    "seed": ([0, 2**31], [1.5, "0"]),
    "backend": (["auto", "device", "host"], ["gpu", ""]),
    "distance": (["top", "wd"], ["TOP", "wasserstein"]),
}


# Arguments whose range depends on another one get a compatible partner.
PARTNERS = {"window": {"min_history": 1}, "enter_z": {"exit_z": 0.25},
            "exit_z": {"enter_z": 1.0}}


@pytest.mark.parametrize("name", sorted(BOUNDARIES))
def test_constructor_boundaries(name):
  good, bad = BOUNDARIES[name]
  partner = PARTNERS.get(name, {})
  for value in good:
    cgalr_jax.scale_by_connectome(**{name: value}, **partner)
  for value in bad:
    with pytest.raises(ValueError, match=name):
      cgalr_jax.scale_by_connectome(**{name: value}, **partner)


def test_wd_refuses_the_device_backend():
  with pytest.raises(ValueError, match="backend"):
    cgalr_jax.scale_by_connectome("wd", backend="device")


def reals(lo, hi, *boundaries):
  """Floats in [lo, hi], plus non-finite values and the exact boundaries."""
  return st.one_of(st.floats(lo, hi), st.sampled_from(
      [math.nan, math.inf, -math.inf, *boundaries]))


@settings(max_examples=80, deadline=None)
@given(enter=reals(-10, 10, 0.0), exit_=reals(-10, 10, 0.0),
       brake=reals(-2, 2, 0.0, 1.0), boost=reals(0, 3, 1.0),
       low=reals(-1, 2, 0.0, 1.0), high=reals(0, 10, 1.0))
def test_constructor_accepts_exactly_the_documented_ranges(
    enter, exit_, brake, boost, low, high):
  finite = all(math.isfinite(v) for v in (enter, exit_, brake, boost, low,
                                           high))
  allowed = (finite and enter > 0 and 0 <= exit_ < enter and 0 < brake < 1
             and boost > 1 and 0 < low <= 1 and high >= 1)
  kwargs = dict(enter_z=enter, exit_z=exit_, brake=brake, boost=boost,
                min_scale=low, max_scale=high)
  if allowed:
    cgalr_jax.scale_by_connectome(**kwargs)
  else:
    with pytest.raises(ValueError, match="scale_by_connectome"):
      cgalr_jax.scale_by_connectome(**kwargs)


@settings(max_examples=40, deadline=None)
@given(power=reals(0, 2, 0.5, 1.0), t0=reals(-1, 1e3, 0.0),
       init=reals(-1, 1, 0.0))
def test_robbins_monro_accepts_exactly_the_documented_ranges(power, t0, init):
  if (0.5 < power <= 1 and 0 < t0 < math.inf and 0 < init < math.inf):
    schedule = cgalr_jax.robbins_monro(init, t0=t0, power=power)
    assert float(schedule(0)) == pytest.approx(init, rel=1e-6)
  else:
    with pytest.raises(ValueError, match="robbins_monro"):
      cgalr_jax.robbins_monro(init, t0=t0, power=power)

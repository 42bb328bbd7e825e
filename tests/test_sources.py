"""Where the signals come from (DESIGN.md section 2): probe, pool, batch, lag,
noise floor and cadence, each against the NumPy reference of
tests/test_transform.py (exact TOP with P = 5 nodes and K = 12 points).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cgalr_jax import cgalr, diagnostics, scale_by_connectome
from cgalr_jax.measure import node_subset
from test_transform import (CONFIG, GRADS, N, P, activation_stream,
                            reference_connectome, reference_run,
                            reference_top)

ACTS = activation_stream(7, 12)
REF = reference_run(ACTS)
ZERO = np.zeros_like(ACTS[0])


def probe_params(a):
  """Params whose leaf ``a`` is the probe's output: the probe reads it."""
  return {"a": jnp.asarray(a), "w": jnp.ones(3)}


PROBE_GRADS = {"a": jnp.asarray(ZERO), "w": GRADS["w"]}


def read_a(params):
  return params["a"]


def test_probe_runs_only_on_measuring_updates():
  executed = []

  def probe(params):
    jax.debug.callback(lambda: executed.append(1))
    return params["a"]

  opt = scale_by_connectome(probe=probe, **dict(CONFIG, every=3))
  step = jax.jit(opt.update)
  state = opt.init(probe_params(ACTS[0]))
  for t in range(9):
    _, state = step(PROBE_GRADS, state, probe_params(ACTS[t]))
  jax.effects_barrier()
  assert len(executed) == 3  # updates 2, 5 and 8 only
  assert int(state.measured) == 3
  ref = reference_run(ACTS[[2, 5, 8]])
  assert float(state.distance) == pytest.approx(ref[-1]["distance"], rel=1e-4)


def test_probe_acts_on_its_own_update_and_batch_one_later():
  probe_opt = scale_by_connectome(probe=read_a, **CONFIG)
  batch_opt = scale_by_connectome(**CONFIG)
  probe_step, batch_step = jax.jit(probe_opt.update), jax.jit(batch_opt.update)
  ps, bs = probe_opt.init(probe_params(ACTS[0])), batch_opt.init({})
  for t in range(len(ACTS)):
    pu, ps = probe_step(PROBE_GRADS, ps, probe_params(ACTS[t]))
    bu, bs = batch_step(GRADS, bs, None, activations=ACTS[t])
    # The probe reads only params: its measurement at t may scale update t.
    np.testing.assert_allclose(np.asarray(pu["w"]),
                               REF[t]["scale"] * GRADS["w"], rtol=1e-5)
    # A batch measured at t acts from t + 1 (Lag).
    before = 1.0 if t == 0 else REF[t - 1]["scale"]
    np.testing.assert_allclose(np.asarray(bu["w"]), before * GRADS["w"],
                               rtol=1e-5)
    assert float(ps.scale) == pytest.approx(REF[t]["scale"], rel=1e-5)
    assert float(bs.scale) == pytest.approx(REF[t]["scale"], rel=1e-5)
  assert {r["scale"] for r in REF} != {1.0}  # the scale did move


def test_probe_refuses_activations_and_missing_params():
  opt = scale_by_connectome(probe=read_a, **CONFIG)
  state = opt.init(probe_params(ACTS[0]))
  with pytest.raises(TypeError, match="probe"):
    opt.update(PROBE_GRADS, state, probe_params(ACTS[0]), activations=ACTS[0])
  with pytest.raises(TypeError, match="needs params"):
    opt.update(PROBE_GRADS, state)
  with pytest.raises(ValueError, match="pool must"):
    scale_by_connectome(probe=read_a, pool=True, max_nodes=4)


@pytest.mark.parametrize("budget", [None, 4])
def test_pool_measures_the_concatenated_batches(budget):
  wide = np.concatenate([ACTS, activation_stream(9, 12, p=3)], axis=2)
  max_nodes = wide.shape[2] if budget is None else budget
  opt = scale_by_connectome(pool=True, max_nodes=max_nodes, seed=5,
                            **dict(CONFIG, every=3))
  step = jax.jit(opt.update)
  state = opt.init({})
  applied = []
  for t in range(12):
    updates, state = step(GRADS, state, None, activations=wide[t])
    applied.append(float(updates["w"][0] / GRADS["w"][0]))
    if t == 1:  # two batches pooled, none measured: the NumPy reference
      idx = node_subset(wide.shape[2], max_nodes, 5)
      idx = np.arange(wide.shape[2]) if idx is None else idx
      pooled = np.concatenate(wide[:2])[:, idx]
      got = np.asarray(jax.jit(lambda p: _pool_connectome(p))(state.pool))
      np.testing.assert_allclose(got, reference_connectome(pooled), atol=5e-6)
  idx = node_subset(wide.shape[2], max_nodes, 5)
  sel = wide if idx is None else wide[:, :, idx]
  pooled = np.stack([np.concatenate(sel[k:k + 3]) for k in (0, 3, 6, 9)])
  ref = reference_run(pooled, cfg=dict(CONFIG, min_history=1))
  assert int(state.measured) == 4
  assert float(jnp.sum(state.pool.n)) == 0.0  # cleared after measuring
  d = [reference_top(reference_connectome(pooled[k]),
                     reference_connectome(pooled[k + 1])) for k in range(3)]
  if budget == 4:  # P = 4: K = 12 is a multiple of 3 and 3, TOP_K is exact
    assert float(state.distance) == pytest.approx(d[-1], rel=1e-4)
  else:
    assert float(state.distance) > 0
  del ref
  # A measurement at update t acts from t + 1: the scale only moves after
  # the measuring updates 2, 5, 8, 11.
  changes = [t for t in range(1, 12) if applied[t] != applied[t - 1]]
  assert set(changes) <= {3, 6, 9}


def _pool_connectome(pool):
  from cgalr_jax import measure  # pylint: disable=import-outside-toplevel
  from cgalr_jax.connectome import correlation_from_stats  # pylint: disable=import-outside-toplevel
  return correlation_from_stats(measure.merge_parts(pool))


def test_pool_needs_a_node_budget_and_enough_signals():
  with pytest.raises(ValueError, match="max_nodes must"):
    scale_by_connectome(pool=True)
  opt = scale_by_connectome(pool=True, max_nodes=P + 1, **CONFIG)
  with pytest.raises(ValueError, match="max_nodes"):
    opt.update(GRADS, opt.init({}), None, activations=ACTS[0])


def test_noise_floor_and_half_series_match_numpy():
  opt = scale_by_connectome(noise=True, **CONFIG)
  step = jax.jit(opt.update)
  state = opt.init({})
  for t in range(4):
    _, state = step(GRADS, state, None, activations=ACTS[t])
    d = diagnostics(state)
    even, odd = ACTS[t][0::2], ACTS[t][1::2]
    assert float(d["noise"]) == pytest.approx(reference_top(
        reference_connectome(even), reference_connectome(odd)), rel=1e-4)
    if t:
      assert float(d["even_distance"]) == pytest.approx(reference_top(
          reference_connectome(ACTS[t - 1][0::2]),
          reference_connectome(even)), rel=1e-4)
      assert float(d["odd_distance"]) == pytest.approx(reference_top(
          reference_connectome(ACTS[t - 1][1::2]),
          reference_connectome(odd)), rel=1e-4)
    # The whole sample drives the gate as without noise=True.
    assert float(d["distance"]) == pytest.approx(REF_NOISE[t]["distance"],
                                                 rel=1e-4, abs=1e-9)


REF_NOISE = reference_run(ACTS[:4])


def test_cadence_counts_updates_and_skips_a_source_not_ready():
  opt = scale_by_connectome(**dict(CONFIG, every=2))
  step = jax.jit(opt.update)
  state = opt.init({})
  with pytest.warns(UserWarning, match="nothing to measure"):
    for t in range(6):
      acts = ACTS[t] if t % 2 == 0 else None  # only on non-measuring updates
      _, state = step(GRADS, state, None, activations=acts) if acts is not None \
          else opt.update(GRADS, state, None)
  assert int(state.measured) == 0 and int(state.skipped) == 3
  assert int(state.count) == 6


@pytest.mark.parametrize("config", [
    dict(), dict(noise=True), dict(pool=True, max_nodes=P),
    dict(probe=read_a)], ids=["batch", "noise", "pool", "probe"])
def test_fresh_state_can_be_donated(config):
  opt = scale_by_connectome(**dict(CONFIG, **config))
  params = probe_params(ACTS[0])
  state = opt.init(params)
  pointers = [x.unsafe_buffer_pointer() for x in jax.tree.leaves(state)]
  assert len(set(pointers)) == len(pointers)  # no two fields share a buffer
  acts = None if "probe" in config else ACTS[0]

  def step(state, params):
    return opt.update(PROBE_GRADS, state, params, activations=acts)

  donated = jax.jit(step, donate_argnums=0)
  for _ in range(2):
    _, state = donated(state, params)
  assert int(state.count) == 2


def test_unknown_update_arguments_raise_or_warn_once():
  opt = scale_by_connectome(**CONFIG)
  state = opt.init({})
  with pytest.raises(TypeError, match="did you mean 'activations'"):
    opt.update(GRADS, state, None, activation=ACTS[0])
  with pytest.raises(TypeError, match="did you mean 'activations'"):
    opt.update(GRADS, state, None, activatons=ACTS[0])
  with pytest.warns(UserWarning, match="ignores the extra argument 'foo'"):
    opt.update(GRADS, state, None, activations=ACTS[0], foo=1)
  import warnings  # pylint: disable=import-outside-toplevel
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    opt.update(GRADS, state, None, activations=ACTS[0], foo=1)  # once only
    # Extra arguments of other transformations in a chain pass silently.
    opt.update(GRADS, state, None, activations=ACTS[0], value=1.0)


def test_restoring_into_another_configuration_names_the_field():
  import flax.serialization  # pylint: disable=import-outside-toplevel
  saved = flax.serialization.to_bytes(
      scale_by_connectome(**CONFIG).init({}))
  cases = {"window": dict(CONFIG, window=6),
           "resolution": dict(CONFIG, resolution=8),
           "noise": dict(CONFIG, noise=True)}
  for field, config in cases.items():
    opt = scale_by_connectome(**config)
    # Flax restores the saved arrays whatever their shape: the update says.
    restored = flax.serialization.from_bytes(opt.init({}), saved)
    with pytest.raises(ValueError, match=field):
      opt.update(GRADS, restored, None, activations=ACTS[0])
  pool = scale_by_connectome(pool=True, max_nodes=P, **CONFIG)
  with pytest.raises(ValueError, match="pool source"):
    pool.update(GRADS, scale_by_connectome(**CONFIG).init({}), None,
                activations=ACTS[0])


def test_layout_channels_first_measures_like_channels_last():
  rng = np.random.default_rng(3)
  nchw = rng.normal(size=(4, N, P, 3, 2)).astype(np.float32)
  nchw += np.arange(P, dtype=np.float32)[None, None, :, None, None] * \
      rng.normal(size=(4, N, 1, 1, 1)).astype(np.float32)
  nhwc = np.moveaxis(nchw, 2, -1)
  first = scale_by_connectome(layout="channels_first", **CONFIG)
  last = scale_by_connectome(**CONFIG)
  s1, s2 = first.init({}), last.init({})
  for t in range(4):
    _, s1 = first.update(GRADS, s1, None, activations=nchw[t])
    _, s2 = last.update(GRADS, s2, None, activations=nhwc[t])
  assert int(s1.reference_nodes) == P
  np.testing.assert_allclose(float(s1.distance), float(s2.distance),
                             rtol=1e-5)


# ----------------------------------------------------------------------------
# cgalr as an Optax optimizer.


def test_cgalr_takes_optax_sgd_positional_arguments():
  params = {"w": jnp.ones(3)}
  cg = cgalr(0.1, 0.9, True, jnp.bfloat16, min_scale=1.0, max_scale=1.0,
             probe=lambda p: jnp.outer(jnp.arange(8.0), p["w"]))
  sgd = optax.sgd(0.1, 0.9, True, jnp.bfloat16)
  cs, ss = cg.init(params), sgd.init(params)
  assert jax.tree.leaves(cs)[0].dtype == jnp.bfloat16
  for t in range(3):
    g = {"w": jnp.full(3, t + 1.0)}
    cu, cs = cg.update(g, cs, params)
    su, ss = sgd.update(g, ss, params)
    np.testing.assert_allclose(np.asarray(cu["w"]), np.asarray(su["w"]),
                               rtol=1e-6)


def test_cgalr_under_inject_hyperparams_equals_plain_cgalr():
  gate = dict(enter_z=0.8, exit_z=0.2, boost=1.3, brake=0.7, min_scale=0.4,
              max_scale=2.0)
  sizes = dict(window=4, min_history=2, resolution=12, every=1)
  plain = cgalr(0.1, 0.5, probe=read_a, score="trailing", **gate, **sizes)
  # Callables and sizes are static; every and the gate's floats are injected.
  injected = optax.inject_hyperparams(cgalr, static_args=(
      "probe", "window", "min_history", "resolution"))(
          learning_rate=0.1, momentum=0.5, probe=read_a, score="trailing",
          **gate, **sizes)
  ps, js = plain.init(probe_params(ACTS[0])), injected.init(
      probe_params(ACTS[0]))
  assert set(gate) | {"every", "momentum"} <= set(js.hyperparams)
  pstep, jstep = jax.jit(plain.update), jax.jit(injected.update)
  for t in range(8):
    pu, ps = pstep(PROBE_GRADS, ps, probe_params(ACTS[t]))
    ju, js = jstep(PROBE_GRADS, js, probe_params(ACTS[t]))
    np.testing.assert_allclose(np.asarray(ju["w"]), np.asarray(pu["w"]),
                               rtol=1e-6)
  assert float(diagnostics(ps)["scale"]) != 1.0
  # An injected setting takes effect: pin the scale at 1.
  js.hyperparams["min_scale"] = jnp.asarray(1.0)
  js.hyperparams["max_scale"] = jnp.asarray(1.0)
  _, js = jstep(PROBE_GRADS, js, probe_params(ACTS[8]))
  assert float(diagnostics(js)["scale"]) == 1.0


def test_inject_hyperparams_with_a_traced_size_says_what_to_do():
  injected = optax.inject_hyperparams(cgalr, static_args=("probe",))(
      learning_rate=0.1, probe=read_a, window=8)
  state = injected.init(probe_params(ACTS[0]))  # concrete: accepted
  with pytest.raises(TypeError, match="static_args"):
    jax.jit(injected.update)(PROBE_GRADS, state, probe_params(ACTS[0]))
  fixed = optax.inject_hyperparams(cgalr, static_args=("probe", "window"))(
      learning_rate=0.1, probe=read_a, window=8)
  jax.jit(fixed.update)(PROBE_GRADS, fixed.init(probe_params(ACTS[0])),
                        probe_params(ACTS[0]))


def test_multisteps_keeps_one_measurement_per_real_update():
  # optax.MultiSteps runs the inner update on every mini-step and keeps its
  # state only on the last one: the kept measurement is the real update's,
  # `every` counts real updates, and a due update pays a probe pass per
  # mini-step (README, Optax integration).
  executed = []

  def probe(params):
    jax.debug.callback(lambda: executed.append(1))
    return params["a"]

  inner = cgalr(0.1, probe=probe, **dict(CONFIG, every=1))
  opt = optax.MultiSteps(inner, every_k_schedule=4)
  state = opt.init(probe_params(ACTS[0]))
  step = jax.jit(opt.update)
  for t in range(8):
    _, state = step(PROBE_GRADS, state, probe_params(ACTS[t // 4]))
  jax.effects_barrier()
  d = diagnostics(state)
  assert int(d["measured"]) == 2 and int(d["skipped"]) == 0
  assert float(d["distance"]) == pytest.approx(REF[1]["distance"], rel=1e-4)
  assert len(executed) == 8

"""cgalr_jax.transform: the Optax transformation end to end (DESIGN.md 2-3).

The central reference is ``reference_run``: a plain NumPy/SciPy simulation of
the whole method (|corrcoef| connectome, exact TOP from scipy's spanning tree,
median/MAD z on log distances, the hysteresis table, the clipped scale). With
P = 5 nodes and K = 12 summary points (a multiple of both set sizes, 4 and 6)
the K-point summary distance is the exact TOP distance, so every field of the
state can be checked step by step. The reference scores the log distances
either against the window's median (``trailing``) or against a Theil-Sen
line through them, computed here by brute force over all pairs
(``detrended``).
"""

from __future__ import annotations

import collections
import inspect
import math
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.sparse.csgraph import minimum_spanning_tree

import cgalr_jax
from cgalr_jax import (BOOST, BRAKE, HOLD, ScaleByConnectomeState, cgalr,
                       diagnostics, scale_by_connectome, wd_distance)
from cgalr_jax import topology, transform
from cgalr_jax.measure import node_subset
from experiments.overhead import REDUCTION_OPS, per_run_buffers

N, P, K = 16, 5, 12
CONFIG = dict(window=4, min_history=2, enter_z=0.8, exit_z=0.2, boost=1.3,
              brake=0.7, min_scale=0.4, max_scale=2.0, resolution=K,
              score="trailing", every=1)
PARAMS = {"w": jnp.array([1.0, -2.0, 0.5], jnp.float32)}
GRADS = {"w": jnp.array([0.3, 0.1, -0.2], jnp.float32)}

# ----------------------------------------------------------------------------
# Reference simulation.


def reference_connectome(a):
  m = np.abs(np.corrcoef(np.asarray(a, np.float64), rowvar=False))
  m = 0.5 * (m + m.T)  # corrcoef can differ in the last bit across the diagonal
  np.fill_diagonal(m, 0.0)
  return m


def reference_top(m1, m2):
  """Exact TOP: scipy MST of -M for births, the other edges for deaths."""
  def sets(m):
    births = np.sort(-minimum_spanning_tree(-m).data)
    edges = collections.Counter(m[np.triu_indices(m.shape[0], 1)].tolist())
    edges.subtract(collections.Counter(births.tolist()))
    return births, np.sort(np.array(list(edges.elements())))
  (b1, d1), (b2, d2) = sets(m1), sets(m2)
  return float(np.sum((b1 - b2) ** 2) + np.sum((d1 - d2) ** 2))


def reference_score(logs, value, score):
  """Robust z of ``value`` against past log distances ``logs`` (oldest first)."""
  past = np.array(logs, np.float64)
  if score == "detrended" and len(past) >= 5:
    x = np.arange(-len(past), 0, dtype=np.float64)  # the current one at 0
    slopes = [(past[i] - past[j]) / (x[i] - x[j])
              for i in range(len(past)) for j in range(i)]
    past = past - np.median(slopes) * x
  med = np.median(past)
  return (value - med) / (1.4826 * np.median(np.abs(past - med)) + 1e-6)


def reference_run(acts, cfg=CONFIG):
  """Per-step (distance, z, gate, scale) of CG-ALR, in float64 NumPy."""
  scale, gate, logs, prev, z, dist = 1.0, HOLD, [], None, 0.0, 0.0
  trace = []
  for a in acts:
    m = reference_connectome(a)
    if prev is not None:
      dist = reference_top(prev, m)
      log_d = math.log(max(dist, 1e-30))
      if len(logs) >= cfg["min_history"]:
        z = reference_score(logs[-cfg["window"]:], log_d, cfg["score"])
        if z >= cfg["enter_z"]:
          gate = BRAKE
        elif z <= -cfg["enter_z"]:
          gate = BOOST
        elif gate == BRAKE and z <= cfg["exit_z"]:
          gate = HOLD
        elif gate == BOOST and z >= -cfg["exit_z"]:
          gate = HOLD
        factor = {HOLD: 1.0, BRAKE: cfg["brake"], BOOST: cfg["boost"]}[gate]
        scale = min(max(scale * factor, cfg["min_scale"]), cfg["max_scale"])
      logs.append(log_d)
    prev = m
    trace.append(dict(distance=dist, z=z, gate=gate, scale=scale))
  return trace


def activation_stream(seed, steps, n=N, p=P):
  """Signals sharing a latent factor whose coupling varies step to step."""
  rng = np.random.default_rng(seed)
  latent = rng.normal(size=(steps, n, 1))
  coupling = rng.normal(size=(steps, 1, p)) * np.exp(
      rng.normal(size=(steps, 1, 1)))
  return (latent * coupling + rng.normal(size=(steps, n, p))).astype(
      np.float32)


def trace_of(states):
  return [{k: float(v) for k, v in diagnostics(s).items()} for s in states]


def assert_matches_reference(trace, ref):
  assert len(trace) == len(ref)
  for t, (got, want) in enumerate(zip(trace, ref)):
    assert got["distance"] == pytest.approx(want["distance"], rel=1e-4), t
    assert got["z"] == pytest.approx(want["z"], rel=1e-3, abs=1e-3), t
    assert int(got["gate"]) == want["gate"], t
    assert got["scale"] == pytest.approx(want["scale"], rel=1e-5), t


def assert_same_layout(a, b):
  """Same tree structure, shapes and dtypes."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert jnp.shape(x) == jnp.shape(y) and jnp.result_type(x) == (
        jnp.result_type(y))


# Shared transformations and compiled steps (compiled once per module).
OPT = {b: scale_by_connectome(backend=b, **CONFIG) for b in ("device", "host")}
STEP = {b: jax.jit(OPT[b].update) for b in OPT}
ACTS = activation_stream(4, 24)
REF = reference_run(ACTS)
WD_K = 32
OPT_WD = scale_by_connectome(
    "wd", **{k: v for k, v in CONFIG.items() if k != "resolution"},
    resolution=WD_K)
STEP_WD = jax.jit(OPT_WD.update)
ACTS_WD = activation_stream(3, 5, p=10)  # 10 nodes: H1 is not empty
CGALR = cgalr(0.1, momentum=0.5, backend="device", **CONFIG)
STEP_CGALR = jax.jit(CGALR.update)


def run(update, acts, state=None, opt=OPT["device"]):
  state = opt.init(PARAMS) if state is None else state
  states = []
  for a in acts:
    _, state = update(GRADS, state, PARAMS, activations=a)
    states.append(state)
  return states


def applied_scale(t, ref=REF):
  """The scale update t used: the one decided before it (Lag)."""
  return 1.0 if t == 0 else ref[t - 1]["scale"]


def test_reference_stream_exercises_the_gate():
  gates = {t["gate"] for t in REF}
  scales = [t["scale"] for t in REF]
  assert {BRAKE, BOOST} <= gates
  assert min(scales) < 1.0 < max(scales)
  # No z sits so near a threshold that float32 rounding could flip the gate.
  for t in REF[3:]:
    for edge in (0.8, 0.2, -0.2, -0.8):
      assert abs(t["z"] - edge) > 1e-2


@pytest.mark.parametrize("backend", ["device", "host"])
def test_trajectory_matches_reference_simulation(backend):
  states = run(STEP[backend], ACTS, opt=OPT[backend])
  assert_matches_reference(trace_of(states), REF)
  assert int(states[-1].measured) == len(ACTS)
  assert int(states[-1].skipped) == 0
  assert int(states[-1].count) == len(ACTS)


def test_host_and_device_backends_give_the_same_trajectory():
  # The summaries are bit-identical (test_topology); the host sums the
  # distance and the robust score in NumPy's order, XLA in its own, so those
  # agree to float32 rounding and every decision is the same.
  acts = activation_stream(1, 24)
  host = trace_of(run(STEP["host"], acts, opt=OPT["host"]))
  device = trace_of(run(STEP["device"], acts, opt=OPT["device"]))
  exact = ("gate", "scale", "measured", "skipped")
  assert [{k: t[k] for k in exact} for t in host] == [
      {k: t[k] for k in exact} for t in device]
  for key in ("distance", "z"):
    np.testing.assert_allclose([t[key] for t in host],
                               [t[key] for t in device], rtol=1e-5, atol=1e-6)
  assert {t["gate"] for t in host} >= {BRAKE, BOOST}


@pytest.mark.parametrize("use_jit", [False, True], ids=["eager", "jit"])
def test_inside_optax_chain(use_jit):
  opt = optax.chain(optax.trace(decay=0.5),
                    scale_by_connectome(backend="host", **CONFIG),
                    optax.sgd(0.1))
  update = jax.jit(opt.update) if use_jit else opt.update
  state = opt.init(PARAMS)
  params = PARAMS
  momentum = np.zeros(3)
  # Eager lax.cond retraces its branches on every call: keep that short.
  steps = 2 if not use_jit else len(ACTS)
  for t in range(steps):
    grads = {"w": GRADS["w"] * (t + 1)}
    updates, state = update(grads, state, params, activations=ACTS[t])
    momentum = np.asarray(grads["w"]) + 0.5 * momentum
    # Lag: a batch measurement taken at update t acts from update t + 1.
    expected = -0.1 * applied_scale(t) * momentum
    np.testing.assert_allclose(np.asarray(updates["w"]), expected, rtol=1e-5)
    params = optax.apply_updates(params, updates)
    assert diagnostics(state)["scale"] == pytest.approx(REF[t]["scale"],
                                                        rel=1e-5)


def test_under_lax_scan_equals_python_loop():
  opt = OPT["device"]

  def body(state, a):
    _, state = opt.update(GRADS, state, PARAMS, activations=a)
    return state, diagnostics(state)

  final, diag = jax.jit(lambda s, xs: jax.lax.scan(body, s, xs))(
      opt.init(PARAMS), ACTS)
  loop = run(STEP["device"], ACTS)
  jax.tree.map(np.testing.assert_array_equal, final, loop[-1])
  scanned = [{k: float(v[t]) for k, v in diag.items()}
             for t in range(len(ACTS))]
  assert_matches_reference(scanned, REF)


@pytest.mark.parametrize("backend", ["device", "host"])
def test_vmap_over_independent_states(backend):
  opt = OPT[backend]
  batch = np.stack([ACTS[:10], activation_stream(1, 10),
                    activation_stream(2, 10)])       # [B, T, N, P]
  states = jax.vmap(opt.init)(jax.tree.map(lambda x: jnp.stack([x] * 3),
                                           PARAMS))
  step = jax.jit(jax.vmap(
      lambda s, a: opt.update(GRADS, s, PARAMS, activations=a)))
  per_step = []
  before = states.scale
  for t in range(batch.shape[1]):
    updates, states = step(states, batch[:, t])
    per_step.append(states)
    np.testing.assert_allclose(np.asarray(updates["w"]),
                               np.asarray(before)[:, None] * GRADS["w"],
                               rtol=1e-6)
    before = states.scale
  assert states.scale.shape == (3,)
  for b in range(3):
    ref = reference_run(batch[b])
    assert_matches_reference(
        trace_of([jax.tree.map(lambda x, b=b: x[b], s) for s in per_step]),
        ref)


def test_state_layout_never_changes():
  opt = OPT["device"]
  init = opt.init(PARAMS)
  assert isinstance(init, ScaleByConnectomeState)
  assert init.count.dtype == jnp.int32 and init.scale.dtype == jnp.float32
  assert init.reference.shape == (1, 2, K) and init.history.shape == (4,)
  assert init.pool is None
  state = init
  for acts in [ACTS[0], None, ACTS[1], np.full((N, P), np.nan, np.float32),
               ACTS[2][:, :4], ACTS[3], ACTS[4]]:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # the None step warns: tested elsewhere
      _, state = STEP["device"](GRADS, state, PARAMS, activations=acts)
    assert_same_layout(state, init)
  wd_init = OPT_WD.init(PARAMS)
  assert wd_init.reference.shape == (1, 2, WD_K, 2)
  wd_state = run(STEP_WD, ACTS_WD[:2], opt=OPT_WD)[-1]
  assert_same_layout(wd_state, wd_init)


FIELDS = ("count", "gate", "history_count", "reference_nodes", "measured",
          "skipped", "scale", "z", "distance", "noise", "even_distance", "odd_distance",
          "history", "reference")


def fields_except(state, *names):
  return {k: np.asarray(getattr(state, k)) for k in FIELDS if k not in names}


def assert_only_changed(before, after, *names):
  b, a = fields_except(before, *names), fields_except(after, *names)
  for k in b:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_activations_none_measures_nothing():
  warm = run(STEP["device"], ACTS[:8])[-1]
  assert float(warm.scale) != 1.0  # the scale has moved: "unchanged" means it
  with pytest.warns(UserWarning, match="nothing to measure"):
    updates, state = scale_by_connectome(backend="device", **CONFIG).update(
        GRADS, warm, PARAMS)
  # A measuring step without activations is a counted skip (Cadence).
  assert_only_changed(warm, state, "count", "skipped")
  assert int(state.skipped) == int(warm.skipped) + 1
  assert int(state.count) == int(warm.count) + 1
  np.testing.assert_allclose(np.asarray(updates["w"]),
                             float(warm.scale) * GRADS["w"], rtol=1e-6)
  opt = scale_by_connectome(backend="device", **dict(CONFIG, every=2))
  with pytest.warns(UserWarning, match="nothing to measure"):
    updates, state = opt.update(GRADS, warm, PARAMS, activations=None)
  assert int(warm.count) % 2 == 0  # not a measuring update: nothing counted
  assert_only_changed(warm, state, "count")


def test_every_k_measures_only_every_kth_step(monkeypatch):
  calls = []
  real = topology.top_summary_host

  def counting(m, resolution):
    calls.append(1)
    return real(m, resolution)

  monkeypatch.setattr(topology, "top_summary_host", counting)
  opt = scale_by_connectome(backend="host", **dict(CONFIG, every=3))
  step = jax.jit(opt.update)
  state = opt.init(PARAMS)
  measured = []
  for t in range(10):
    _, state = step(GRADS, state, PARAMS, activations=ACTS[t])
    measured.append(int(state.measured))
  # Every 3rd update measures (updates 2, 5, 8), the connectome of those
  # updates only.
  assert measured == [0, 0, 1, 1, 1, 2, 2, 2, 3, 3]
  assert len(calls) == 3  # no host call on the updates in between
  ref = reference_run(ACTS[[2, 5, 8]])
  assert float(state.distance) == pytest.approx(ref[-1]["distance"], rel=1e-4)
  assert float(state.scale) == pytest.approx(ref[-1]["scale"], rel=1e-5)


BAD_ACTIVATIONS = {
    "nan": np.where(np.arange(P) == 2, np.nan, ACTS[9]).astype(np.float32),
    "inf": np.where(np.arange(P) == 0, np.inf, ACTS[9]).astype(np.float32),
    "one-sample": ACTS[9][:1],
    # Two samples make every |rho| exactly 1: rounding, not a measurement.
    "two-samples": ACTS[9][:2],
    "one-signal": ACTS[9][:, :1],
    "all-dead": np.ones((N, P), np.float32),
    "one-live": np.concatenate([ACTS[9][:, :1], np.zeros((N, P - 1))],
                               1).astype(np.float32),
}


@pytest.mark.parametrize("name", sorted(BAD_ACTIVATIONS))
def test_bad_activations_are_a_counted_skip(name):
  warm = run(STEP["device"], ACTS[:8])[-1]
  updates, state = STEP["device"](GRADS, warm, PARAMS,
                                  activations=BAD_ACTIVATIONS[name])
  assert_only_changed(warm, state, "count", "skipped")
  assert int(state.skipped) == int(warm.skipped) + 1
  assert np.all(np.isfinite(np.asarray(updates["w"])))
  np.testing.assert_allclose(np.asarray(updates["w"]),
                             float(warm.scale) * GRADS["w"], rtol=1e-6)


def _boom(*args, **kwargs):
  raise RuntimeError("host step failed")


@pytest.mark.parametrize("distance, patched", [("top", "top_summary_host"),
                                               ("wd", "wd_summary_host")])
def test_raising_host_callback_is_a_counted_skip(distance, patched,
                                                 monkeypatch):
  opt, step, acts = ((OPT["host"], STEP["host"], ACTS) if distance == "top"
                     else (OPT_WD, STEP_WD, ACTS_WD))
  state = run(step, acts[:4], opt=opt)[-1]
  assert int(state.measured) == 4
  monkeypatch.setattr(topology, patched, _boom)
  updates, after = step(GRADS, state, PARAMS, activations=acts[4])
  assert_only_changed(state, after, "count", "skipped")
  assert int(after.skipped) == int(state.skipped) + 1
  assert np.all(np.isfinite(np.asarray(updates["w"])))
  monkeypatch.undo()
  _, again = step(GRADS, after, PARAMS, activations=acts[4])
  assert int(again.measured) == 5  # recovers once the host step works


def test_changing_signal_count_rereferences_and_counts_a_skip():
  warm = run(STEP["device"], ACTS[:8])[-1]
  four = [a[:, :4] for a in ACTS[8:11]]
  _, state = STEP["device"](GRADS, warm, PARAMS, activations=four[0])
  assert_only_changed(warm, state, "count", "skipped", "reference",
                      "reference_nodes")
  assert int(state.skipped) == int(warm.skipped) + 1
  assert int(state.reference_nodes) == 4
  # The next 4-signal measurement is compared with the new reference (K=12 is
  # a multiple of 3 and 3, so the summary distance is the exact TOP).
  _, state2 = STEP["device"](GRADS, state, PARAMS, activations=four[1])
  assert int(state2.measured) == int(warm.measured) + 1
  assert float(state2.distance) == pytest.approx(reference_top(
      reference_connectome(four[0]), reference_connectome(four[1])), rel=1e-4)
  # Exactly one ring-buffer slot changed: it holds the new log distance.
  changed = np.flatnonzero(np.asarray(state2.history) != np.asarray(
      state.history))
  assert changed.size == 1
  assert float(state2.history[changed[0]]) == pytest.approx(
      math.log(float(state2.distance)), rel=1e-5)


def test_first_measurement_is_the_reference_only():
  _, state = STEP["device"](GRADS, OPT["device"].init(PARAMS), PARAMS,
                            activations=ACTS[0])
  assert int(state.measured) == 1 and int(state.reference_nodes) == P
  assert float(state.distance) == 0.0 and int(state.history_count) == 0
  np.testing.assert_allclose(
      np.asarray(state.reference[0]),
      topology.top_summary_host(reference_connectome(ACTS[0]), K), atol=1e-6)


def test_max_nodes_measures_the_fixed_subset():
  wide = np.concatenate([ACTS[:6], activation_stream(5, 6, p=7)], axis=2)
  opt = scale_by_connectome(backend="device", max_nodes=P, seed=11,
                            **CONFIG)
  states = run(jax.jit(opt.update), wide, opt=opt)
  idx = node_subset(wide.shape[2], P, 11)
  assert_matches_reference(trace_of(states), reference_run(wide[:, :, idx]))


def test_wd_runs_and_measures_wd_distance():
  acts = ACTS_WD[:4]
  states = run(STEP_WD, acts, opt=OPT_WD)
  assert [int(s.measured) for s in states] == [1, 2, 3, 4]
  for t in range(1, 4):
    expected = wd_distance(reference_connectome(acts[t - 1]),
                           reference_connectome(acts[t]))
    assert expected > 0
    assert float(states[t].distance) == pytest.approx(expected, rel=1e-4)


def test_wd_uses_a_default_node_budget_of_64():
  opt = scale_by_connectome("wd", resolution=8, every=1)
  rng = np.random.default_rng(4)
  # Strongly structured signals keep ripser fast on 64 nodes.
  a = (3 * rng.normal(size=(N, 1)) * rng.normal(size=(1, 70))
       + rng.normal(size=(N, 70))).astype(np.float32)
  _, state = jax.jit(opt.update)(GRADS, opt.init(PARAMS), PARAMS,
                                 activations=a)
  assert int(state.reference_nodes) == 64
  np.testing.assert_allclose(
      np.asarray(state.reference[0]),
      topology.wd_summary_host(
          reference_connectome(a[:, node_subset(70, 64, 0)]), 8), atol=1e-5)


def test_updates_keep_their_dtype():
  grads = {"w": jnp.ones(3, jnp.bfloat16), "none": None}
  warm = run(STEP["device"], ACTS[:8])[-1]
  updates, _ = OPT["device"].update(grads, warm, activations=ACTS[8])
  assert updates["w"].dtype == jnp.bfloat16 and updates["none"] is None
  np.testing.assert_allclose(np.asarray(updates["w"], np.float32),
                             float(warm.scale), rtol=1e-2)


# ----------------------------------------------------------------------------
# Construction.

BAD_ARGUMENTS = [
    ("distance", "l2"), ("distance", None),
    ("window", 1), ("window", 2.5), ("window", True), ("window", "20"),
    ("min_history", 0), ("min_history", 21), ("min_history", 1.0),
    ("enter_z", 0.0), ("enter_z", -1.0), ("enter_z", math.nan),
    ("enter_z", "1"),
    ("exit_z", -0.1), ("exit_z", 1.5), ("exit_z", 2.0), ("exit_z", math.inf),
    ("boost", 1.0), ("boost", 0.9), ("boost", math.inf),
    ("brake", 1.0), ("brake", 0.0), ("brake", 1.2),
    ("min_scale", 0.0), ("min_scale", 1.5), ("min_scale", -0.1),
    ("max_scale", 0.5), ("max_scale", math.inf),
    ("every", 0), ("every", 1.5),
    ("max_nodes", 1), ("max_nodes", 0), ("max_nodes", 8.0),
    ("resolution", 0), ("resolution", 4.0),
    ("seed", 1.5), ("seed", "0"),
    ("backend", "tpu"), ("backend", None),
    ("score", "median"), ("layout", "NCHW"), ("pool", 1), ("noise", "yes"),
    ("probe", 3),
]


@pytest.mark.parametrize("name, value", BAD_ARGUMENTS,
                         ids=[f"{n}={v!r}" for n, v in BAD_ARGUMENTS])
def test_invalid_constructor_argument_raises_naming_it(name, value):
  with pytest.raises(ValueError, match=rf"\b{name} must\b"):
    scale_by_connectome(**{name: value})
  with pytest.raises(ValueError, match=rf"\b{name} must\b"):
    cgalr(0.1, **{name: value})


def test_wd_with_device_backend_raises_naming_backend():
  with pytest.raises(ValueError, match=r"\bbackend must\b"):
    scale_by_connectome("wd", backend="device")


@pytest.mark.parametrize("momentum", [1.0, -0.1, 1.5, "0.9", math.nan])
def test_cgalr_rejects_bad_momentum(momentum):
  with pytest.raises(ValueError, match="momentum"):
    cgalr(0.1, momentum=momentum)


def test_boundary_values_are_accepted():
  scale_by_connectome(window=2, min_history=2, exit_z=0.0, min_scale=1.0,
                      max_scale=1.0, max_nodes=2, resolution=1, every=1)
  cgalr(0.1, momentum=0.0)
  cgalr(0.1, momentum=None)


def test_defaults_are_the_design_contract():
  # DESIGN.md section 3 and the gate study's choice (experiments/README.md),
  # written out. Sizes default to None (resolved below) so that
  # optax.inject_hyperparams leaves them static.
  expected = dict(distance="top", probe=None, pool=False, noise=False,
                  max_nodes=None, backend="auto", select=None,
                  axis_name=None, layout=None)
  params = inspect.signature(scale_by_connectome).parameters
  for name, value in expected.items():
    assert params[name].default == value, name
  state = scale_by_connectome().init(PARAMS)
  assert state.history.shape == (20,) and state.reference.shape == (1, 2, 512)
  gate = cgalr_jax.GateConfig()
  assert (gate.window, gate.min_history) == (20, 5)
  rm = inspect.signature(cgalr_jax.robbins_monro).parameters
  assert rm["t0"].default == 100.0 and rm["power"].default == 0.75
  cg = list(inspect.signature(cgalr).parameters.values())
  # optax.sgd's positional order.
  assert [p.name for p in cg[:4]] == ["learning_rate", "momentum", "nesterov",
                                      "accumulator_dtype"]
  assert cg[1].default == 0.9 and cg[2].default is False
  sc = inspect.signature(scale_by_connectome).parameters
  assert {p.name for p in cg[4:]} == set(sc)


# ----------------------------------------------------------------------------
# cgalr and diagnostics.


def test_cgalr_is_trace_scale_by_connectome_learning_rate():
  state = CGALR.init(PARAMS)
  momentum = np.zeros(3)
  for t in range(8):
    updates, state = STEP_CGALR(GRADS, state, PARAMS, activations=ACTS[t])
    momentum = np.asarray(GRADS["w"]) + 0.5 * momentum
    np.testing.assert_allclose(np.asarray(updates["w"]),
                               -0.1 * applied_scale(t) * momentum, rtol=1e-5)
  # (A Robbins-Monro schedule as learning rate: tests/test_training.py.)


def mark_states(opt_state, *scales):
  """Set the scale of each CG-ALR state found, in tree order."""
  values = iter(scales)
  is_state = lambda x: isinstance(x, ScaleByConnectomeState)  # noqa: E731
  return jax.tree.map(
      lambda x: x._replace(values=x.values.at[0].set(next(values)))
      if is_state(x) else x, opt_state, is_leaf=is_state)


def test_diagnostics_reads_the_state_inside_a_chain():
  keys = {"distance", "z", "gate", "scale", "measured", "skipped", "noise",
          "even_distance", "odd_distance"}
  state = run(STEP_CGALR, ACTS[:6], opt=CGALR)[-1]
  d = diagnostics(state)
  assert set(d) == keys
  assert int(d["measured"]) == 6 and int(d["skipped"]) == 0
  for k in ("distance", "z", "gate", "scale"):
    assert float(d[k]) == pytest.approx(REF[5][k], rel=1e-4, abs=1e-4), k
  d_jit = jax.jit(diagnostics)(state)  # works inside jit
  assert {k: float(v) for k, v in d_jit.items()} == {
      k: float(v) for k, v in d.items()}


def test_diagnostics_inside_inject_hyperparams_and_multi_transform():
  # Host backend: cheaper to compile, and the CPU default anyway.
  injected = optax.inject_hyperparams(
      lambda learning_rate: cgalr(learning_rate, backend="host", **CONFIG))(
          learning_rate=0.1)
  state = injected.init(PARAMS)
  assert float(diagnostics(mark_states(state, 0.37))["scale"]) == (
      pytest.approx(0.37))
  # Activations pass through the wrapper to the transform.
  _, state = jax.jit(injected.update)(GRADS, state, PARAMS, activations=ACTS[0])
  assert int(diagnostics(state)["measured"]) == 1

  params = {"a": jnp.ones(2), "b": jnp.ones(3)}
  multi = optax.multi_transform(
      {"cg": optax.chain(scale_by_connectome(backend="host", **CONFIG),
                         optax.sgd(0.1)),
       "plain": optax.sgd(0.1)}, {"a": "cg", "b": "plain"})
  state = multi.init(params)
  assert float(diagnostics(mark_states(state, 0.5))["scale"]) == 0.5
  _, state = jax.jit(multi.update)(params, state, params, activations=ACTS[0])
  assert int(diagnostics(state)["measured"]) == 1


def test_diagnostics_stacks_several_states_and_raises_when_absent():
  params = {"a": jnp.ones(2), "b": jnp.ones(3)}
  both = optax.multi_transform(
      {"x": scale_by_connectome(), "y": scale_by_connectome(every=2)},
      {"a": "x", "b": "y"})
  d = diagnostics(mark_states(both.init(params), 0.25, 3.0))
  assert d["scale"].shape == (2,) and d["measured"].shape == (2,)
  np.testing.assert_array_equal(np.asarray(d["scale"]), [0.25, 3.0])
  with pytest.raises(ValueError, match="no scale_by_connectome state"):
    diagnostics(optax.sgd(0.1).init(PARAMS))
  with pytest.raises(ValueError, match="no scale_by_connectome state"):
    diagnostics(optax.chain(optax.trace(0.9), optax.sgd(0.1)).init(PARAMS))


def test_detrended_trajectory_matches_reference_simulation():
  cfg = dict(CONFIG, score="detrended", window=6, min_history=5)
  opt = scale_by_connectome(backend="device", **cfg)
  ref = reference_run(ACTS, cfg=cfg)
  assert {t["gate"] for t in ref[6:]} != {HOLD}  # the gate does act
  assert_matches_reference(trace_of(run(jax.jit(opt.update), ACTS, opt=opt)),
                           ref)


@pytest.mark.parametrize("signals", [48, 192])  # sort and radix selections
def test_measuring_branch_holds_few_reductions(signals):
  """On XLA:CPU every reduction-like operation in a program (reduce,
  reduce-window, scatter, sort) costs each run of it a little, even inside
  a ``lax.cond`` branch that does not run (README, Performance). A training
  step that does not measure should stay close to a plain one, so the
  measuring branch keeps such operations few: the count in the compiled
  step, over that of the same step with ``optax.sgd``, stays small: 13 at
  P = 192 with this XLA (17 before the statistics' and the distance's
  sums became products), 70 before the gate's medians, the statistics'
  checks and the selection's prefix sums became products, masks and
  slices (the bound leaves room for other XLA versions)."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(256, 12)), jnp.float32)
  params = {"w1": jnp.asarray(rng.normal(size=(12, signals // 2)) / 4,
                              jnp.float32),
            "w2": jnp.asarray(rng.normal(size=(signals // 2, signals // 2))
                              / 8, jnp.float32)}

  def forward(p, inputs):
    h1 = jnp.tanh(inputs @ p["w1"])
    return h1, jnp.tanh(h1 @ p["w2"])

  probe = lambda p: forward(p, x)  # noqa: E731

  def count(opt):
    def step(p, s):
      grads = jax.grad(lambda q: jnp.sum(forward(q, x[:32])[1] ** 2))(p)
      updates, s = opt.update(grads, s, p)
      return optax.apply_updates(p, updates), s
    text = jax.jit(step).lower(params, opt.init(params)).compile().as_text()
    return len(REDUCTION_OPS.findall(text)), text

  plain, plain_text = count(optax.sgd(0.1, 0.9))
  ours, text = count(cgalr(0.1, 0.9, probe=probe, every=100))
  assert "conditional(" in text and "while(" in text  # Prim's loop is there
  assert ours - plain <= 20, (ours, plain)
  # What each run sets up, measuring or not, each a small allocation: the
  # constants (the probe's inputs among them) and the combining-function
  # values of reductions, scatters and sorts. With this XLA: 18 and 18 at
  # P = 48, 11 and 45 at P = 192 (the radix selection's scatters); 25 and
  # 30, 18 and 57 before the statistics' and the distance's sums became
  # products and the gate's pair indices iotas (the bound leaves room for
  # other XLA versions).
  extra = {k: v - per_run_buffers(plain_text)[k]
           for k, v in per_run_buffers(text).items()}
  assert extra["constants"] <= 24 and extra["region_values"] <= 56, extra


@pytest.mark.parametrize("distance", ["top", "wd"])
def test_costly_node_counts_warn_once_naming_the_remedy(distance,
                                                        monkeypatch):
  # The thresholds are lowered so that small tensors cross them.
  monkeypatch.setattr(transform, "COSTLY_TOP_NODES", 6)
  monkeypatch.setattr(transform, "COSTLY_WD_NODES", 6)
  rng = np.random.default_rng(0)
  opt = transform.scale_by_connectome(distance, max_nodes=8, every=2)
  state = opt.init({})
  quiet = transform.scale_by_connectome(distance, max_nodes=6, every=2)
  a = jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # 6 signals: no warning
    quiet.update(GRADS, quiet.init({}), None, activations=a)
  low, high = transform.expected_seconds(distance, 8)
  with pytest.warns(UserWarning, match=(
      r"8 signals .* roughly " + re.escape(f"{low:.2g}-{high:.2g}")
      + r" s on a 2-core CPU; set max_nodes \(<= 6\) or a larger every")):
    _, state = opt.update(GRADS, state, None, activations=a)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # once per optimizer
    opt.update(GRADS, state, None, activations=a * 2)


def test_expected_cost_matches_the_measured_figures():
  # The benchmark's figures the estimate is drawn from (README,
  # Performance): TOP 0.41 s (host) and 0.98 s (device, slow sort) at 8,192
  # signals, 1.8 s on the host at 16,384; plain ripser 0.1-0.2 s at 128
  # nodes and 2.4-4.7 s at 256.
  low, high = transform.expected_seconds("top", 8192)
  assert low == pytest.approx(0.41, rel=0.05)
  assert high == pytest.approx(0.98, rel=0.05)
  assert transform.expected_seconds("top", 16384)[0] == pytest.approx(
      1.8, rel=0.05)
  low, high = transform.expected_seconds("top", 10241)
  assert (round(low, 2), round(high, 1)) == (0.66, 1.6)  # README's figures
  assert transform.expected_seconds("wd", 128) == pytest.approx((0.1, 0.2))
  low, high = transform.expected_seconds("wd", 256)
  assert 2.0 <= low <= 2.8 and 4.0 <= high <= 5.2


def test_costly_probe_warns_at_init(monkeypatch):
  # A probe's signal count is known when init reads its shapes.
  monkeypatch.setattr(transform, "COSTLY_TOP_NODES", 6)
  x = jnp.ones((32, 4))
  opt = transform.scale_by_connectome(
      probe=lambda p: jnp.tanh(x @ p["w"]), every=2)
  with pytest.warns(UserWarning, match=r"8 signals .* set max_nodes"):
    opt.init({"w": jnp.ones((4, 8))})

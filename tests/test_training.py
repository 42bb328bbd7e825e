"""End to end: CG-ALR trains a real model, and converges where it should."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import cgalr_jax
from cgalr_jax import BOOST, BRAKE
from experiments import quickstart


def test_flax_mlp_on_digits_with_the_probe_source():
  steps = 300
  accuracy, trace = quickstart.train(steps=steps, seed=0)
  assert accuracy >= 0.90
  assert len(trace) == steps
  scales = np.array([t["scale"] for t in trace])
  assert np.all((scales >= 0.25) & (scales <= 4.0))
  assert np.ptp(scales) > 0                     # the gate moved the scale
  # Every 10th update measures the probe (the first is the reference).
  every = quickstart.EVERY
  assert trace[-1]["measured"] == steps // every
  assert trace[-1]["skipped"] == 0
  ms = quickstart.measurements(trace)
  assert len(ms) == steps // every - 1
  gates = {int(t["gate"]) for t in ms}
  assert gates & {BRAKE, BOOST}                 # the gate acted
  # The probe's health check: the halves' series agree, log d is smooth.
  check = quickstart.noise_check(trace)
  assert check["halves_agreement"] > 0.8
  assert check["lag1_autocorr"] > 0.5
  assert np.all(np.isfinite([t["loss"] for t in trace]))
  assert np.mean([t["loss"] for t in trace[-20:]]) < np.mean(
      [t["loss"] for t in trace[:20]])


# A noisy strongly convex quadratic: f(w) = 1/2 (w - w*)^T H (w - w*) with
# eigenvalues of H in [0.5, 2], stochastic gradients H (w - w*) + noise.
# Activations are a fixed random projection of the iterate applied to a
# fresh random batch, so a connectome exists and drifts with w.
D, P, N = 8, 8, 32
SIGMA = 1.0


def quadratic_problem(seed=0):
  rng = np.random.default_rng(seed)
  q, _ = np.linalg.qr(rng.normal(size=(D, D)))
  h = jnp.asarray(q @ np.diag(np.linspace(0.5, 2.0, D)) @ q.T, jnp.float32)
  w_star = jnp.asarray(rng.normal(size=D), jnp.float32)
  proj = jnp.asarray(rng.normal(size=(D, P)) / np.sqrt(D), jnp.float32)
  return h, w_star, proj


def run_quadratic(opt, steps, seed=0):
  h, w_star, proj = quadratic_problem()

  def loss(w):
    e = w - w_star
    return 0.5 * e @ h @ e

  def body(carry, key):
    w, state = carry
    k_noise, k_batch = jax.random.split(key)
    grad = h @ (w - w_star) + SIGMA * jax.random.normal(k_noise, (D,))
    acts = jnp.tanh((jax.random.normal(k_batch, (N, D)) * w) @ proj)
    updates, state = opt.update(grad, state, w, activations=acts)
    w = optax.apply_updates(w, updates)
    return (w, state), loss(w)

  @jax.jit
  def train():
    w0 = jnp.zeros(D)
    keys = jax.random.split(jax.random.key(seed), steps)
    return jax.lax.scan(body, (w0, opt.init(w0)), keys)

  (_, state), losses = train()
  return float(loss(jnp.zeros(D))), np.asarray(losses), state


def test_robbins_monro_envelope_converges_past_the_noise_floor():
  lr0, steps = 0.05, 1500
  # Device backend keeps the whole scan on the device (no host callbacks);
  # K = 21 is a multiple of both set sizes (7 and 21) for P = 8.
  rm = cgalr_jax.cgalr(cgalr_jax.robbins_monro(lr0, t0=10.0, power=1.0),
                       backend="device", resolution=21)
  constant = optax.sgd(lr0, momentum=0.9)  # same initial step, no decay
  initial, rm_losses, rm_state = run_quadratic(rm, steps)
  _, const_losses, _ = run_quadratic(constant, steps)
  rm_final = rm_losses[-200:].mean()
  const_final = const_losses[-200:].mean()
  # Constant steps plateau at the noise floor, well above 0 ...
  assert const_final > 0.05 * initial
  assert abs(const_losses[-200:].mean() - const_losses[-600:-400].mean()) < (
      0.5 * const_final)
  # ... while the Robbins-Monro envelope keeps going down.
  assert rm_final < const_final / 5
  assert rm_final < 0.02 * initial
  assert rm_losses[-200:].mean() < rm_losses[-600:-400].mean()
  diag = cgalr_jax.diagnostics(rm_state)
  every = cgalr_jax.transform.DEFAULT_EVERY
  # Every 10th update measures; w0 = 0 may make the first batch dead.
  assert int(diag["measured"]) >= steps // every - 1
  assert 0.1 <= float(diag["scale"]) <= 4.0


def test_the_shared_optax_step_is_plain_sgd_and_passes_activations():
  """``experiments.train.optax_step``, the step the quickstart and the
  per-step benchmarks call: against a hand-written SGD update, and with the
  batch source it hands the forward pass's taps to ``update``."""
  from experiments import models, train  # pylint: disable=import-outside-toplevel

  model = models.MLP(hidden=(8, 4))
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(32, 5)).astype(np.float32))
  y = jnp.asarray(rng.integers(0, 10, 32).astype(np.int32))
  params = model.init(jax.random.key(0), x[:1])["params"]

  def loss(p):
    logits = model.apply({"params": p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  grads = jax.grad(loss)(params)
  sgd = optax.sgd(0.1)
  new, _, value = train.optax_step(model, sgd)(params, sgd.init(params), x, y)
  np.testing.assert_allclose(float(value), float(loss(params)), rtol=1e-6)
  for got, p, g in zip(jax.tree.leaves(new), jax.tree.leaves(params),
                       jax.tree.leaves(grads)):
    np.testing.assert_allclose(got, p - 0.1 * g, rtol=1e-5, atol=1e-7)

  opt = cgalr_jax.cgalr(0.1, every=1)   # batch source: needs the taps
  state = opt.init(params)
  step = jax.jit(train.optax_step(model, opt, pass_activations=True))
  for _ in range(2):
    params, state, _ = step(params, state, x, y)
  assert int(cgalr_jax.diagnostics(state)["measured"]) == 2

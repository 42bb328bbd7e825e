"""A complete Flax training loop with CG-ALR on scikit-learn's digits.

Run: ``python -m experiments.quickstart [--steps 400]``. It prints the test
accuracy, a trace of the distance, noise floor, z score, gate and scale,
and the noise-floor health check of the probe. This file is the loop shown
in README.md, with its training step from ``experiments/train.py``.

The connectome is read from a fixed probe set (512 training samples, drawn
once) by the transform itself, on measuring steps only, so the training
step is an ordinary Optax step: ``optimizer.update(grads, state, params)``.
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from sklearn.datasets import load_digits

import cgalr_jax
from cgalr_jax.flax import probe, tap
from experiments import train as train_lib

PROBE_SIZE = 512
EVERY = 10  # measuring period of this short run (updates)


class MLP(nn.Module):
  """64-128-64-10 LeakyReLU MLP; both hidden layers feed the connectome."""

  @nn.compact
  def __call__(self, x):
    x = tap(self, nn.leaky_relu(nn.Dense(128)(x)), "hidden1")
    x = tap(self, nn.leaky_relu(nn.Dense(64)(x)), "hidden2")
    return nn.Dense(10)(x)


def digits_split(seed: int = 0):
  """Digits scaled to [0, 1], shuffled, 80% train / 20% test."""
  x, y = load_digits(return_X_y=True)
  order = np.random.default_rng(seed).permutation(len(y))
  x, y = (x[order] / 16.0).astype(np.float32), y[order].astype(np.int32)
  cut = int(0.8 * len(y))
  return (x[:cut], y[:cut]), (x[cut:], y[cut:])


def train(steps: int = 400, batch_size: int = 128, seed: int = 0):
  """Train the MLP with ``cgalr``; returns (test accuracy, per-step trace).

  Each trace entry holds ``cgalr_jax.diagnostics`` after the step (distance,
  z, gate, scale, measured, skipped, noise, even_distance, odd_distance)
  and the loss.
  """
  (x_train, y_train), (x_test, y_test) = digits_split(seed)
  model = MLP()
  params = model.init(jax.random.key(seed), x_train[:1])["params"]
  rng = np.random.default_rng(seed)
  # The probe: a fixed set of training samples, chosen once.
  probe_x = x_train[rng.choice(len(y_train), PROBE_SIZE, replace=False)]
  # A short run: measure every EVERY updates instead of the default 100.
  optimizer = cgalr_jax.cgalr(cgalr_jax.robbins_monro(0.1, t0=200.0),
                              probe=probe(model, probe_x), noise=True,
                              every=EVERY)
  opt_state = optimizer.init(params)

  # The README's step (value_and_grad, optimizer.update(grads, state,
  # params), apply_updates), as every experiment runs it.
  train_step = jax.jit(train_lib.optax_step(model, optimizer))

  @jax.jit
  def accuracy(params, x, y):
    return jnp.mean(jnp.argmax(model.apply({"params": params}, x), -1) == y)

  trace = []
  for _ in range(steps):
    idx = rng.choice(len(y_train), batch_size, replace=False)
    params, opt_state, loss = train_step(params, opt_state, x_train[idx],
                                         y_train[idx])
    diag = cgalr_jax.diagnostics(opt_state)
    trace.append({k: float(v) for k, v in diag.items()} | {"loss": float(loss)})
  return float(accuracy(params, x_test, y_test)), trace


def measurements(trace):
  """The trace entries at which a new distance was measured."""
  out, last = [], 0
  for t in trace:
    if t["measured"] > last and t["distance"] > 0:
      out.append(t)
    last = t["measured"]
  return out


def noise_check(trace) -> dict:
  """The probe's health check (DESIGN.md 2, Noise floor).

  ``distance_over_noise``: median of distance / noise (a fixed probe's
  consecutive distance carries no sampling noise, so it may sit below 1).
  ``halves_agreement``: correlation of the log distance series of the even
  and the odd half of the probe (a healthy fixed probe: 0.9 or more).
  ``lag1_autocorr``: lag-1 autocorrelation of log distance.
  """
  ms = measurements(trace)
  d = np.array([t["distance"] for t in ms])
  n = np.array([t["noise"] for t in ms])
  e = np.array([t["even_distance"] for t in ms])
  o = np.array([t["odd_distance"] for t in ms])
  ok = (e > 0) & (o > 0)
  log_d = np.log(d)
  return {
      "measurements": len(ms),
      "distance_over_noise": float(np.median(d / np.maximum(n, 1e-30))),
      "halves_agreement": float(np.corrcoef(np.log(e[ok]),
                                            np.log(o[ok]))[0, 1]),
      "lag1_autocorr": float(np.corrcoef(log_d[:-1], log_d[1:])[0, 1]),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=400)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  acc, trace = train(args.steps, seed=args.seed)
  ms = measurements(trace)
  print(f"{'step':>5} {'loss':>8} {'distance':>10} {'noise':>10} {'z':>7} "
        f"{'gate':>5} {'scale':>7}")
  step_of = {id(t): i for i, t in enumerate(trace)}
  for t in ms[::max(1, len(ms) // 20)]:
    print(f"{step_of[id(t)]:5d} {t['loss']:8.4f} {t['distance']:10.4g} "
          f"{t['noise']:10.4g} {t['z']:7.2f} {int(t['gate']):5d} "
          f"{t['scale']:7.3f}")
  gates = [int(t["gate"]) for t in ms]
  check = noise_check(trace)
  print(f"test accuracy {acc:.4f}; scale range "
        f"[{min(t['scale'] for t in trace):.3f}, "
        f"{max(t['scale'] for t in trace):.3f}]; measurements "
        f"{check['measurements']}: braking {gates.count(-1)}, boosting "
        f"{gates.count(1)}, holding {gates.count(0)}")
  print(f"noise floor: distance/noise (median) "
        f"{check['distance_over_noise']:.3g}; the probe halves' "
        f"log-distance series correlate {check['halves_agreement']:.3f} "
        f"(healthy fixed probe: >= 0.9); lag-1 autocorrelation of log "
        f"distance {check['lag1_autocorr']:.3f}")


if __name__ == "__main__":
  main()

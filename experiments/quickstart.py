"""A complete Flax training loop with CG-ALR on scikit-learn's digits.

Run: ``python -m experiments.quickstart [--steps 400]``. It prints the test
accuracy and a trace of the learning-rate scale, z score and gate state.
This file is the loop shown in README.md.
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

import cgalr_jax
from cgalr_jax.flax import apply_with_activations, tap


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
  """Train the MLP with ``cgalr``; returns (test accuracy, diagnostics trace)."""
  (x_train, y_train), (x_test, y_test) = digits_split(seed)
  model = MLP()
  params = model.init(jax.random.key(seed), x_train[:1])["params"]
  optimizer = cgalr_jax.cgalr(cgalr_jax.robbins_monro(0.1, t0=200.0))
  opt_state = optimizer.init(params)

  @jax.jit
  def train_step(params, opt_state, x, y):
    def loss_fn(p):
      logits, activations = apply_with_activations(model, {"params": p}, x)
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return loss, activations

    (loss, activations), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params)
    updates, opt_state = optimizer.update(grads, opt_state, params,
                                          activations=activations)
    return optax.apply_updates(params, updates), opt_state, loss

  @jax.jit
  def accuracy(params, x, y):
    return jnp.mean(jnp.argmax(model.apply({"params": params}, x), -1) == y)

  rng = np.random.default_rng(seed)
  trace = []
  for step in range(steps):
    idx = rng.choice(len(y_train), batch_size, replace=False)
    params, opt_state, loss = train_step(params, opt_state, x_train[idx],
                                         y_train[idx])
    diag = cgalr_jax.diagnostics(opt_state)
    trace.append({k: float(v) for k, v in diag.items()} | {"loss": float(loss)})
  return float(accuracy(params, x_test, y_test)), trace


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=400)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  acc, trace = train(args.steps, seed=args.seed)
  print(f"{'step':>5} {'loss':>8} {'distance':>10} {'z':>7} {'gate':>5} "
        f"{'scale':>7}")
  for step in range(0, len(trace), max(1, len(trace) // 20)):
    t = trace[step]
    print(f"{step:5d} {t['loss']:8.4f} {t['distance']:10.4g} {t['z']:7.2f} "
          f"{int(t['gate']):5d} {t['scale']:7.3f}")
  gates = [int(t["gate"]) for t in trace]
  print(f"test accuracy {acc:.4f}; scale range "
        f"[{min(t['scale'] for t in trace):.3f}, "
        f"{max(t['scale'] for t in trace):.3f}]; steps braking "
        f"{gates.count(-1)}, boosting {gates.count(1)}, holding {gates.count(0)}")


if __name__ == "__main__":
  main()

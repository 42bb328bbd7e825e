"""Smoke test of experiments.node_budget at tiny sizes (synthetic data)."""

from __future__ import annotations

import json
import types

import jax
import jax.numpy as jnp
import numpy as np

from cgalr_jax import gate as gate_lib
from experiments import node_budget


def _dataset(n=96, d=12, classes=3, seed=0):
  rng = np.random.default_rng(seed)
  y = rng.integers(0, classes, n).astype(np.int32)
  x = (rng.normal(size=(n, d)) + y[:, None]).astype(np.float32)
  return types.SimpleNamespace(name="synthetic", x_train=x, y_train=y,
                               num_classes=classes)


def test_run_tiny(tmp_path):
  result = node_budget.run(steps=16, every=2, probe=64, budgets=(8, 4),
                           seeds=(0, 1), hidden=(8, 8), dataset=_dataset(),
                           batch=16, lr=0.05, resolution=4, log=lambda s: None)
  series, rows = result["series"], result["rows"]
  assert result["setup"]["measurements"] == 8
  assert series["steps"] == list(range(2, 17, 2))
  assert series["num_nodes"] == {"full": 16, "8/s0": 8, "8/s1": 8,
                                 "4/s0": 4, "4/s1": 4}
  for name, d in series["distance"].items():
    assert len(d) == 8 and np.all(np.isfinite(d)) and min(d) >= 0, name
  assert rows["full"]["spearman"] == [1.0]
  for b in ("8", "4"):
    assert len(rows[b]["spearman"]) == 2
    assert all(-1 <= r <= 1 for r in rows[b]["spearman"])
    assert all(0 <= a <= 1 for a in rows[b]["gate_agreement"])
    assert rows[b]["median_seconds"] > 0
  assert sum(rows["full"]["gate_counts"].values()) == 8
  text = node_budget.table(rows)
  assert "| 16 (full) |" in text and "| 4 |" in text
  json.dumps(result)  # JSON-ready


def test_gate_states_match_library_loop():
  rng = np.random.default_rng(1)
  log_d = np.concatenate([rng.normal(0, 0.1, 12), [3.0, 3.0, -3.0],
                          rng.normal(0, 0.1, 5)]).astype(np.float32)
  got = node_budget.gate_states(log_d)
  config = gate_lib.GateConfig()
  history = jnp.zeros(config.window, jnp.float32)
  count = jnp.asarray(0, jnp.int32)
  gate = jnp.asarray(gate_lib.HOLD, jnp.int32)
  scale = jnp.asarray(1.0, jnp.float32)
  want = []
  step = jax.jit(gate_lib.step, static_argnums=0)
  push = jax.jit(gate_lib.push)
  for v in jnp.asarray(log_d):
    _, gate, scale = step(config, history, count, gate, scale, v)
    history, count = push(history, count, v)
    want.append(int(gate))
  np.testing.assert_array_equal(got, want)
  assert set(want) != {gate_lib.HOLD}  # the spike moves the gate

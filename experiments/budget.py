"""How long must training run? Validation curves of the strong baselines.

DESIGN.md section 5: the budget must be long enough that the best tuned
baseline has converged (validation accuracy flat over the last 20% of
training), the same for every method, and on the full-batch GCNs long enough
for the SGD family too. This script measures it cheaply: a few baselines
with constant learning rates (which never converge "by schedule", so their
curves show when the network itself stops improving), on the tuning seeds,
over a long budget; one JSON per dataset, written as each finishes
(resumable), and one plot.

Run::

  python -m experiments.budget --out experiments/results/budget \
      --data-dir ../shared/data/planetoid

The rates are those stored in ``experiments/tuned_v1.json`` (version 1's
tuning, short budgets): good enough to show where the curves flatten. A
dataset version 1 did not run (the mnist5k CNN) takes the rates version 2
tuned for it (``experiments/tuned.json``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from experiments import train as train_lib
from experiments import tuning

# dataset -> (long budget in epochs, methods measured)
LONG = {
    "digits": 150,
    "mnist1d": 150,
    "mnist5k": 80,
    "cora": 400,       # x 5 full-batch steps = 2000 steps
    "citeseer": 400,
    "mnist5k_cnn": 40,  # 2x its 20-epoch budget
}
METHODS = ("sgd_const", "adam_const")
V1_TUNED = Path(__file__).resolve().with_name("tuned_v1.json")


def flat_epoch(curve: np.ndarray, tol: float) -> int:
  """First epoch (1-based) after which the smoothed curve stays within
  ``tol`` of its final level (mean of the last 10%)."""
  k = max(1, len(curve) // 20)
  smooth = np.convolve(curve, np.ones(k) / k, mode="valid")
  final = float(np.mean(curve[-max(1, len(curve) // 10):]))
  ok = smooth >= final - tol
  bad = np.nonzero(~ok)[0]
  first = 0 if bad.size == 0 else int(bad[-1]) + 1
  return first + k  # the smoothing window ends there


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", type=Path, required=True)
  parser.add_argument("--datasets", default=",".join(LONG))
  parser.add_argument("--seeds", type=int, default=2)
  parser.add_argument("--data-dir", default=None)
  args = parser.parse_args(argv)
  args.out.mkdir(parents=True, exist_ok=True)
  rates = tuning.read_tuned(V1_TUNED)
  current = tuning.read_tuned()
  for dataset in args.datasets.split(","):
    path = args.out / f"{dataset}.json"
    if path.exists():
      continue
    task = train_lib.make_task(dataset, epochs=LONG[dataset],
                               data_dir=args.data_dir)
    rec = {"dataset": dataset, "epochs": task.epochs,
           "steps_per_epoch": task.steps_per_epoch, "methods": {}}
    for name in METHODS:
      stored = rates.get(dataset, {}).get(name,
                                          current.get(dataset, {}).get(name))
      lr = stored if stored is not None else (
          0.1 if name.startswith("sgd") else 3e-3)
      t0 = time.perf_counter()
      res = train_lib.train_runs(task, name, [lr] * args.seeds,
                                 tuning.tuning_seeds(args.seeds))
      val = np.asarray(res["val_acc"]).mean(axis=0)
      rec["methods"][name] = {
          "lr": lr, "val_acc": val.tolist(),
          "train_loss": np.asarray(res["train_loss"]).mean(axis=0).tolist(),
          "flat_epoch_0.005": flat_epoch(val, 0.005),
          "wall_s": time.perf_counter() - t0}
      print(f"{dataset} {name} lr={lr} final val {val[-10:].mean():.4f} "
            f"flat (0.5 pt) from epoch {flat_epoch(val, 0.005)}/{len(val)} "
            f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr,
            flush=True)
    path.write_text(json.dumps(rec) + "\n")
  plot(args.out)


def plot(out: Path) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  recs = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
  if not recs:
    return
  fig, axes = plt.subplots(1, len(recs), figsize=(4 * len(recs), 3.4),
                           squeeze=False)
  for ax, rec in zip(axes[0], recs):
    spe = rec["steps_per_epoch"]
    for name, m in rec["methods"].items():
      v = np.asarray(m["val_acc"])
      ax.plot(np.arange(1, len(v) + 1) * spe, v, label=f"{name} {m['lr']:.3g}",
              linewidth=1)
    ax.set_title(rec["dataset"])
    ax.set_xlabel("update")
    ax.set_ylabel("val acc (mean of 2 tuning seeds)")
    lo = min(np.min(m["val_acc"][len(m["val_acc"]) // 10:])
             for m in rec["methods"].values())
    ax.set_ylim(lo - 0.02, None)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(out / "budget_curves.png", dpi=100)
  plt.close(fig)


if __name__ == "__main__":
  main()

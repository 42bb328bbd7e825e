"""Gate validation study: which gate constants CG-ALR uses by default.

Validation splits only (test accuracy is never read). One learning rate per
dataset, the ungated envelope's own tuned rate (``rm_envelope`` in
``tuned.json``: the gate must improve on a well-tuned envelope), the same
for the gated runs, the envelope and the shuffled control, on the tuning
seeds (paired: same initialisation, batch order and probe set).

For every (dataset, variant) it writes ``OUT/<dataset>/<variant>.json`` as
soon as the run finishes (an existing file is kept: the study resumes), and
at the end ``OUT/table.md`` and ``OUT/choice.json``. Per run it records:

* ``val_diff``: validation score (mean of the last 10% of epochs) of the
  gated run minus the envelope's, per seed;
* ``autocorr``: lag-1 autocorrelation of log distance over measurements;
* ``brake`` / ``boost``: fraction of measurements after which the gate is
  in BRAKE / BOOST;
* ``pinned``: fraction of steps with the scale at min_scale or max_scale;
* ``shuffled_diff``: the same for the shuffled control (the gate fed a
  random permutation of its own z sequence, ``methods.cgalr_shuffled``),
  and ``real_minus_shuffled``.

The default is picked by (a) autocorr >= 0.5 on every dataset, (b) pinned
<= 0.5 on every run, (c) then the best mean ``val_diff`` over datasets.
Then the chosen gate runs once more with the pool source and the batch
source, for the record.

Run::

  python -m experiments.gate_study --out experiments/results/gate_study \
      --data-dir /work/shared/data/planetoid
  python -m experiments.gate_study --out ... --table-only
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

DATASETS = ("digits", "mnist1d", "cora")
BASE = dict(score="detrended", enter_z=1.5, exit_z=0.5, boost=1.05,
            brake=0.95, min_scale=0.25, max_scale=4.0, window=20)
SYM = dict(boost=1.1, brake=1 / 1.1)


def _v(name, every=10, **gate):
  return {"name": name, "gate": {**BASE, **gate}, "every": every}


VARIANTS = [
    _v("trail_z1.5", score="trailing"),
    _v("trail_z1.0", score="trailing", enter_z=1.0, exit_z=0.25),
    _v("detr_z1.5"),
    _v("detr_z1.0", enter_z=1.0, exit_z=0.25),
    _v("detr_z2.0", enter_z=2.0),
    _v("detr_z1.5_f1.1", **SYM),
    _v("detr_z1.0_f1.1", enter_z=1.0, exit_z=0.25, **SYM),
    _v("detr_z1.5_w10", window=10),
    _v("detr_z1.5_epoch", every="epoch"),
    _v("detr_z1.0_epoch", enter_z=1.0, exit_z=0.25, every="epoch"),
    _v("detr_z1.5_f1.1_epoch", every="epoch", **SYM),
    _v("trail_z1.5_epoch", score="trailing", every="epoch"),
]
LR_FROM = "rm_envelope"
PIN_LIMIT = 0.5
AUTOCORR_MIN = 0.5


def lag1(x: np.ndarray) -> float:
  x = np.asarray(x, np.float64)
  x = x[np.isfinite(x)]
  if x.size < 3 or np.std(x) == 0:
    return float("nan")
  return float(np.corrcoef(x[:-1], x[1:])[0, 1])


def run_metrics(res: dict, gate: dict) -> dict:
  """Per-seed trace statistics of a gated run."""
  from experiments import train  # pylint: disable=import-outside-toplevel
  ms = train.measurements(res)
  scale = res["scale"]
  lo, hi = gate["min_scale"], gate["max_scale"]
  pinned = np.mean((scale <= lo * (1 + 1e-4)) | (scale >= hi * (1 - 1e-4)),
                   axis=1)
  return {
      "autocorr": [lag1(np.log(np.maximum(m["distance"], 1e-12)))
                   for m in ms],
      "brake": [float(np.mean(m["gate"] == -1)) for m in ms],
      "boost": [float(np.mean(m["gate"] == 1)) for m in ms],
      "pinned": [float(p) for p in pinned],
      "final_scale": [float(s) for s in scale[:, -1]],
      "mean_log_scale": [float(np.mean(np.log(s))) for s in scale],
      "measurements": [int(len(m["distance"])) for m in ms],
      "trace_seed0": {k: [float(v) for v in ms[0][k]]
                      for k in ("step", "distance", "z", "gate", "scale")},
  }


def _dump(path: Path, obj: Any) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(".tmp")
  tmp.write_text(json.dumps(obj, indent=1) + "\n")
  tmp.replace(path)


def study_dataset(dataset: str, out: Path, variants: Sequence[dict], *,
                  seeds: int, epochs: int | None, data_dir: str | None,
                  sources: Sequence[str] = ("probe",)) -> None:
  from experiments import train, tuning  # pylint: disable=import-outside-toplevel
  task = None
  lr = tuning.stored_lr(dataset, LR_FROM)
  seed_list = tuning.tuning_seeds(seeds)
  env_path = out / dataset / "_envelope.json"

  def get_task():
    nonlocal task
    if task is None:
      task = train.make_task(dataset, epochs=epochs, data_dir=data_dir)
    return task

  if env_path.exists():
    env = json.loads(env_path.read_text())
  else:
    t0 = time.perf_counter()
    r = train.train_runs(get_task(), "rm_envelope", [lr] * seeds, seed_list)
    env = {"val_score": tuning.val_score(r["val_acc"]).tolist(),
           "curve_val_acc": r["val_acc"].mean(axis=0).tolist(),
           "lr": lr, "seeds": seed_list, "epochs": get_task().epochs,
           "wall_s": time.perf_counter() - t0}
    _dump(env_path, env)
  env_score = np.asarray(env["val_score"])
  for v in variants:
    for source in sources:
      name = v["name"] + ("" if source == "probe" else f"+{source}")
      path = out / dataset / f"{name}.json"
      if path.exists():
        continue
      t0 = time.perf_counter()
      task = get_task()
      method = {"probe": "cgalr_top", "pool": "cgalr_pool",
                "batch": "cgalr_batch"}[source]
      res = train.train_runs(task, method, [lr] * seeds, seed_list,
                             gate=v["gate"], every=v["every"])
      score = tuning.val_score(res["val_acc"])
      rec = {"dataset": dataset, "variant": v["name"], "source": source,
             "gate": v["gate"], "every": v["every"], "lr": lr,
             "seeds": seed_list,
             "every_steps": (task.steps_per_epoch if v["every"] == "epoch"
                             else v["every"]),
             "steps_per_epoch": task.steps_per_epoch,
             "total_steps": task.total_steps,
             "val_score": score.tolist(),
             "val_diff": (score - env_score).tolist(),
             "curve_val_acc": res["val_acc"].mean(axis=0).tolist()}
      rec.update(run_metrics(res, v["gate"]))
      rec["wall_s"] = time.perf_counter() - t0
      if source == "probe":
        every = rec["every_steps"]
        start = 1 + 5  # reference + min_history warm-up measurements
        z = train.z_at_measuring_steps(res, every)
        zs = np.stack([train.shuffle_z(z[i], s, start)
                       for i, s in enumerate(seed_list)])
        sh = train.train_runs(task, "cgalr_shuffled", [lr] * seeds,
                              seed_list, gate=v["gate"], every=v["every"],
                              z_sequences=zs)
        sh_score = tuning.val_score(sh["val_acc"])
        rec["shuffled_val_score"] = sh_score.tolist()
        rec["shuffled_diff"] = (sh_score - env_score).tolist()
        rec["real_minus_shuffled"] = (score - sh_score).tolist()
      rec["wall_s_total"] = time.perf_counter() - t0
      _dump(path, rec)
      print(f"{dataset} {name}: val_diff {np.mean(rec['val_diff']):+.4f} "
            f"shuffled {np.mean(rec.get('shuffled_diff', [np.nan])):+.4f} "
            f"autocorr {np.nanmean(rec['autocorr']):.2f} pinned "
            f"{np.max(rec['pinned']):.2f} brake {np.mean(rec['brake']):.2f} "
            f"boost {np.mean(rec['boost']):.2f} ({rec['wall_s_total']:.0f} s)",
            flush=True)


def load(out: Path) -> dict[str, dict[str, dict]]:
  runs: dict[str, dict[str, dict]] = {}
  for path in sorted(out.glob("*/*.json")):
    if path.name.startswith("_"):
      continue
    rec = json.loads(path.read_text())
    runs.setdefault(rec["dataset"], {})[path.stem] = rec
  return runs


def choose(runs: dict[str, dict[str, dict]], datasets: Sequence[str]
           ) -> dict[str, Any]:
  """Apply criteria (a), (b), (c) to the probe variants run on every dataset."""
  names = [v["name"] for v in VARIANTS
           if all(v["name"] in runs.get(d, {}) for d in datasets)]
  rows = {}
  for n in names:
    recs = [runs[d][n] for d in datasets]
    a = all(np.nanmean(r["autocorr"]) >= AUTOCORR_MIN for r in recs)
    b = all(max(r["pinned"]) <= PIN_LIMIT for r in recs)
    c = float(np.mean([np.mean(r["val_diff"]) for r in recs]))
    rows[n] = {"a": a, "b": b, "c": c}
  ok = [n for n in names if rows[n]["a"] and rows[n]["b"]]
  pool = ok or [n for n in names if rows[n]["b"]] or names
  best = max(pool, key=lambda n: rows[n]["c"]) if pool else None
  return {"chosen": best, "criteria": rows, "datasets": list(datasets),
          "passed_a_and_b": ok}


def _f(x, spec="+.4f"):
  return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) \
      else format(x, spec)


def table(runs: dict[str, dict[str, dict]], choice: dict) -> str:
  lines = ["| dataset | variant | source | every | val diff vs envelope | "
           "shuffled diff | real − shuffled | lag-1 autocorr log d | "
           "max pinned | brake | boost | final scale | wall s |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for d, recs in runs.items():
    for n, r in recs.items():
      mark = " **(chosen)**" if n == choice.get("chosen") else ""
      sd = r.get("shuffled_diff")
      rs = r.get("real_minus_shuffled")
      lines.append(
          f"| {d} | {r['variant']}{mark} | {r['source']} | {r['every_steps']} "
          f"| {_f(float(np.mean(r['val_diff'])))} "
          f"| {_f(float(np.mean(sd)) if sd else None)} "
          f"| {_f(float(np.mean(rs)) if rs else None)} "
          f"| {_f(float(np.nanmean(r['autocorr'])), '.2f')} "
          f"| {max(r['pinned']):.2f} | {np.mean(r['brake']):.2f} "
          f"| {np.mean(r['boost']):.2f} "
          f"| {np.mean(r['final_scale']):.2f} | {r['wall_s_total']:.0f} |")
  lines += ["", "Criteria per variant (a: lag-1 autocorr >= 0.5 on every "
            "dataset; b: scale pinned at a bound <= 50% of steps on every "
            "run; c: mean over datasets of the paired validation difference "
            "vs the envelope):", "",
            "| variant | a | b | c |", "|---|---|---|---|"]
  for n, row in choice.get("criteria", {}).items():
    lines.append(f"| {n} | {row['a']} | {row['b']} | {row['c']:+.4f} |")
  return "\n".join(lines) + "\n"


def plot_chosen(runs: dict[str, dict[str, dict]], name: str,
                path: Path) -> None:
  """Seed-0 distance, z and scale of the chosen variant, per dataset."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  recs = [(d, r[name]) for d, r in runs.items() if name in r]
  if not recs:
    return
  fig, axes = plt.subplots(3, len(recs), figsize=(4 * len(recs), 7),
                           sharex="col", squeeze=False)
  for j, (d, r) in enumerate(recs):
    t = r["trace_seed0"]
    axes[0, j].semilogy(t["step"], t["distance"], ".-", markersize=3)
    axes[1, j].plot(t["step"], t["z"], ".-", markersize=3)
    axes[1, j].axhline(r["gate"]["enter_z"], color="r", linewidth=0.5)
    axes[1, j].axhline(-r["gate"]["enter_z"], color="g", linewidth=0.5)
    axes[2, j].plot(t["step"], t["scale"], ".-", markersize=3)
    axes[0, j].set_title(f"{d}: {name}")
    axes[2, j].set_xlabel("step")
  axes[0, 0].set_ylabel("TOP distance")
  axes[1, 0].set_ylabel("z")
  axes[2, 0].set_ylabel("scale")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", type=Path,
                      default=Path("experiments/results/gate_study"))
  parser.add_argument("--datasets", default=",".join(DATASETS))
  parser.add_argument("--extra-datasets", default="",
                      help="run after the main study (e.g. mnist5k)")
  parser.add_argument("--seeds", type=int, default=5)
  parser.add_argument("--epochs", type=int, default=None)
  parser.add_argument("--data-dir", default=None)
  parser.add_argument("--table-only", action="store_true")
  args = parser.parse_args(argv)
  datasets = [d for d in args.datasets.split(",") if d]
  extra = [d for d in args.extra_datasets.split(",") if d]
  t0 = time.perf_counter()
  if not args.table_only:
    for d in datasets:
      study_dataset(d, args.out, VARIANTS, seeds=args.seeds,
                    epochs=args.epochs, data_dir=args.data_dir)
  runs = load(args.out)
  choice = choose(runs, datasets)
  chosen = next((v for v in VARIANTS if v["name"] == choice["chosen"]), None)
  if not args.table_only and chosen is not None:
    for d in datasets:
      study_dataset(d, args.out, [chosen], seeds=args.seeds,
                    epochs=args.epochs, data_dir=args.data_dir,
                    sources=("pool", "batch"))
    for d in extra:
      study_dataset(d, args.out, [chosen], seeds=args.seeds,
                    epochs=args.epochs, data_dir=args.data_dir,
                    sources=("probe", "batch"))
  runs = load(args.out)
  if chosen is not None:
    choice["gate"] = chosen["gate"]
    choice["every"] = chosen["every"]
  choice["wall_s_this_invocation"] = time.perf_counter() - t0
  _dump(args.out / "choice.json", choice)
  text = table(runs, choice)
  (args.out / "table.md").write_text(text)
  if choice.get("chosen"):
    plot_chosen(runs, choice["chosen"], args.out / "chosen_traces.png")
  print(text)


if __name__ == "__main__":
  sys.exit(main())

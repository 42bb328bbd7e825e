"""The paper's comparison on one dataset (DESIGN.md section 5).

Run::

  python -m experiments.benchmark --dataset digits --seeds 5 --out runs/digits
  python -m experiments.benchmark --dataset cora --seeds 5 --out runs/cora \
      --tune --data-dir ../shared/data/planetoid

For each method it trains ``--seeds`` seeds (seeds 0..n-1) and writes
``OUT/summary.json`` (``dataset``, ``seeds``, ``methods.<name>.test_acc``
one value per seed, ``red.<baseline>.{mean, ci_low, ci_high}`` of CG-ALR
(TOP) against each other method, and more), ``OUT/summary.md`` (the table)
and the plots ``OUT/curves.png`` and ``OUT/cgalr_scale.png``.

The training loop is :mod:`experiments.train` (one seed fixes the
initialisation, the batch order and the probe set, so seed s of every
method sees the same start and the same batches: RED is paired by seed).
Learning rates come from :mod:`experiments.tuning` (``--tune`` tunes on the
validation split and stores the choice in ``experiments/tuned.json``).
Summaries, tables and plots are :mod:`experiments.report`.

The two timing controls need CG-ALR (TOP) first: ``cgalr_shuffled`` replays
a random permutation of the z sequence cgalr_top produced on the same seed,
``cgalr_replay`` applies the scale trajectory cgalr_top recorded on the
tuning seeds (run i gets tuning seed i mod n), open loop.
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from experiments import data as data_lib
from experiments import methods as methods_lib
from experiments import report
from experiments import train as train_lib
from experiments import tuning

REFERENCE = "cgalr_top"


def _measured(res: dict) -> dict:
  """Per-measurement trace and noise health of a gated run."""
  ms = train_lib.measurements(res)
  return {"noise_health": report.noise_health(ms),
          "trace": report.trace_summary(res["scale"], res["z"], res["gate"])}


def run(dataset: str, seeds: int, out: Path, method_names: Sequence[str], *,
        do_tune: bool = False, tune_missing: bool = False,
        tune_seeds: int = 2, grid_size: int = tuning.GRID_SIZE,
        epochs: int | None = None, arch: str | None = None,
        data_dir: str | None = None, tuned_path: Path = tuning.TUNED_PATH,
        dataset_obj: data_lib.Dataset | None = None,
        quiet: bool = False) -> dict:
  """The whole comparison on one dataset; returns the summary."""
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel

  task = train_lib.make_task(dataset, epochs=epochs, arch=arch,
                             data_dir=data_dir, dataset_obj=dataset_obj)
  out.mkdir(parents=True, exist_ok=True)
  names = list(method_names)
  specs = {n: methods_lib.METHODS[n] for n in names}
  need_ref = any(s.needs for s in specs.values())

  def tunes(spec):
    return do_tune and spec.tuned and spec.lr_from is None and not (
        tune_missing and tuning.has_stored(dataset, spec.name, tuned_path))

  n_jobs = len(names) + sum(tunes(s) for s in specs.values()) + (
      1 if need_ref and REFERENCE not in names else 0)
  bar = tqdm(total=n_jobs * task.epochs, unit="epoch", disable=quiet,
             desc=dataset, file=sys.stderr)
  results: dict[str, dict] = {}
  ref_tuning: dict[str, np.ndarray] | None = None

  def lr_of(spec) -> tuple[float | None, dict]:
    nonlocal ref_tuning
    entry: dict[str, Any] = {}
    if not spec.tuned:
      return None, entry
    if spec.lr_from is not None:
      entry["lr_from"] = spec.lr_from
      return tuning.stored_lr(dataset, spec.lr_from, tuned_path), entry
    if tunes(spec):
      bar.set_description(f"{dataset} tune {spec.name}")
      t0 = time.perf_counter()
      values = tuning.grid(spec.name, grid_size)
      lr, scores, raw = tuning.tune(task, spec.name, values, tune_seeds,
                                    progress=bar)
      tuning.store_tuned(dataset, {spec.name: lr}, tuned_path)
      entry["tuning"] = {"grid": values, "val_score": scores,
                         "seeds": tune_seeds,
                         "wall_s": time.perf_counter() - t0}
      if spec.name == REFERENCE:  # keep the chosen rate's trajectories
        best = values.index(lr)
        ref_tuning = {"scale": raw["scale"][best * tune_seeds:
                                            (best + 1) * tune_seeds]}
        with open(out / "runs" / "ref_tuning.pkl", "wb") as f:
          pickle.dump((dict(cache_key, lr=lr), ref_tuning), f)
      return lr, entry
    return tuning.stored_lr(dataset, spec.name, tuned_path), entry

  # Finished methods are kept in OUT/runs/<name>.pkl (resume): a rerun with
  # the same dataset, seeds, budget and learning rate reuses them.
  cache_dir = out / "runs"
  cache_dir.mkdir(exist_ok=True)
  cache_key = {"seeds": seeds, "epochs": task.epochs,
               "steps_per_epoch": task.steps_per_epoch, "arch": arch}

  def train_method(name, **options):
    spec = methods_lib.METHODS[name]
    lr, entry = lr_of(spec)
    cached = cache_dir / f"{name}.pkl"
    if cached.exists():
      with open(cached, "rb") as f:
        key, res = pickle.load(f)
      if key == dict(cache_key, lr=lr):
        bar.update(task.epochs)
        return res
    bar.set_description(f"{dataset} {name}")
    t0 = time.perf_counter()
    res = train_lib.train_runs(task, name, [1.0 if lr is None else lr] * seeds,
                               list(range(seeds)), progress=bar, **options)
    res.update(entry, wall_s=time.perf_counter() - t0, lr=lr,
               family=spec.family)
    with open(cached, "wb") as f:
      pickle.dump((dict(cache_key, lr=lr), res), f)
    return res

  order = sorted(names, key=lambda n: (n != REFERENCE, bool(specs[n].needs)))
  if need_ref and REFERENCE not in names:
    order.insert(0, REFERENCE)
  for name in order:
    spec = methods_lib.METHODS[name]
    options: dict[str, Any] = {}
    if spec.gated:
      options["noise"] = True  # the noise floor, for the health check
    if spec.needs == "z_sequence":
      ref = results[REFERENCE]
      gate = methods_lib.gate_config(methods_lib.STUDY_GATE)
      start = 1 + gate.min_history
      z = train_lib.z_at_measuring_steps(
          ref, methods_lib.measuring_period(None, task.steps_per_epoch))
      options["z_sequences"] = np.stack(
          [train_lib.shuffle_z(z[s], s, start) for s in range(seeds)])
    if spec.needs == "scale_trajectory":
      lr = tuning.stored_lr(dataset, REFERENCE, tuned_path)
      ref_file = cache_dir / "ref_tuning.pkl"
      if ref_tuning is None and ref_file.exists():
        with open(ref_file, "rb") as f:
          key, kept = pickle.load(f)
        if key == dict(cache_key, lr=lr) and (
            kept["scale"].shape[0] >= tune_seeds):
          ref_tuning = kept
      if ref_tuning is None:
        bar.set_description(f"{dataset} {REFERENCE} on tuning seeds")
        raw = train_lib.train_runs(task, REFERENCE, [lr] * tune_seeds,
                                   tuning.tuning_seeds(tune_seeds))
        ref_tuning = {"scale": raw["scale"]}
      traj = ref_tuning["scale"]
      options["scale_trajectories"] = np.stack(
          [traj[s % traj.shape[0]] for s in range(seeds)])
    results[name] = train_method(name, **options)
  bar.close()

  chosen = {}
  for name in names:
    r = results[name]
    if "scale" in r:
      r.update(_measured(r))
    chosen[name] = r
  summary = report.summarise(dataset, seeds, chosen, task.n_test)
  summary["config"] = {"epochs": task.epochs,
                       "steps_per_epoch": task.steps_per_epoch,
                       "batch_size": task.batch_size,
                       "weight_decay": task.weight_decay,
                       "probe_size": train_lib.PROBE_SIZE,
                       "model": repr(task.model).split("\n")[0],
                       "tuned": do_tune, "tune_missing": tune_missing,
                       "tune_seeds": tune_seeds,
                       "grid_size": grid_size}
  (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
  (out / "summary.md").write_text(report.table(summary))
  report.plot(summary, chosen, out)
  return summary


def explain(summary: dict, out: Path) -> str:
  """The lines ``make demo`` prints after the table."""
  lines = []
  ref = summary["methods"].get(REFERENCE)
  if ref is not None and ref.get("noise_health"):
    h = ref["noise_health"]
    f = lambda x: "n/a" if x is None else f"{x:.3g}"  # noqa: E731
    lines.append(
        f"CG-ALR (TOP), probe source: distance/noise (median) "
        f"{f(h['distance_over_noise'])}; the two probe halves' log-distance "
        f"series agree with correlation {f(h['halves_agreement'])} (healthy "
        f"fixed probe: ~0.9 or more; a fixed probe's ratio may sit below 1); "
        f"lag-1 autocorrelation of log distance "
        f"{f(h['lag1_autocorr_log_distance'])}.")
    t = ref.get("trace", {})
    if t:
      lines.append(f"gate over all steps and seeds: brake "
                   f"{t['fraction_brake']:.0%}, hold {t['fraction_hold']:.0%}, "
                   f"boost {t['fraction_boost']:.0%}; {report.GATE_CODES}.")
  lines.append(report.RED_MEANING)
  lines.append(f"output: {out / 'summary.json'}, {out / 'summary.md'}, "
               f"{out / 'curves.png'}, {out / 'cgalr_scale.png'}")
  lines.append(report.one_line_verdict(summary))
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(
      description="CG-ALR against SGD/Adam schedules, DoG and Prodigy.")
  parser.add_argument("--dataset", required=True,
                      choices=sorted(train_lib.CONFIGS))
  parser.add_argument("--seeds", type=int, default=5)
  parser.add_argument("--out", type=Path, required=True)
  parser.add_argument("--methods", default=",".join(
      methods_lib.DEFAULT_METHODS), help="comma-separated subset of: "
                      + ",".join(methods_lib.METHODS))
  parser.add_argument("--tune", action="store_true",
                      help="tune learning rates on the validation split and "
                      "store them in experiments/tuned.json")
  parser.add_argument("--tune-missing", action="store_true",
                      help="with --tune: keep learning rates already stored "
                      "for this dataset, tune only the missing ones (resume)")
  parser.add_argument("--tune-seeds", type=int, default=2)
  parser.add_argument("--grid", type=int, default=tuning.GRID_SIZE,
                      help="learning rates per tuning grid")
  parser.add_argument("--epochs", type=int, default=None)
  parser.add_argument("--arch", choices=("mlp", "cnn", "gcn"), default=None)
  parser.add_argument("--data-dir", default=None)
  parser.add_argument("--tuned-file", type=Path, default=tuning.TUNED_PATH)
  args = parser.parse_args(argv)
  names = [m.strip() for m in args.methods.split(",") if m.strip()]
  unknown = sorted(set(names) - set(methods_lib.METHODS))
  if unknown:
    parser.error(f"unknown methods {unknown}")
  summary = run(args.dataset, args.seeds, args.out, names, do_tune=args.tune,
                tune_missing=args.tune_missing, tune_seeds=args.tune_seeds,
                grid_size=args.grid,
                epochs=args.epochs, arch=args.arch, data_dir=args.data_dir,
                tuned_path=args.tuned_file)
  print(report.table(summary))
  print(explain(summary, args.out))


if __name__ == "__main__":
  main()

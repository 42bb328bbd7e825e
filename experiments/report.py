"""Collects benchmark summaries into the tables of experiments/README.md.

Run: ``python -m experiments.report experiments/results`` (one sub-folder per
dataset, each holding the ``summary.json`` of ``experiments.benchmark``).

Prints every dataset's table and the claim table: CG-ALR (TOP) against the
best SGD schedule, the best Adam schedule, DoG and its own ungated envelope.
"Best" is chosen by mean final *validation* accuracy (test data never pick a
baseline). A comparison is a win when RED's 95% CI lies below 0, a loss
when it lies above 0, and a tie otherwise.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from experiments import benchmark

ORDER = ("digits", "mnist1d", "mnist5k", "cora", "citeseer")
SGD_FAMILY = ("sgd_const", "sgd_step", "sgd_exp", "sgd_cosine", "plateau")
ADAM_FAMILY = ("adam_const", "adam_cosine")


def best_by_val(summary: dict, names) -> str:
  present = [n for n in names if n in summary["methods"]]
  return max(present, key=lambda n: np.mean(
      [v if v is not None else 0.0 for v in summary["methods"][n]["val_acc"]]))


def verdict(red: dict) -> str:
  if red["ci_high"] is not None and red["ci_high"] < 0:
    return "win"
  if red["ci_low"] is not None and red["ci_low"] > 0:
    return "loss"
  return "tie"


def claim_rows(summary: dict) -> list[str]:
  m = summary["methods"]["cgalr_top"]
  low, high = m["test_acc_ci"]
  rows = []
  for label, name in (("best SGD", best_by_val(summary, SGD_FAMILY)),
                      ("best Adam", best_by_val(summary, ADAM_FAMILY)),
                      ("DoG", "dog"), ("prodigy", "prodigy"),
                      ("RM envelope", "rm_envelope")):
    r = summary["red"][name]
    rows.append(
        f"| {summary['dataset']} | {m['test_acc_mean']:.4f} "
        f"[{low:.4f}, {high:.4f}] | {label}: {name} "
        f"({summary['methods'][name]['test_acc_mean']:.4f}) | "
        f"{r['mean']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}] | "
        f"{verdict(r)} |")
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("results", type=Path)
  args = parser.parse_args()
  summaries = []
  for name in ORDER:
    path = args.results / name / "summary.json"
    if path.exists():
      summaries.append(json.loads(path.read_text()))
  for s in summaries:
    print(benchmark.table(s))
  print("| dataset | cgalr_top test acc [95% CI] | baseline (its acc) | "
        "RED [95% CI] | verdict |")
  print("|---|---|---|---|---|")
  for s in summaries:
    if "cgalr_top" in s["methods"]:
      print("\n".join(claim_rows(s)))


if __name__ == "__main__":
  main()

"""Summaries, tables and plots of the experiments (reads results; no JAX).

* :func:`summarise` builds the ``summary.json`` object of
  ``experiments.benchmark`` from per-method numpy results;
  :func:`table` renders it; :func:`plot` draws ``curves.png`` and
  ``cgalr_scale.png``; :func:`noise_health` is the probe's health check.
* ``python -m experiments.report experiments/results`` (one sub-folder per
  dataset, each holding a ``summary.json``) prints, and writes to
  ``results/comparison.md``, every dataset's table, the claim table, the
  win/tie/loss table, what the gate did and the budget check (and draws
  ``results/convergence.png``). The claim table compares CG-ALR (TOP)
  against the best SGD schedule, the best Adam schedule, DoG, Prodigy, its
  own ungated envelope and the two timing controls. "Best" is chosen by mean final *validation* accuracy (test data
  never pick a baseline). A comparison is a win when RED's 95% CI lies
  below 0, a loss when it lies above 0, and a tie otherwise.

This module imports numpy, scipy (through ``stats``) and matplotlib only.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from experiments import stats

ORDER = ("digits", "mnist1d", "mnist5k", "mnist5k_cnn", "cora", "citeseer")
# The comparisons of the claim table: (label, method or family for "best").
CLAIMS = (("best SGD", "family:sgd"), ("best Adam", "family:adam"),
          ("DoG", "dog"), ("Prodigy", "prodigy"),
          ("RM envelope (ungated)", "rm_envelope"),
          ("shuffled-z control", "cgalr_shuffled"),
          ("open-loop replay", "cgalr_replay"))
REFERENCE = "cgalr_top"
GATE_CODES = "gate codes: -1 BRAKE (scale x brake), 0 HOLD, +1 BOOST (scale x boost)"
RED_MEANING = ("RED = (err_cgalr_top - err_base) / err_base per seed, paired; "
               "negative: CG-ALR (TOP) makes fewer test errors. win: 95% CI "
               "below 0, loss: above 0, tie: otherwise.")

# GateConfig's enter_z and exit_z, drawn on the z panel (this module imports
# no JAX; tests/test_experiments.py checks they match the library).
GATE_THRESHOLDS = (1.5, 0.5)


def finite_list(a) -> list:
  return [None if not math.isfinite(float(v)) else float(v)
          for v in np.ravel(a)]


def lag1(x) -> float:
  """Lag-1 autocorrelation of a series (NaN below 3 finite points)."""
  x = np.asarray(x, np.float64)
  x = x[np.isfinite(x)]
  if x.size < 3 or np.std(x[:-1]) == 0 or np.std(x[1:]) == 0:
    return float("nan")
  return float(np.corrcoef(x[:-1], x[1:])[0, 1])


def noise_health(measurements: Sequence[Mapping[str, np.ndarray]]) -> dict:
  """The noise-floor check of a CG-ALR run (DESIGN.md 2, Noise floor).

  Per run: the median of distance / noise over measurements, and the
  correlation of the log distance series of the even and the odd half (a
  fixed probe's halves agree, 0.9+; a batch stream's do not). Means over
  runs. Needs runs traced with ``noise=True``.
  """
  ratios, agree, acs = [], [], []
  for m in measurements:
    d, n = np.asarray(m["distance"]), np.asarray(m["noise"])
    ok = (d > 0) & (n > 0)
    if ok.any():
      ratios.append(float(np.median(d[ok] / n[ok])))
    e, o = np.asarray(m["even_distance"]), np.asarray(m["odd_distance"])
    ok2 = (e > 0) & (o > 0)
    if ok2.sum() >= 3:
      agree.append(float(np.corrcoef(np.log(e[ok2]), np.log(o[ok2]))[0, 1]))
    if (d > 0).sum() >= 3:
      acs.append(lag1(np.log(d[d > 0])))
  mean = lambda v: float(np.nanmean(v)) if v else None  # noqa: E731
  return {"distance_over_noise": mean(ratios), "halves_agreement": mean(agree),
          "lag1_autocorr_log_distance": mean(acs)}


def summarise(dataset: str, seeds: int, results: Mapping[str, dict],
              n_test: int) -> dict:
  """The ``summary.json`` object (the documented schema plus extra keys).

  ``results[name]`` holds numpy ``test_acc``, ``val_acc``, ``train_loss``
  (``[seeds, epochs]``), ``wall_s``, ``lr``, ``family`` and optionally
  ``tuning``, ``lr_from``, ``trace``, ``noise_health``.
  """
  out: dict[str, Any] = {"dataset": dataset, "seeds": seeds, "methods": {},
                         "red": {}}
  for name, r in results.items():
    test_final = r["test_acc"][:, -1]
    mean, low, high = stats.mean_ci(np.nan_to_num(test_final, nan=0.0))
    out["methods"][name] = {
        "family": r.get("family"),
        "test_acc": finite_list(test_final),
        "final_train_loss": finite_list(r["train_loss"][:, -1]),
        "wall_s": r["wall_s"],
        "lr": r["lr"],
        "val_acc": finite_list(r["val_acc"][:, -1]),
        "test_acc_mean": mean, "test_acc_ci": [low, high],
        "curve_test_acc": finite_list(np.nanmean(r["test_acc"], axis=0)),
        "curve_val_acc": finite_list(np.nanmean(r["val_acc"], axis=0)),
        "curve_train_loss": finite_list(np.nanmean(r["train_loss"], axis=0)),
    }
    for extra in ("tuning", "lr_from", "trace", "noise_health"):
      if extra in r:
        out["methods"][name][extra] = r[extra]
  if REFERENCE in results:
    ref = np.nan_to_num(results[REFERENCE]["test_acc"][:, -1], nan=0.0)
    for name, r in results.items():
      if name == REFERENCE:
        continue
      base = np.nan_to_num(r["test_acc"][:, -1], nan=0.0)
      out["red"][name] = stats.red(ref, base, floor=1.0 / n_test)
  return out


def trace_summary(scale: np.ndarray, z: np.ndarray, gate: np.ndarray) -> dict:
  """Seed-0 CG-ALR trace (downsampled to <= 1000 points) and gate counts."""
  n = scale.shape[1]
  every = max(1, math.ceil(n / 1000))
  return {
      "every": every,
      "scale": finite_list(scale[0, ::every]),
      "z": finite_list(z[0, ::every]),
      "gate": [int(g) for g in gate[0, ::every]],
      "final_scale": finite_list(scale[:, -1]),
      "fraction_brake": float(np.mean(gate == -1)),
      "fraction_boost": float(np.mean(gate == 1)),
      "fraction_hold": float(np.mean(gate == 0)),
  }


def _fmt(x: float | None, spec: str = ".4f") -> str:
  return "n/a" if x is None else format(x, spec)


def verdict(red: Mapping[str, Any]) -> str:
  if red["ci_high"] is not None and red["ci_high"] < 0:
    return "win"
  if red["ci_low"] is not None and red["ci_low"] > 0:
    return "loss"
  return "tie"


def table(summary: dict) -> str:
  """Markdown table: method, lr, test accuracy +- 95% CI, RED of cgalr_top."""
  lines = [f"### {summary['dataset']} ({summary['seeds']} seeds)", "",
           "| method | family | lr | test acc (mean ± 95% CI) | RED "
           "cgalr_top vs it [95% CI] | wall s |",
           "|---|---|---|---|---|---|"]
  for name, m in summary["methods"].items():
    low, high = m["test_acc_ci"]
    half = None if low is None else (high - low) / 2
    acc = f"{m['test_acc_mean']:.4f} ± {_fmt(half)}"
    lr = "—" if m["lr"] is None else f"{m['lr']:.3g}"
    r = summary["red"].get(name)
    red = "—" if r is None else (f"{r['mean']:+.3f} [{_fmt(r['ci_low'], '+.3f')},"
                                 f" {_fmt(r['ci_high'], '+.3f')}]")
    lines.append(f"| {name} | {m.get('family') or '—'} | {lr} | {acc} | "
                 f"{red} | {m['wall_s']:.0f} |")
  return "\n".join(lines) + "\n"


# Families of summaries written before summary.json recorded them.
_LEGACY_FAMILY = {"sgd_const": "sgd", "sgd_step": "sgd", "sgd_exp": "sgd",
                  "sgd_cosine": "sgd", "plateau": "sgd", "adam_const": "adam",
                  "adam_cosine": "adam", "dog": "free", "prodigy": "free",
                  "rm_envelope": "envelope"}


def best_by_val(summary: dict, family: str) -> str | None:
  present = [n for n, m in summary["methods"].items()
             if (m.get("family") or _LEGACY_FAMILY.get(n)) == family]
  if not present:
    return None
  return max(present, key=lambda n: np.mean(
      [v if v is not None else 0.0 for v in summary["methods"][n]["val_acc"]]))


def claim_targets(summary: dict) -> list[tuple[str, str | None]]:
  """``(label, method)`` of each claim comparison (None: not run)."""
  out = []
  for label, target in CLAIMS:
    name = (best_by_val(summary, target.split(":")[1])
            if target.startswith("family:") else target)
    out.append((label, name if name in summary["red"] else None))
  return out


def claim_rows(summary: dict) -> list[str]:
  m = summary["methods"][REFERENCE]
  low, high = m["test_acc_ci"]
  rows = []
  for label, name in claim_targets(summary):
    if name is None:
      continue
    r = summary["red"][name]
    rows.append(
        f"| {summary['dataset']} | {m['test_acc_mean']:.4f} "
        f"[{_fmt(low)}, {_fmt(high)}] | {label}: {name} "
        f"({summary['methods'][name]['test_acc_mean']:.4f}) | "
        f"{r['mean']:+.3f} [{_fmt(r['ci_low'], '+.3f')}, "
        f"{_fmt(r['ci_high'], '+.3f')}] | {verdict(r)} |")
  return rows


def win_tie_loss(summaries: Sequence[dict]) -> str:
  """Markdown: one row per claim comparison, one column per dataset (the
  verdict and RED's mean), and the win/tie/loss count."""
  present = [s for s in summaries if REFERENCE in s["methods"]]
  head = "| CG-ALR (TOP) vs | " + " | ".join(
      s["dataset"] for s in present) + " | win/tie/loss |"
  lines = [head, "|---" * (len(present) + 2) + "|"]
  for k, (label, _) in enumerate(CLAIMS):
    cells, counts = [], {"win": 0, "tie": 0, "loss": 0}
    for s in present:
      name = claim_targets(s)[k][1]
      if name is None:
        cells.append("not run")
        continue
      r = s["red"][name]
      v = verdict(r)
      counts[v] += 1
      who = f" ({name})" if label.startswith("best") else ""
      cells.append(f"{v} {r['mean']:+.3f}{who}")
    lines.append(f"| {label} | " + " | ".join(cells) +
                 f" | {counts['win']}/{counts['tie']}/{counts['loss']} |")
  return "\n".join(lines) + "\n"


BASELINE_FAMILIES = ("sgd", "adam", "free", "envelope")


def convergence(summary: dict) -> dict:
  """Is the budget long enough? The best baseline (highest mean final
  validation accuracy among SGD, Adam, DoG/Prodigy and the envelope) and
  the best constant-rate SGD and Adam runs: mean validation curve over
  seeds, its mean over the epochs in [80%, 90%) and [90%, 100%] of training
  and the change between them (flat: |change| < 0.005, half a point)."""
  out = {}
  best = max((n for n, m in summary["methods"].items()
              if (m.get("family") or _LEGACY_FAMILY.get(n))
              in BASELINE_FAMILIES),
             key=lambda n: np.mean([v or 0.0 for v in
                                    summary["methods"][n]["val_acc"]]),
             default=None)
  for label, name in (("best baseline", best), ("sgd_const", "sgd_const"),
                      ("adam_const", "adam_const")):
    if name not in summary["methods"]:
      continue
    v = np.array([np.nan if x is None else x for x in
                  summary["methods"][name]["curve_val_acc"]])
    n = len(v)
    a, b = v[int(0.8 * n):int(0.9 * n)], v[int(0.9 * n):]
    change = float(np.nanmean(b) - np.nanmean(a))
    out[label] = {"method": name, "val_80_90": float(np.nanmean(a)),
                  "val_90_100": float(np.nanmean(b)), "change": change,
                  "flat": abs(change) < 0.005}
  return out


def convergence_table(summaries: Sequence[dict]) -> str:
  lines = ["| dataset | budget | best baseline (by val) | val acc, 80-90% / "
           "90-100% of training | change | flat | sgd_const change | "
           "adam_const change |", "|---|---|---|---|---|---|---|---|"]
  for s in summaries:
    c = convergence(s)
    if "best baseline" not in c:
      continue
    cfg = s.get("config", {})
    budget = (f"{cfg.get('epochs')} x {cfg.get('steps_per_epoch')} = "
              f"{cfg.get('epochs', 0) * cfg.get('steps_per_epoch', 0)} "
              "updates")
    b = c["best baseline"]
    extra = [f"{c[k]['change']:+.4f}" if k in c else "—"
             for k in ("sgd_const", "adam_const")]
    lines.append(f"| {s['dataset']} | {budget} | {b['method']} | "
                 f"{b['val_80_90']:.4f} / {b['val_90_100']:.4f} | "
                 f"{b['change']:+.4f} | {'yes' if b['flat'] else 'NO'} | "
                 + " | ".join(extra) + " |")
  return "\n".join(lines) + "\n"


def plot_convergence(summaries: Sequence[dict], out: Path) -> None:
  """``convergence.png``: per dataset, the mean validation curve of the
  best baseline and of the best SGD and Adam schedules, last 20% shaded."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  summaries = [s for s in summaries if "best baseline" in convergence(s)]
  if not summaries:
    return
  fig, axes = plt.subplots(1, len(summaries),
                           figsize=(3.6 * len(summaries), 3.2), squeeze=False)
  for ax, s in zip(axes[0], summaries):
    spe = s.get("config", {}).get("steps_per_epoch", 1)
    names = {convergence(s)["best baseline"]["method"],
             best_by_val(s, "sgd"), best_by_val(s, "adam"), "sgd_const",
             "rm_envelope", REFERENCE}
    for name in sorted(n for n in names if n in s["methods"]):
      v = np.array([np.nan if x is None else x
                    for x in s["methods"][name]["curve_val_acc"]])
      ax.plot(np.arange(1, len(v) + 1) * spe, v, label=name,
              linewidth=2 if name == REFERENCE else 1)
    n = len(v) * spe
    ax.axvspan(0.8 * n, n, color="0.9")
    top = max(np.nanmax(s["methods"][k]["curve_val_acc"]) for k in names
              if k in s["methods"])
    ax.set_ylim(top - 0.12, top + 0.01)
    ax.set_title(f"{s['dataset']} ({s['seeds']} seeds)")
    ax.set_xlabel("update")
    ax.set_ylabel("validation acc (mean)")
    ax.legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(out / "convergence.png", dpi=100)
  plt.close(fig)


def gate_table(summaries: Sequence[dict]) -> str:
  """What the gate did: fractions of updates in BRAKE / HOLD / BOOST over
  all seeds, the final scale over seeds, and the probe's health."""
  lines = ["| dataset | method | brake / hold / boost | final scale median "
           "[min, max] | lag-1 autocorr log d |", "|---|---|---|---|---|"]
  for s in summaries:
    for name, m in s["methods"].items():
      t = m.get("trace")
      if not t:
        continue
      fs = np.array([v for v in t["final_scale"] if v is not None])
      h = m.get("noise_health") or {}
      ac = h.get("lag1_autocorr_log_distance")
      lines.append(
          f"| {s['dataset']} | {name} | {t['fraction_brake']:.2f} / "
          f"{t['fraction_hold']:.2f} / {t['fraction_boost']:.2f} | "
          f"{np.median(fs):.2f} [{fs.min():.2f}, {fs.max():.2f}] | "
          f"{_fmt(ac, '.2f')} |")
  return "\n".join(lines) + "\n"


def load_summaries(results: Path) -> list[dict]:
  out = []
  for name in ORDER:
    path = results / name / "summary.json"
    if path.exists():
      out.append(json.loads(path.read_text()))
  return out


def comparison_text(results: Path) -> str:
  """Every dataset's table, the claim table and the win/tie/loss table."""
  summaries = load_summaries(results)
  parts = [table(s) for s in summaries]
  parts.append("### CG-ALR (TOP) against each baseline, paired by seed\n\n"
               + RED_MEANING + "\n\n"
               "| dataset | cgalr_top test acc [95% CI] | baseline (its acc) | "
               "RED [95% CI] | verdict |\n|---|---|---|---|---|\n" +
               "\n".join(r for s in summaries if REFERENCE in s["methods"]
                         for r in claim_rows(s)) + "\n")
  parts.append("### Win / tie / loss (RED's 95% CI below / across / above "
               "0; the cell's number is RED's mean)\n\n"
               + win_tie_loss(summaries))
  parts.append("### What the gate did (all seeds)\n\n" + gate_table(summaries))
  parts.append("### Budgets: is the best baseline flat over the last 20%?"
               "\n\n" + convergence_table(summaries))
  plot_convergence(summaries, results)
  return "\n".join(parts)


def one_line_verdict(summary: dict) -> str:
  """What the gate bought on this run, in one line."""
  red = summary["red"]
  if REFERENCE not in summary["methods"]:
    return "verdict: cgalr_top was not run."
  parts = []
  for name, label in (("rm_envelope", "its ungated envelope"),
                      ("cgalr_shuffled", "the shuffled-z control"),
                      ("cgalr_replay", "the open-loop replay")):
    if name in red:
      parts.append(f"{verdict(red[name])} vs {label} "
                   f"(RED {red[name]['mean']:+.3f})")
  if not parts:
    return "verdict: no envelope or control in this run to judge the gate."
  return ("verdict: CG-ALR (TOP) " + "; ".join(parts) + f" over "
          f"{summary['seeds']} seeds" + (
              " -- too few seeds for a claim (the protocol asks for >= 10)."
              if summary["seeds"] < 10 else "."))


def plot(summary: dict, results: Mapping[str, dict], out: Path) -> None:
  """``curves.png`` and, with gated CG-ALR runs, ``cgalr_scale.png``."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, ax = plt.subplots(figsize=(8, 5))
  colours = plt.get_cmap("tab20").colors
  for i, (name, m) in enumerate(summary["methods"].items()):
    curve = np.array([np.nan if v is None else v for v in m["curve_test_acc"]])
    style = "-" if name.startswith("cgalr") else "--"
    ax.plot(np.arange(1, len(curve) + 1), curve, style, label=name,
            color=colours[(2 * i) % 20 + (2 * i) // 20],
            linewidth=2.2 if name == REFERENCE else 1.2)
  ax.set_xlabel("epoch")
  ax.set_ylabel(f"test accuracy (mean of {summary['seeds']} seeds)")
  ax.set_title(f"{summary['dataset']}: test accuracy")
  finals = [m["test_acc_mean"] for m in summary["methods"].values()]
  ax.set_ylim(max(0.0, min(finals) - 0.15), min(1.0, max(finals) + 0.03))
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(out / "curves.png", dpi=110)
  plt.close(fig)

  gated = [n for n in results if "scale" in results[n]]
  if not gated:
    return
  fig, axes = plt.subplots(4, len(gated), figsize=(6 * len(gated), 9),
                           sharex="col", squeeze=False)
  for j, name in enumerate(gated):
    r = results[name]
    steps = np.arange(r["scale"].shape[1])
    for i in range(r["scale"].shape[0]):
      axes[0, j].plot(steps, r["scale"][i], alpha=0.9 if i == 0 else 0.3,
                      linewidth=1.2 if i == 0 else 0.7,
                      label={0: "seed 0", 1: "other seeds"}.get(i))
    axes[0, j].axhline(1.0, color="grey", linewidth=0.5)
    axes[0, j].legend(fontsize=7)
    d, n = r["distance"][0], r["noise"][0]
    axes[1, j].semilogy(steps, np.where(d > 0, d, np.nan), linewidth=0.8,
                        label="distance")
    if np.any(n > 0):
      axes[1, j].semilogy(steps, np.where(n > 0, n, np.nan), linewidth=0.8,
                          label="noise floor")
    axes[1, j].legend(fontsize=7)
    axes[2, j].plot(steps, r["z"][0], linewidth=0.7, label="z")
    enter_z, exit_z = GATE_THRESHOLDS
    for level, style, label in ((enter_z, "--", f"enter |z| = {enter_z:g}"),
                                (exit_z, ":", f"exit |z| = {exit_z:g}")):
      for sign in (1, -1):
        axes[2, j].axhline(sign * level, color="grey", linestyle=style,
                           linewidth=0.7, label=label if sign > 0 else None)
    axes[2, j].legend(fontsize=7)
    axes[3, j].step(steps, r["gate"][0], where="post", linewidth=0.7)
    axes[0, j].set_title(f"{summary['dataset']} {name}")
    axes[0, j].set_ylabel("scale (all seeds)")
    axes[1, j].set_ylabel("distance (seed 0)")
    axes[2, j].set_ylabel("z (seed 0)")
    axes[3, j].set_ylabel("gate (seed 0)")
    axes[3, j].set_yticks([-1, 0, 1], ["brake", "hold", "boost"])
    axes[3, j].set_xlabel("step")
  fig.tight_layout()
  fig.savefig(out / "cgalr_scale.png", dpi=110)
  plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("results", type=Path)
  args = parser.parse_args(argv)
  text = comparison_text(args.results)
  (args.results / "comparison.md").write_text(text)
  print(text)


if __name__ == "__main__":
  main()

"""The paper's comparison on one dataset (DESIGN.md section 5).

Run::

  python -m experiments.benchmark --dataset digits --seeds 5 --out runs/digits
  python -m experiments.benchmark --dataset cora --seeds 5 --out runs/cora --tune

For each method it trains ``--seeds`` seeds and writes ``OUT/summary.json``,
``OUT/summary.md`` (the table) and plots ``OUT/curves.png`` (mean test
accuracy per epoch, per method) and ``OUT/cgalr_scale.png`` (CG-ALR's scale,
z and gate over training).

One seed fixes the initialisation and the batch order, so seed s of every
method sees the same start and the same batches (RED is paired by seed).
All runs of one method (several seeds, or seeds x learning rates when
tuning) are one compiled program: ``jax.vmap`` of a whole epoch (a
``lax.scan`` over its steps), epochs in a Python loop for the progress bar.
The learning rate is a per-run array: every tuned method is linear in its
base learning rate (see ``methods.py``), so the optimiser is built with
``lr = 1`` and its updates are multiplied by the run's ``lr``.

Learning rates: ``--tune`` picks, for every tuned method, the base rate from
the same-size grid (``methods.grid``: ``--grid`` values log-spaced over two
decades around the method family's centre) by validation accuracy (mean
over ``--tune-seeds`` seeds, which are disjoint from the final seeds, of the
validation accuracy averaged over the last 10% of epochs), and stores it in
``experiments/tuned.json``. Without ``--tune`` the stored choice is used;
a missing entry falls back to the grid centre with a warning. Test data are
never used for a choice. Reported test accuracy is the final epoch's.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental import sparse as jsparse
import numpy as np
import optax
import scipy.sparse as sp

import cgalr_jax
from cgalr_jax.flax import apply_with_activations
from experiments import data as data_lib
from experiments import methods as methods_lib
from experiments import models as models_lib
from experiments import stats

TUNED_PATH = Path(__file__).resolve().with_name("tuned.json")
TUNE_SEED_OFFSET = 1000  # tuning seeds are 1000, 1001, ...: disjoint from 0..


@dataclasses.dataclass(frozen=True)
class Config:
  """Training configuration of one dataset."""

  epochs: int
  batch_size: int | None  # None: full batch (graphs)
  steps_per_epoch: int | None = None  # graphs: full-batch steps per "epoch"
  weight_decay: float = 0.0  # L2 on kernels, added to the loss
  arch: str | None = None


# Budgets chosen so the full comparison fits on 2 CPU cores (README.md).
CONFIGS = {
    "digits": Config(epochs=30, batch_size=64),
    "mnist5k": Config(epochs=20, batch_size=128),
    "mnist1d": Config(epochs=30, batch_size=128),
    "cora": Config(epochs=40, batch_size=None, steps_per_epoch=5,
                   weight_decay=5e-4),
    "citeseer": Config(epochs=40, batch_size=None, steps_per_epoch=5,
                       weight_decay=5e-4),
}


@dataclasses.dataclass
class Task:
  """A dataset, its model and the training loop's static sizes."""

  name: str
  model: nn.Module
  arrays: dict[str, jax.Array]
  is_graph: bool
  epochs: int
  steps_per_epoch: int
  batch_size: int
  weight_decay: float
  n_test: int

  @property
  def total_steps(self) -> int:
    return self.epochs * self.steps_per_epoch


def make_task(dataset: str, *, epochs: int | None = None,
              arch: str | None = None, data_dir: str | None = None,
              dataset_obj: data_lib.Dataset | None = None) -> Task:
  """Loads ``dataset`` and pairs it with its model and budget."""
  cfg = CONFIGS[dataset]
  ds = dataset_obj if dataset_obj is not None else data_lib.load(
      dataset, data_dir=data_dir)
  model = models_lib.for_dataset(dataset, ds.num_classes,
                                 arch=arch or cfg.arch)
  epochs = int(epochs or cfg.epochs)
  if ds.is_graph:
    arrays = {k: jnp.asarray(getattr(ds, k)) for k in
              ("y", "train_idx", "val_idx", "test_idx")}
    # Same matrices as sparse BCOO: ~1% (features) and ~0.2% (adjacency)
    # dense, so the GCN step is ~20x cheaper on CPU.
    # (Built through scipy: BCOO.fromdense would compile a jitted nonzero.)
    arrays["x"] = jsparse.BCOO.from_scipy_sparse(sp.csr_matrix(ds.x))
    arrays["adj"] = jsparse.BCOO.from_scipy_sparse(sp.csr_matrix(ds.adj))
    return Task(dataset, model, arrays, True, epochs,
                cfg.steps_per_epoch or 1, len(ds.train_idx),
                cfg.weight_decay, len(ds.test_idx))
  arrays = {k: jnp.asarray(getattr(ds, k)) for k in
            ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")}
  n_train = len(ds.y_train)
  batch = min(cfg.batch_size, n_train)
  return Task(dataset, model, arrays, False, epochs, n_train // batch, batch,
              cfg.weight_decay, len(ds.y_test))


# ----------------------------------------------------------------------------
# Training: all runs of one method in one compiled program.


def _accuracy(logits, y):
  return jnp.mean(jnp.argmax(logits, -1) == y)


def train_runs(task: Task, method: str, lrs: Sequence[float],
               seeds: Sequence[int], *, progress: Any = None,
               trace: bool = True) -> dict[str, np.ndarray]:
  """Trains ``len(seeds)`` runs of ``method`` (run i: ``lrs[i]``, ``seeds[i]``).

  Returns numpy arrays: ``val_acc``, ``test_acc``, ``train_loss`` of shape
  ``[runs, epochs]`` (train loss: mean cross-entropy over the epoch's
  steps), and for CG-ALR methods (when ``trace``) ``scale``, ``z``,
  ``gate``, ``distance`` of shape ``[runs, total_steps]``.
  """
  spec = methods_lib.METHODS[method]
  opt = methods_lib.build(method, 1.0, task.total_steps, task.steps_per_epoch)
  model, arr = task.model, task.arrays
  want_trace = trace and spec.uses_activations

  def forward(params, x, *, train, rng=None, adj=None):
    kwargs = {"rngs": {"dropout": rng}} if rng is not None else {}
    args = (x, adj) if task.is_graph else (x,)
    return apply_with_activations(model, {"params": params}, *args,
                                  train=train, **kwargs)

  def init_run(seed):
    key = jax.random.key(seed)
    if task.is_graph:
      params = model.init(key, arr["x"], arr["adj"])["params"]
    else:
      params = model.init(key, arr["x_train"][:1])["params"]
    return params, opt.init(params)

  def loss_fn(params, arrays, batch_idx, rng):
    if task.is_graph:
      logits, acts = forward(params, arrays["x"], train=True, rng=rng,
                             adj=arrays["adj"])
      logits, y = logits[arrays["train_idx"]], arrays["y"][arrays["train_idx"]]
    else:
      logits, acts = forward(params, arrays["x_train"][batch_idx], train=True)
      y = arrays["y_train"][batch_idx]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    loss = ce
    if task.weight_decay:
      loss = loss + 0.5 * task.weight_decay * models_lib.l2_penalty(params)
    return loss, (ce, acts)

  def train_step(carry, batch, arrays):
    params, opt_state, lr, key = carry
    batch_idx, step = batch
    rng = None
    if task.is_graph:  # dropout
      rng = jax.random.fold_in(jax.random.wrap_key_data(key), step)
    (loss, (ce, acts)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, arrays, batch_idx, rng)
    extra = {}
    if spec.uses_activations:
      extra["activations"] = acts
    if spec.uses_value:
      extra["value"] = loss
    updates, opt_state = opt.update(grads, opt_state, params, **extra)
    updates = jax.tree.map(lambda u: lr.astype(u.dtype) * u, updates)
    params = optax.apply_updates(params, updates)
    out = {"ce": ce}
    if want_trace:
      diag = cgalr_jax.diagnostics(opt_state)
      out.update({k: diag[k] for k in ("scale", "z", "gate", "distance")})
    return (params, opt_state, lr, key), out

  def evaluate(params, arrays):
    if task.is_graph:
      logits, _ = forward(params, arrays["x"], train=False, adj=arrays["adj"])
      y = arrays["y"]
      return (_accuracy(logits[arrays["val_idx"]], y[arrays["val_idx"]]),
              _accuracy(logits[arrays["test_idx"]], y[arrays["test_idx"]]))
    val_logits, _ = forward(params, arrays["x_val"], train=False)
    test_logits, _ = forward(params, arrays["x_test"], train=False)
    return (_accuracy(val_logits, arrays["y_val"]),
            _accuracy(test_logits, arrays["y_test"]))

  def batch_orders(rngs):
    """``[runs, steps_per_epoch, batch]`` example indices, from each seed."""
    spe, bs = task.steps_per_epoch, task.batch_size
    if task.is_graph:  # full batch: unused
      return np.zeros((len(rngs), spe, 1), np.int32)
    n_train = int(arr["y_train"].shape[0])
    return np.stack([r.permutation(n_train)[:spe * bs].reshape(spe, bs)
                     for r in rngs]).astype(np.int32)

  def one_epoch(carry, epoch, batches, arrays):
    spe = task.steps_per_epoch
    steps = epoch * spe + jnp.arange(spe)
    carry, outs = jax.lax.scan(
        lambda c, b: train_step(c, b, arrays), carry, (batches, steps))
    val_acc, test_acc = evaluate(carry[0], arrays)
    metrics = {"val_acc": val_acc, "test_acc": test_acc,
               "train_loss": jnp.mean(outs.pop("ce"))}
    return carry, metrics, outs

  run_epoch = jax.jit(jax.vmap(one_epoch, in_axes=(0, None, 0, None)),
                      donate_argnums=0)

  # Initialisation runs eagerly, one seed at a time: jit(vmap(model.init))
  # costs seconds of XLA compile on CPU for a millisecond of work.
  inits = [init_run(int(s)) for s in seeds]
  params, opt_state = jax.tree.map(lambda *xs: jnp.stack(xs), *inits)
  keys = jnp.stack([jax.random.key_data(jax.random.key(int(s)))
                    for s in seeds])
  carry = (params, opt_state, jnp.asarray(lrs, jnp.float32), keys)
  orders = [np.random.default_rng([int(s), 1]) for s in seeds]
  history: dict[str, list] = {}
  traces: dict[str, list] = {}
  for epoch in range(task.epochs):
    carry, metrics, outs = run_epoch(carry, jnp.int32(epoch),
                                     batch_orders(orders), arr)
    for k, v in metrics.items():
      history.setdefault(k, []).append(np.asarray(v))
    for k, v in outs.items():
      traces.setdefault(k, []).append(np.asarray(v))
    if progress is not None:
      progress.update(1)
  result = {k: np.stack(v, axis=1) for k, v in history.items()}
  result.update({k: np.concatenate(v, axis=1) for k, v in traces.items()})
  return result


# ----------------------------------------------------------------------------
# Tuning and the stored choices.


@contextlib.contextmanager
def _locked(path: Path):
  """Exclusive lock for ``path`` (several datasets may tune at once).

  The lock file lives in the temp directory, not in the repository.
  """
  digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:16]
  lock = Path(tempfile.gettempdir()) / f"cgalr_tuned_{digest}.lock"
  with open(lock, "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def read_tuned(path: Path = TUNED_PATH) -> dict[str, dict[str, float]]:
  if not path.exists():
    return {}
  return json.loads(path.read_text())


def store_tuned(dataset: str, choices: dict[str, float],
                path: Path = TUNED_PATH) -> None:
  """Merges ``choices`` into ``path`` under ``dataset`` (read-modify-write)."""
  with _locked(path):
    tuned = read_tuned(path)
    tuned.setdefault(dataset, {}).update(choices)
    text = json.dumps({d: dict(sorted(v.items())) for d, v in
                       sorted(tuned.items())}, indent=2) + "\n"
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _has_stored(dataset: str, method: str, path: Path) -> bool:
  return method in read_tuned(path).get(dataset, {})


def stored_lr(dataset: str, method: str, path: Path = TUNED_PATH) -> float:
  """The stored learning rate, or the grid centre with a warning."""
  try:
    return float(read_tuned(path)[dataset][method])
  except KeyError:
    centre = methods_lib.METHODS[method].centre
    warnings.warn(f"no tuned learning rate for {dataset}/{method} in {path}; "
                  f"using the grid centre {centre:g}. Run with --tune.",
                  stacklevel=2)
    return centre


def tune(task: Task, method: str, grid: Sequence[float], n_seeds: int, *,
         progress: Any = None) -> tuple[float, list[float]]:
  """``(best lr, mean validation score per grid value)``."""
  seeds = [TUNE_SEED_OFFSET + s for s in range(n_seeds)]
  lrs = [lr for lr in grid for _ in seeds]
  runs = [s for _ in grid for s in seeds]
  res = train_runs(task, method, lrs, runs, progress=progress, trace=False)
  tail = max(1, task.epochs // 10)
  score = np.nan_to_num(res["val_acc"][:, -tail:].mean(axis=1), nan=0.0)
  per_lr = score.reshape(len(grid), n_seeds).mean(axis=1)
  return float(grid[int(np.argmax(per_lr))]), [float(s) for s in per_lr]


# ----------------------------------------------------------------------------
# Reports.


def _finite_list(a: np.ndarray) -> list:
  return [None if not math.isfinite(float(v)) else float(v) for v in a]


def summarise(dataset: str, seeds: int, results: dict[str, dict],
              n_test: int) -> dict:
  """The ``summary.json`` object (the documented schema plus extra keys)."""
  out: dict[str, Any] = {"dataset": dataset, "seeds": seeds, "methods": {},
                         "red": {}}
  for name, r in results.items():
    test_final = r["test_acc"][:, -1]
    mean, low, high = stats.mean_ci(np.nan_to_num(test_final, nan=0.0))
    out["methods"][name] = {
        "test_acc": _finite_list(test_final),
        "final_train_loss": _finite_list(r["train_loss"][:, -1]),
        "wall_s": r["wall_s"],
        "lr": r["lr"],
        "val_acc": _finite_list(r["val_acc"][:, -1]),
        "test_acc_mean": mean, "test_acc_ci": [low, high],
        "curve_test_acc": _finite_list(np.nanmean(r["test_acc"], axis=0)),
        "curve_val_acc": _finite_list(np.nanmean(r["val_acc"], axis=0)),
        "curve_train_loss": _finite_list(np.nanmean(r["train_loss"], axis=0)),
    }
    for extra in ("tuning", "lr_from"):
      if extra in r:
        out["methods"][name][extra] = r[extra]
  if "cgalr_top" in results:
    ref = np.nan_to_num(results["cgalr_top"]["test_acc"][:, -1], nan=0.0)
    for name, r in results.items():
      if name == "cgalr_top":
        continue
      base = np.nan_to_num(r["test_acc"][:, -1], nan=0.0)
      out["red"][name] = stats.red(ref, base, floor=1.0 / n_test)
  return out


def _fmt(x: float | None, spec: str = ".4f") -> str:
  return "n/a" if x is None else format(x, spec)


def table(summary: dict) -> str:
  """Markdown table: method, lr, test accuracy +- 95% CI, RED of cgalr_top."""
  lines = [f"### {summary['dataset']} ({summary['seeds']} seeds)", "",
           "| method | lr | test acc (mean ± 95% CI) | RED cgalr_top vs it "
           "[95% CI] | wall s |",
           "|---|---|---|---|---|"]
  for name, m in summary["methods"].items():
    low, high = m["test_acc_ci"]
    half = None if low is None else (high - low) / 2
    acc = f"{m['test_acc_mean']:.4f} ± {_fmt(half)}"
    lr = "—" if m["lr"] is None else f"{m['lr']:.3g}"
    r = summary["red"].get(name)
    red = "—" if r is None else (f"{r['mean']:+.3f} [{_fmt(r['ci_low'], '+.3f')},"
                                 f" {_fmt(r['ci_high'], '+.3f')}]")
    lines.append(f"| {name} | {lr} | {acc} | {red} | {m['wall_s']:.0f} |")
  return "\n".join(lines) + "\n"


def plot(summary: dict, results: dict[str, dict], out: Path) -> None:
  """``curves.png`` and, with CG-ALR runs, ``cgalr_scale.png``."""
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
            linewidth=2.2 if name == "cgalr_top" else 1.2)
  ax.set_xlabel("epoch")
  ax.set_ylabel(f"test accuracy (mean of {summary['seeds']} seeds)")
  ax.set_title(f"{summary['dataset']}: test accuracy")
  finals = [m["test_acc_mean"] for m in summary["methods"].values()]
  ax.set_ylim(max(0.0, min(finals) - 0.15), min(1.0, max(finals) + 0.03))
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(out / "curves.png", dpi=110)
  plt.close(fig)

  gated = [n for n in ("cgalr_top", "cgalr_wd") if n in results
           and "scale" in results[n]]
  if not gated:
    return
  fig, axes = plt.subplots(3, len(gated), figsize=(6 * len(gated), 7),
                           sharex=True, squeeze=False)
  for j, name in enumerate(gated):
    r = results[name]
    steps = np.arange(r["scale"].shape[1])
    for i in range(r["scale"].shape[0]):
      axes[0, j].plot(steps, r["scale"][i], alpha=0.9 if i == 0 else 0.3,
                      linewidth=1.2 if i == 0 else 0.7)
    axes[1, j].plot(steps, r["z"][0], linewidth=0.7)
    axes[1, j].axhline(1.0, color="r", linewidth=0.5)
    axes[1, j].axhline(-1.0, color="g", linewidth=0.5)
    axes[2, j].step(steps, r["gate"][0], where="post", linewidth=0.7)
    axes[0, j].set_title(f"{summary['dataset']} {name}")
    axes[0, j].set_ylabel("scale (all seeds)")
    axes[1, j].set_ylabel("z (seed 0)")
    axes[2, j].set_ylabel("gate (seed 0)")
    axes[2, j].set_yticks([-1, 0, 1], ["brake", "hold", "boost"])
    axes[2, j].set_xlabel("step")
  fig.tight_layout()
  fig.savefig(out / "cgalr_scale.png", dpi=110)
  plt.close(fig)


def _trace_summary(r: dict) -> dict:
  """Seed-0 CG-ALR trace (downsampled to <= 1000 points) and gate counts."""
  n = r["scale"].shape[1]
  every = max(1, math.ceil(n / 1000))
  gate = r["gate"]
  return {
      "every": every,
      "scale": _finite_list(r["scale"][0, ::every]),
      "z": _finite_list(r["z"][0, ::every]),
      "gate": [int(g) for g in gate[0, ::every]],
      "final_scale": _finite_list(r["scale"][:, -1]),
      "fraction_brake": float(np.mean(gate == -1)),
      "fraction_boost": float(np.mean(gate == 1)),
      "fraction_hold": float(np.mean(gate == 0)),
  }


def run(dataset: str, seeds: int, out: Path, method_names: Sequence[str], *,
        do_tune: bool = False, tune_missing: bool = False,
        tune_seeds: int = 2, grid_size: int = 5,
        epochs: int | None = None, arch: str | None = None,
        data_dir: str | None = None, tuned_path: Path = TUNED_PATH,
        dataset_obj: data_lib.Dataset | None = None,
        quiet: bool = False) -> dict:
  """The whole comparison on one dataset; returns the summary."""
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel

  task = make_task(dataset, epochs=epochs, arch=arch, data_dir=data_dir,
                   dataset_obj=dataset_obj)
  out.mkdir(parents=True, exist_ok=True)
  specs = [methods_lib.METHODS[m] for m in method_names]
  n_tuned = sum(s.tuned and s.lr_from is None and not (
      tune_missing and _has_stored(dataset, s.name, tuned_path))
                for s in specs) if do_tune else 0
  bar = tqdm(total=(len(specs) + n_tuned) * task.epochs, unit="epoch",
             disable=quiet, desc=dataset, file=sys.stderr)
  results: dict[str, dict] = {}
  # A method whose lr comes from another's runs after it.
  specs.sort(key=lambda s: s.lr_from is not None)
  for spec in specs:
    entry: dict[str, Any] = {}
    if not spec.tuned:
      lr = None
    elif spec.lr_from is not None:
      lr = stored_lr(dataset, spec.lr_from, tuned_path)
      entry["lr_from"] = spec.lr_from
    elif do_tune and not (tune_missing and _has_stored(dataset, spec.name,
                                                      tuned_path)):
      bar.set_description(f"{dataset} tune {spec.name}")
      t0 = time.perf_counter()
      grid = methods_lib.grid(spec.name, grid_size)
      lr, scores = tune(task, spec.name, grid, tune_seeds, progress=bar)
      store_tuned(dataset, {spec.name: lr}, tuned_path)
      entry["tuning"] = {"grid": grid, "val_score": scores,
                         "seeds": tune_seeds,
                         "wall_s": time.perf_counter() - t0}
    else:
      lr = stored_lr(dataset, spec.name, tuned_path)
    bar.set_description(f"{dataset} {spec.name}")
    t0 = time.perf_counter()
    res = train_runs(task, spec.name, [1.0 if lr is None else lr] * seeds,
                     list(range(seeds)), progress=bar)
    res["wall_s"] = time.perf_counter() - t0
    res["lr"] = lr
    res.update(entry)
    results[spec.name] = res
  bar.close()
  results = {n: results[n] for n in method_names}
  summary = summarise(dataset, seeds, results, task.n_test)
  summary["config"] = {"epochs": task.epochs,
                       "steps_per_epoch": task.steps_per_epoch,
                       "batch_size": task.batch_size,
                       "weight_decay": task.weight_decay,
                       "model": repr(task.model).split("\n")[0],
                       "tuned": do_tune, "tune_missing": tune_missing,
                       "tune_seeds": tune_seeds,
                       "grid_size": grid_size}
  for name in ("cgalr_top", "cgalr_wd"):
    if name in results and "scale" in results[name]:
      summary["methods"][name]["trace"] = _trace_summary(results[name])
  (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
  (out / "summary.md").write_text(table(summary))
  plot(summary, results, out)
  return summary


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(
      description="CG-ALR against SGD/Adam schedules, DoG and Prodigy.")
  parser.add_argument("--dataset", required=True, choices=sorted(CONFIGS))
  parser.add_argument("--seeds", type=int, default=5)
  parser.add_argument("--out", type=Path, required=True)
  parser.add_argument("--methods", default=",".join(methods_lib.METHODS),
                      help="comma-separated subset of: "
                      + ",".join(methods_lib.METHODS))
  parser.add_argument("--tune", action="store_true",
                      help="tune learning rates on the validation split and "
                      "store them in experiments/tuned.json")
  parser.add_argument("--tune-missing", action="store_true",
                      help="with --tune: keep learning rates already stored "
                      "for this dataset, tune only the missing ones (resume)")
  parser.add_argument("--tune-seeds", type=int, default=2)
  parser.add_argument("--grid", type=int, default=5,
                      help="learning rates per tuning grid")
  parser.add_argument("--epochs", type=int, default=None)
  parser.add_argument("--arch", choices=("mlp", "cnn", "gcn"), default=None)
  parser.add_argument("--data-dir", default=None)
  parser.add_argument("--tuned-file", type=Path, default=TUNED_PATH)
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
  print(table(summary))


if __name__ == "__main__":
  main()

"""Learning-rate grids, the tuned-rate store and seed offsets (DESIGN.md 5).

* :func:`grid`: ``size`` (4) log-spaced rates over ``decades`` (1.5) around
  the method family's centre (the same size for every tuned method).
* :func:`tune`: the best rate of a grid by validation accuracy (mean over
  tuning seeds of the validation accuracy averaged over the last 10% of
  epochs). Test data are never used for a choice.
* ``tuned.json``: the stored choices, per dataset and method
  (:func:`read_tuned`, :func:`store_tuned`, :func:`stored_lr`).
* Seeds: final runs use seeds ``0..n-1``; tuning runs (and the gate study)
  use ``TUNE_SEED_OFFSET + 0..n-1``, disjoint from them.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from experiments import methods as methods_lib
from experiments import train as train_lib

TUNED_PATH = Path(__file__).resolve().with_name("tuned.json")
TUNE_SEED_OFFSET = 1000  # tuning seeds are 1000, 1001, ...: disjoint from 0..


def tuning_seeds(n: int) -> list[int]:
  return [TUNE_SEED_OFFSET + s for s in range(n)]


GRID_SIZE = 4  # the same for every tuned method
GRID_DECADES = 1.5


def grid(name: str, size: int = GRID_SIZE,
         decades: float = GRID_DECADES) -> list[float]:
  """``size`` log-spaced learning rates over ``decades``, centred per method."""
  method = methods_lib.METHODS[name]
  if size == 1:
    return [method.centre]
  half = decades / 2.0
  return [float(f"{method.centre * 10 ** (-half + decades * i / (size - 1)):.3g}")
          for i in range(size)]


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


def has_stored(dataset: str, method: str, path: Path = TUNED_PATH) -> bool:
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


def val_score(val_acc: np.ndarray) -> np.ndarray:
  """Per run: validation accuracy averaged over the last 10% of epochs."""
  tail = max(1, val_acc.shape[1] // 10)
  return np.nan_to_num(val_acc[:, -tail:].mean(axis=1), nan=0.0)


def tune(task: train_lib.Task, method: str, grid_values: Sequence[float],
         n_seeds: int, *, progress: Any = None, **train_options: Any
         ) -> tuple[float, list[float], dict[str, np.ndarray]]:
  """``(best lr, mean validation score per grid value, raw results)``."""
  seeds = tuning_seeds(n_seeds)
  lrs = [lr for lr in grid_values for _ in seeds]
  runs = [s for _ in grid_values for s in seeds]
  res = train_lib.train_runs(task, method, lrs, runs, progress=progress,
                             **train_options)
  per_lr = val_score(res["val_acc"]).reshape(len(grid_values),
                                             n_seeds).mean(axis=1)
  return (float(grid_values[int(np.argmax(per_lr))]),
          [float(s) for s in per_lr], res)

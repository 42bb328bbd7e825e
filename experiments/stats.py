"""Relative error difference and its confidence interval (DESIGN.md section 5).

RED of CG-ALR against a baseline, on seed s:
``red_s = (err_cgalr_s - err_base_s) / err_base_s`` with ``err = 1 - acc``
(negative: CG-ALR makes fewer errors). Runs are paired by seed (same
initialisation and batch order), so the interval is over the per-seed
values: ``mean +- t_{0.975, n-1} * sd / sqrt(n)`` (Student t, sample
standard deviation with ``ddof=1``). With one seed the interval is
undefined (``None``).

A baseline with zero test errors on a seed would make the ratio infinite;
its error is floored at ``floor`` (pass one test example's weight,
``1 / n_test``) so RED stays finite and the floor is visible in the code.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import stats as scipy_stats


def mean_ci(values: Sequence[float], level: float = 0.95
            ) -> tuple[float, float | None, float | None]:
  """``(mean, low, high)``: Student-t interval of the mean of ``values``."""
  x = np.asarray(values, dtype=np.float64)
  if x.size == 0:
    raise ValueError("mean_ci: no values.")
  mean = float(np.mean(x))
  if x.size < 2:
    return mean, None, None
  half = float(scipy_stats.t.ppf(0.5 + level / 2.0, x.size - 1)
               * np.std(x, ddof=1) / math.sqrt(x.size))
  return mean, mean - half, mean + half


def red_per_seed(acc_cgalr: Sequence[float], acc_base: Sequence[float],
                 floor: float = 0.0) -> np.ndarray:
  """Per-seed ``(err_cgalr - err_base) / max(err_base, floor)``."""
  a = np.asarray(acc_cgalr, dtype=np.float64)
  b = np.asarray(acc_base, dtype=np.float64)
  if a.shape != b.shape:
    raise ValueError(f"red_per_seed: paired runs must match, got {a.shape} "
                     f"and {b.shape}.")
  err_a, err_b = 1.0 - a, 1.0 - b
  return (err_a - err_b) / np.maximum(err_b, floor)


def red(acc_cgalr: Sequence[float], acc_base: Sequence[float], *,
        floor: float = 0.0, level: float = 0.95) -> dict[str, float | None]:
  """``{"mean", "ci_low", "ci_high"}`` of the paired RED."""
  mean, low, high = mean_ci(red_per_seed(acc_cgalr, acc_base, floor), level)
  return {"mean": mean, "ci_low": low, "ci_high": high}

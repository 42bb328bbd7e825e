"""experiments.pool_subset: its pooling rule and a tiny run (synthetic data)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from experiments import pool_subset
from test_node_budget import _dataset


def _members(every, batches, periods=3):
  """Pooled updates, listed per period from its measuring update back."""
  if batches is None or batches >= every:
    return set(range(periods * every))
  stride = every // batches
  return {k * every + every - 1 - j * stride
          for k in range(periods) for j in range(batches)}


@pytest.mark.parametrize("every", [1, 2, 5, 6, 7, 12, 100])
@pytest.mark.parametrize("batches", [None, 1, 2, 3, 10, 200])
def test_pooled_takes_evenly_spaced_updates_ending_at_the_measurement(
    every, batches):
  got = np.flatnonzero(pool_subset.pooled(np.arange(3 * every), every,
                                          batches))
  assert set(got.tolist()) == _members(every, batches)


def test_pooled_hand_computed():
  def pooled(every, batches):
    return np.flatnonzero(pool_subset.pooled(np.arange(every), every,
                                             batches)).tolist()
  assert pooled(100, 10) == [9, 19, 29, 39, 49, 59, 69, 79, 89, 99]
  assert pooled(6, 2) == [2, 5]
  assert pooled(7, 2) == [3, 6]
  assert pooled(5, 10) == [0, 1, 2, 3, 4]


def test_run_tiny():
  result = pool_subset.run(steps=24, every=4, probe=64, seeds=(0, 1),
                           pools=(None, 8, 2, 1), rows=(16, 4), hidden=(8, 8),
                           dataset=_dataset(), batch=16, lr=0.05,
                           resolution=4, log=lambda s: None)
  summary, per_seed = result["summary"], result["per_seed"]
  assert list(summary) == ["all", "B8", "B2", "B1", "R16", "R4"]
  # Samples per measurement: 4, 4 (B >= every pools every update), 2, 1
  # batches of 16; every update's 16 (all) or 4 rows.
  assert [np.median(summary[n]["samples_per_measurement"])
          for n in summary] == [64, 64, 32, 16, 64, 16]
  for rows in per_seed:
    # 6 measurements, 5 consecutive distances each.
    assert len(rows["all"]["distance"]) == 5
    assert len(rows["probe"]["distance"]) == 5
    # A pool of every update is the full pool, bit for bit.
    assert rows["B8"]["distance"] == rows["all"]["distance"]
    assert rows["B8"]["noise"] == rows["all"]["noise"]
    # So is a pool of every row of every update.
    assert rows["R16"]["distance"] == rows["all"]["distance"]
    assert rows["R4"]["distance"] != rows["all"]["distance"]
    assert rows["B1"]["distance"] != rows["all"]["distance"]
    for n in summary:
      assert np.all(np.isfinite(rows[n]["distance"]))
      assert min(rows[n]["noise"]) > 0
  assert all(0 <= a <= 1 for a in summary["B1"]["gate_agreement"])
  assert "| B2 | 32 |" in pool_subset.table(summary)
  json.dumps(result)  # JSON-ready


def test_run_needs_the_full_pool():
  with pytest.raises(ValueError, match="None"):
    pool_subset.run(steps=4, every=2, probe=8, pools=(2, 1),
                    dataset=_dataset())

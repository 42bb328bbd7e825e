"""Data-parallel CG-ALR agrees with single-device CG-ALR on the same batches.

The runs happen in a subprocess (tests/_multidevice_worker.py) started with 8
forced host devices; see that file for the settings compared.
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

WORKER = pathlib.Path(__file__).with_name("_multidevice_worker.py")


@pytest.fixture(scope="module", params=["host", "device"])
def runs(request):
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                      " --xla_force_host_platform_device_count=8").strip()
  env["JAX_PLATFORMS"] = "cpu"
  done = subprocess.run([sys.executable, str(WORKER), request.param],
                        env=env, capture_output=True, text=True, timeout=600,
                        check=False)
  assert done.returncode == 0, done.stderr[-4000:]
  return {k: v if k == "errors" else np.asarray(v) for k, v in
          json.loads(done.stdout.strip().splitlines()[-1]).items()}


def test_single_device_scale_moves(runs):
  single = runs["single"][:, 0]
  # Otherwise agreement below would be trivially true.
  assert np.ptp(single) > 0.05


@pytest.mark.parametrize("name", ["shard_map_4", "shard_map_8", "gspmd_8",
                                  "pmap_4", "explicit_4", "shard_map_vma_4"])
def test_data_parallel_matches_single_device(runs, name):
  single = runs["single"][:, 0]
  parallel = runs[name]
  np.testing.assert_allclose(parallel, np.broadcast_to(
      single[:, None], parallel.shape), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["shard_map_4", "shard_map_8", "pmap_4",
                                  "shard_map_vma_4"])
def test_replicas_agree_exactly(runs, name):
  per_replica = runs[name]
  assert per_replica.shape[1] in (4, 8)
  assert np.array_equal(per_replica, np.repeat(per_replica[:, :1],
                                               per_replica.shape[1], axis=1))


@pytest.mark.parametrize("how", ["shard_map", "pmap"])
def test_missing_axis_name_is_refused_naming_the_remedy(runs, how):
  # Without axis_name each replica would compute its own scale from its own
  # shard and the replicas would drift apart silently.
  message = runs["errors"][how]
  assert "axis_name='data'" in message and "replica" in message

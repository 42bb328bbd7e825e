"""JAX's multi-process engine: two local CPU processes agree with one.

Each process of tests/_multiprocess_worker.py holds half of every global
batch; ``jax.distributed`` with gloo CPU collectives makes the connectome's
statistics global.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

WORKER = pathlib.Path(__file__).with_name("_multiprocess_worker.py")


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _result(proc):
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-4000:]
  return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def runs():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  address = f"localhost:{_free_port()}"
  procs = [subprocess.Popen([sys.executable, str(WORKER), str(i), address],
                            env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  single = subprocess.Popen([sys.executable, str(WORKER), "single"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
  try:
    return [_result(p) for p in procs], _result(single)
  finally:
    for p in procs + [single]:
      if p.poll() is None:
        p.kill()


def test_two_processes_see_one_global_connectome(runs):
  (first, second), single = runs
  assert first["processes"] == second["processes"] == 2
  assert single["processes"] == 1
  np.testing.assert_array_equal(first["last_connectome"],
                                second["last_connectome"])
  np.testing.assert_allclose(first["last_connectome"],
                             single["last_connectome"], atol=2e-6)


def test_two_processes_keep_the_single_process_trajectory(runs):
  (first, second), single = runs
  assert first["trace"] == second["trace"]  # identical in both processes
  for got, want in zip(first["trace"], single["trace"]):
    for key in ("distance", "z", "scale"):
      assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), key
    assert got["gate"] == want["gate"]
  scales = [t["scale"] for t in single["trace"]]
  assert max(scales) != min(scales)  # the scale moved: agreement means much

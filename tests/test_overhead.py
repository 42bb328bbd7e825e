"""Smoke test of the overhead benchmark (experiments/overhead.py).

Tiny sizes and one repetition: this checks that the CLI runs end to end and
writes the ``overhead.json`` schema other tools read, not any timing.
"""

from __future__ import annotations

import ctypes
import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from cgalr_jax import measure, topology, transform
from experiments import overhead


def test_cli_writes_the_schema(tmp_path, capsys):
  out = tmp_path / "run"
  overhead.main(["--out", str(out), "--quick", "--reps", "1",
                 "--sizes", "8", "--wd-sizes", "8",
                 "--wd-reference-sizes", "--state-sizes", "4", "4096"])
  result = json.loads((out / "overhead.json").read_text())
  assert (out / "overhead.png").stat().st_size > 0

  def positive(x):
    return isinstance(x, float) and np.isfinite(x) and x > 0

  for backend in ("device", "host"):
    assert set(result["measure"][backend]) == {"8"}
    assert all(positive(v) for v in result["measure"][backend].values())
  assert set(result["reference"]) == {"8"}
  assert all(positive(v) for v in result["reference"].values())
  assert set(result["wd"]) == {"8"} and positive(result["wd"]["8"])
  assert result["wd_reference"] == {}  # none asked: no child process here
  step = result["step"]["mlp"]
  for key in ("sgd_ms", "cgalr_every1_ms", "cgalr_every10_ms"):
    assert positive(step[key])
  assert set(result["sources"]) == {"sgd", "probe_default", "probe_every100",
                                    "probe_never",
                                    "pool_default", "batch_every1",
                                    "batch_every10"}
  assert all(positive(v) for v in result["sources"].values())
  paired = result["sources_paired"]
  assert set(paired) == set(result["sources"])
  assert paired["sgd"] == {"median": 1.0, "low": 1.0, "high": 1.0}
  assert all(positive(r["median"]) and r["low"] <= r["median"] <= r["high"]
             for r in paired.values())
  assert set(result["step_paired"]["mlp"]) == set(result["step"]["mlp"]) - {
      "cgalr_every1_ms", "cgalr_every10_ms", "cgalr_never_ms"}
  assert set(result["cadence"]["tiny"]) == {"sgd", "every10", "every50"}
  assert result["cadence_smallest_passing"] in (None, 10, 50)
  assert set(result["breakdown"]) == {
      "probe_signals", "stats_correlation", "top_summary_device",
      "top_summary_host", "gate_fold", "update_device", "update_host"}
  assert all(positive(v) for v in result["breakdown"].values())
  assert result["breakdown_signals"] == 24  # the tiny MLP's 16 + 8
  assert set(result["breakdown_reference"]) == set(result["breakdown"]) | {
      "sgd_step"}
  assert all(positive(v) for v in result["breakdown_reference"].values())
  assert result["breakdown_reference_signals"] == 24
  untaken = result["untaken"]
  assert set(untaken["step_us"]) == {"sgd", "empty", "cumsum", "scan",
                                     "matvec", "constant"}
  assert all(positive(v) for v in untaken["step_us"].values())
  assert set(untaken["per_op_us"]) == {"cumsum", "scan", "matvec",
                                       "constant"}
  assert all(v["low"] <= untaken["per_op_us"][k] == v["median"] <= v["high"]
             for k, v in untaken["per_op_interval_us"].items())
  assert 0 < untaken["cgalr_extra_reductions"] <= 24
  buffers = untaken["per_run_buffers"]
  assert all(buffers["cgalr"][k] > buffers["sgd"][k] >= 0
             for k in ("constants", "region_values"))
  dispatch = result["dispatch"]
  assert set(dispatch) == {"sgd", "never_device", "never_host"}
  for times in dispatch.values():
    assert positive(times["returns_ms"]) and positive(times["ready_ms"])
  never = result["never_cost"]
  assert set(never["us_per_step"]) == set(overhead.NEVER_VARIANTS)
  assert set(never["extra_us"]) == set(overhead.NEVER_VARIANTS) - {
      "sgd_undonated", "never_undonated"}
  assert set(never["undonated_extra_us"]) == {"median", "low", "high"}
  assert never["extra_us"]["sgd"] == {"median": 0.0, "low": 0.0, "high": 0.0}
  assert all(positive(v) for v in never["us_per_step"].values())
  assert never["signals"] == 24 and never["rounds"] == 1
  assert result["state_bytes"] == {"4": result["state_bytes"]["4096"],
                                   "4096": result["state_bytes"]["4"]}
  assert isinstance(result["state_bytes"]["4"], int)
  assert isinstance(result["device"], str) and result["device"]
  assert result["auto_backend"] in ("device", "host")
  printed = capsys.readouterr().out
  assert "Targets" in printed and "reference" in printed


def test_reference_pipeline_computes_the_exact_sets():
  """The timed reference does the same work: exact birth and death sets."""
  a = overhead.structured_activations(64, 20, seed=3)
  births, deaths = overhead.reference_sets(a)
  m = np.abs(np.corrcoef(a, rowvar=False))
  np.fill_diagonal(m, 0.0)
  exact_births, exact_deaths = topology.birth_death_sets(m.astype(np.float32))
  np.testing.assert_allclose(births, exact_births, atol=1e-6)
  np.testing.assert_allclose(deaths, exact_deaths, atol=1e-6)


def test_cpu_model_reads_the_first_processor(tmp_path):
  x86 = tmp_path / "x86"
  x86.write_text(
      "\nprocessor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\n"
      "model\t\t: 17\nmodel name\t: AMD EPYC 9R14\n\nprocessor\t: 1\n"
      "model name\t: something else\n")
  assert overhead._cpu_model_from(str(x86)) == (
      "AMD EPYC 9R14 (family 25, model 17)")
  arm = tmp_path / "arm"
  arm.write_bytes(b"processor\t: 0\nBogoMIPS\t: 50.00\n"
                  b"CPU implementer\t: 0x41\nCPU part\t: 0xd0c\n\xff\n")
  assert overhead._cpu_model_from(str(arm)).endswith(
      "(implementer 0x41, part 0xd0c)")
  # No file: what the platform module knows, never an error.
  assert overhead._cpu_model_from(str(tmp_path / "missing"))


def test_paired_differences_are_medians_of_round_differences():
  # One round of b was slowed by a burst of load (4.0 against 1.0).
  times = {"a": np.array([1.0, 2.0, 10.0]), "b": np.array([4.0, 2.2, 10.1])}
  out = overhead.paired_differences(times, "a", scale=10.0)
  assert out["a"] == {"median": 0.0, "low": 0.0, "high": 0.0}
  # Round differences 30, 2 and 1: median 2, where the difference of the
  # medians (4.0 - 2.0) would read 20.
  assert out["b"]["median"] == pytest.approx(2.0)
  assert 1.0 - 1e-9 <= out["b"]["low"] <= out["b"]["high"] <= 30.0 + 1e-9
  # Ratios 4, 1.1 and 1.01: median 1.1, where the medians' ratio is 2.
  ratios = overhead.paired_differences(times, "a", ratio=True)
  assert ratios["a"] == {"median": 1.0, "low": 1.0, "high": 1.0}
  assert ratios["b"]["median"] == pytest.approx(1.1)
  assert 1.01 - 1e-9 <= ratios["b"]["low"] <= ratios["b"]["high"] <= 4.0


def test_never_cost_stand_ins_are_put_back():
  original = measure.summarise
  with pytest.raises(RuntimeError):
    with overhead._stubbed(("top", "gate")):
      assert measure.summarise is not original
      raise RuntimeError("boom")
  assert measure.summarise is original
  assert transform.fold.__module__ == "cgalr_jax.transform"


_BUFFERS_CHILD = """
import json, sys
import jax, jax.numpy as jnp, numpy as np
from jax import lax
from experiments.overhead import per_run_buffers
c = np.linspace(0.5, 1.5, 16, dtype=np.float32)

def branchy(x, flag):
  def heavy(x):
    y = x * jnp.asarray(c) + jnp.asarray(c[::-1] ** 2) * x[::-1]
    y = y + jnp.sum(y) * jnp.max(y)
    return jnp.sort(y).at[jnp.argmax(y)].add(1.0)
  return lax.cond(flag, heavy, lambda x: x, x)

text = jax.jit(branchy).lower(jnp.ones(16), True).compile().as_text()
print(json.dumps(per_run_buffers(text)))
"""


def test_per_run_buffers_match_xla_buffer_assignment(tmp_path):
  """The count read off the HLO text against XLA's own buffer assignment
  (dumped by a child process): its constant and thread-local allocations."""
  env = dict(os.environ, XLA_FLAGS=f"--xla_dump_to={tmp_path}",
             JAX_PLATFORMS="cpu",
             PYTHONPATH=str(pathlib.Path(__file__).resolve().parents[1]))
  out = subprocess.run([sys.executable, "-c", _BUFFERS_CHILD], env=env,
                       capture_output=True, text=True, check=True, timeout=300)
  counted = json.loads(out.stdout.strip().splitlines()[-1])
  (assignment,) = tmp_path.glob("*jit_branchy*buffer-assignment.txt")
  kinds = re.findall(r"^allocation \d+: size \d+, (.*):$",
                     assignment.read_text(), re.M)
  assert counted == {
      "constants": sum("constant" in k for k in kinds),
      "region_values": sum("thread-local" in k for k in kinds)}
  assert counted["constants"] >= 2 and counted["region_values"] >= 9


def _loaded_libc() -> str | None:
  """Path of the C library this process runs with (Linux), or None."""
  try:
    with open("/proc/self/maps", encoding="utf-8") as maps:
      for line in maps:
        path = line.split()[-1]
        if "/libc.so" in path or "/libc-" in path:
          return path
  except OSError:
    pass
  return None


def test_c_library_is_the_one_loaded():
  try:
    libc = ctypes.CDLL(None)
    libc.gnu_get_libc_version.restype = ctypes.c_char_p
    version = libc.gnu_get_libc_version().decode()
  except (AttributeError, OSError):
    assert overhead.c_library() == "unknown"
    return
  assert overhead.c_library() == f"glibc {version}"
  assert f"C library glibc {version};" in overhead.device_description()


def test_allocator_reruns_sources_and_never_cost_in_a_child(capsys):
  libc = _loaded_libc()
  if libc is None:
    pytest.skip("no /proc/self/maps naming the C library")
  # Preloading the C library the child loads anyway changes nothing but
  # takes the whole path: child process, environment, JSON back.
  got = overhead.bench_allocator(libc, 1, True, print)["allocator"]
  assert got["preload"] == libc
  assert f"LD_PRELOAD={libc}" in got["device"]
  assert set(got["sources_paired"]) == {"sgd", "probe_default",
                                        "probe_every100", "probe_never",
                                        "pool_default",
                                        "batch_every1", "batch_every10"}
  assert set(got["never_cost"]["extra_us"]) >= {"never", "state4"}
  with pytest.raises(FileNotFoundError, match="no such file"):
    overhead.bench_allocator(libc + ".missing", 1, True, print)
  with pytest.raises(SystemExit):
    overhead.main(["--out", "unused", "--allocator", libc + ".missing"])
  assert "--allocator: no such file" in capsys.readouterr().err

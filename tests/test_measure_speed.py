"""Smoke test of the measurement-speed benchmark (experiments/measure_speed.py).

Tiny sizes and one repetition: the CLI runs end to end, every summary it
times is checked bit for bit against the exact reference, and the JSON has
its fields. With git history available, the previous revision's modules are
loaded side by side (here the current revision, which must agree).
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from experiments import measure_speed


def _has_history() -> bool:
  if shutil.which("git") is None:
    return False
  done = subprocess.run(["git", "rev-parse", "--verify", "HEAD"],
                        cwd=measure_speed.REPO, capture_output=True,
                        check=False)
  return done.returncode == 0


@pytest.mark.parametrize("previous", [None, "HEAD"])
def test_cli_writes_medians_and_checks_every_summary(tmp_path, previous):
  if previous is not None and not _has_history():
    pytest.skip("no git history to load a previous revision from")
  argv = ["--out", str(tmp_path), "--sizes", "12,40", "--reps", "1"]
  if previous is not None:
    argv += ["--previous", previous]
  measure_speed.main(argv)
  result = json.loads((tmp_path / "measure_speed.json").read_text())
  variants = {"reference", "connectome", "host", "device", "host_summary",
              "device_summary"}
  if previous is not None:
    variants |= {"prev_host", "prev_device", "prev_host_summary",
                 "prev_device_summary"}
  assert set(result["medians_ms"]) == {"12", "40"}
  for medians in result["medians_ms"].values():
    assert set(medians) == variants
    assert all(v > 0 for v in medians.values())
  # Every library pipeline (and the previous one's) gave the exact summary.
  assert all(all(v.values()) for v in result["identical"].values())
  assert set(result["faster_backend"].values()) <= {"host", "device"}
  assert result["previous"] == previous

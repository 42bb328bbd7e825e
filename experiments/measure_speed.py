"""Speed of one TOP measurement: connectome + K-point summary, per backend.

Run::

  python -m experiments.measure_speed --out DIR [--sizes 256,512,1024,2048]
      [--reps R] [--previous REV]

For every P it builds structured activations ``[N=256, P]`` and times,
interleaved in one process (one repetition of each variant in turn, so a
burst of load from another process hits all of them alike), the median of:

* ``reference``: the NumPy/SciPy pipeline of the authors' earlier public
  code: ``numpy.corrcoef``, ``scipy.sparse.csgraph.minimum_spanning_tree``
  on ``-M``, full sorts of both sets, then the K quantiles;
* ``host`` and ``device``: the library, one jitted call each, blocked
  until ready: what ``scale_by_connectome``'s backends run
  (``connectome.condensed_from_stats`` then
  ``topology.top_summary_via_host``; ``cgalr_jax.connectome`` then
  ``topology.top_summary_device``);
* ``connectome``: the jitted connectome alone, the floor both backends share;
* ``host_summary`` and ``device_summary``: the summary alone, from a ready
  connectome (``topology.top_summary_host`` on a NumPy matrix, the jitted
  ``topology.top_summary_device`` on a device one);
* with ``--previous REV``: the same four library variants (``prev_host``,
  ``prev_device``, ``prev_host_summary``, ``prev_device_summary``) with
  ``cgalr_jax/topology.py`` and the correlation of ``cgalr_jax/connectome.py``
  as of git revision REV, loaded side by side with the current ones (the
  sufficient statistics, a mean, a sum and the Gram product, are the
  current code's).

Before timing, every library summary (and the previous one's) is checked bit
for bit against the exact quantiles of the reference's sets computed on the
library's own float32 connectome (the previous revision's on its own).
It prints a table of medians and ratios, which backend is faster at each P
on this machine (what ``backend="auto"`` should pick) next to what it picks
here (with the CPU and NumPy's sort speed, which decide the host's cost),
and writes
``DIR/measure_speed.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import cgalr_jax
from cgalr_jax import measure, topology
from cgalr_jax.connectome import condensed_from_stats
from experiments.overhead import cpu_model, time_interleaved

SIZES = (256, 512, 1024, 2048)
NUM_SAMPLES = 256
RESOLUTION = 512  # scale_by_connectome's default K
REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------
# Inputs and the reference pipeline.


def structured_activations(num_samples: int, num_signals: int,
                           seed: int) -> np.ndarray:
  """``[N, P]`` float32 LeakyReLU features of 64 shared Gaussian inputs.

  Signals correlate like a hidden layer's (the recipe of
  ``experiments/overhead.py``).
  """
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((num_samples, 64))
  w = rng.standard_normal((64, num_signals)) / 8.0
  h = x @ w + 0.5 * rng.standard_normal((num_samples, num_signals))
  return np.where(h > 0, h, 0.01 * h).astype(np.float32)


def reference_sets(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Sorted birth and death sets: SciPy's spanning tree on ``-M``, full sorts.

  Args:
    m: ``[P, P]`` connectome without zero off-diagonal weights (SciPy reads
      a zero as a missing edge).

  Returns:
    ``(births, deaths)`` in the dtype of ``m``, sorted ascending.
  """
  from scipy.sparse.csgraph import minimum_spanning_tree  # pylint: disable=import-outside-toplevel

  tree = minimum_spanning_tree(-m)
  births = np.sort(-tree.data).astype(m.dtype)
  rows, cols = tree.nonzero()
  is_birth = np.zeros(m.shape, bool)
  is_birth[rows, cols] = is_birth[cols, rows] = True
  upper = np.triu_indices(m.shape[0], k=1)
  deaths = np.sort(m[upper][~is_birth[upper]])
  return births, deaths


def reference_summary(m: np.ndarray, resolution: int) -> np.ndarray:
  """``[2, K]`` quantiles ``x[floor((k + 1/2) n / K)]`` of reference_sets."""
  births, deaths = reference_sets(m)
  out = np.zeros((2, resolution), m.dtype)
  out[0] = births[topology.quantile_ranks(births.shape[0], resolution)]
  if deaths.shape[0]:
    out[1] = deaths[topology.quantile_ranks(deaths.shape[0], resolution)]
  return out


def reference_measure(a: np.ndarray) -> np.ndarray:
  """The reference pipeline: float64 corrcoef, reference_sets, quantiles."""
  m = np.abs(np.corrcoef(a, rowvar=False))
  np.fill_diagonal(m, 0.0)
  return reference_summary(m, RESOLUTION)


# ----------------------------------------------------------------------------
# Library pipelines.


def _load_module(revision: str, path: str, name: str) -> Any:
  """``path`` as of a git revision, as a separate module called ``name``."""
  source = subprocess.run(
      ["git", "show", f"{revision}:{path}"], cwd=REPO,
      check=True, capture_output=True, text=True).stdout
  file = Path(tempfile.mkdtemp()) / f"{name}.py"
  file.write_text(source)
  spec = importlib.util.spec_from_file_location(name, file)
  module = importlib.util.module_from_spec(spec)
  # Registered first: the module may look itself up in sys.modules.
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  return module


def load_previous(revision: str) -> tuple[Any, Callable]:
  """The summaries and the connectome as of a git revision: its
  ``topology.py`` as a module, and ``activations -> connectome`` with its
  ``connectome.py``'s correlation (the statistics, a mean, a sum and the
  Gram product, come from the current code)."""
  previous = _load_module(revision, "cgalr_jax/connectome.py",
                          "previous_connectome")

  def connectome(a):
    return previous.correlation_from_stats(
        measure.merge_parts(measure.split_stats(a)))

  return (_load_module(revision, "cgalr_jax/topology.py",
                       "previous_topology"), connectome)


def condensed_connectome(a: jax.Array) -> jax.Array:
  """The connectome's upper triangle straight from the statistics: what the
  library's host backend sends to the host (``scale_by_connectome``)."""
  return condensed_from_stats(measure.merge_parts(measure.split_stats(a)))


def pipeline(module: Any, backend: str,
             connectome: Callable = cgalr_jax.connectome,
             host_input: Callable | None = None) -> Callable:
  """Jitted ``activations -> [2, K] summary`` with ``module``'s summary;
  the host backend reads ``host_input(a)`` (default: ``connectome(a)``)."""

  def summary_of(a):
    if backend == "device":
      return module.top_summary_device(connectome(a), RESOLUTION)
    return module.top_summary_via_host((host_input or connectome)(a),
                                       RESOLUTION)[0]

  return jax.jit(summary_of)


# ----------------------------------------------------------------------------
# The run.


def faster_backend(medians: dict[str, dict[str, float]]) -> dict[str, str]:
  """``"device"`` or ``"host"`` per P: the backend with the lower median."""
  return {p: ("device" if med["device"] < med["host"] else "host")
          for p, med in medians.items()}


def switch_points(faster: dict[str, str]) -> list[str]:
  """Where the faster backend changes between consecutive measured sizes."""
  sizes = sorted(faster, key=int)
  return [f"{faster[a]} at P = {a}, {faster[b]} at P = {b}"
          for a, b in zip(sizes, sizes[1:]) if faster[a] != faster[b]]


def run(out: Path, sizes: Sequence[int], reps: int,
        previous: str | None = None, command: str = "", log=print) -> dict:
  """Check, time and tabulate every variant at every P; write the JSON."""
  modules = {"": (topology, cgalr_jax.connectome, condensed_connectome)}
  if previous is not None:
    modules["prev_"] = load_previous(previous) + (None,)
  result: dict[str, Any] = {
      "command": command,
      "machine": {"platform": platform.platform(),
                  "cpu_count": os.cpu_count(), "cpu": cpu_model(),
                  "numpy_sort_ns_per_element":
                      measure.host_sort_ns_per_element(),
                  "jax": jax.__version__, "numpy": np.__version__,
                  "devices": [str(d) for d in jax.devices()],
                  "load_average_before": list(os.getloadavg())},
      "num_samples": NUM_SAMPLES, "resolution": RESOLUTION, "reps": reps,
      "previous": previous, "medians_ms": {}, "identical": {}}
  connectome = jax.jit(cgalr_jax.connectome)
  for p in sizes:
    a = structured_activations(NUM_SAMPLES, p, seed=p)
    a_dev = jnp.asarray(a)
    m_dev = connectome(a_dev)
    m_host = np.asarray(m_dev)
    exact = reference_summary(m_host, RESOLUTION)
    calls = {"reference": lambda: reference_measure(a),
             "connectome": lambda: jax.block_until_ready(connectome(a_dev))}
    identical = {}
    for prefix, (module, connectome_fn, host_input) in modules.items():
      # Each revision against the exact quantiles of its own connectome.
      own = (exact if connectome_fn is cgalr_jax.connectome else
             reference_summary(np.asarray(jax.jit(connectome_fn)(a_dev)),
                               RESOLUTION))
      for backend in ("host", "device"):
        fn = pipeline(module, backend, connectome_fn, host_input)
        identical[prefix + backend] = bool(
            np.array_equal(np.asarray(fn(a_dev)), own))
        calls[prefix + backend] = (
            lambda fn=fn: jax.block_until_ready(fn(a_dev)))
      device_summary = jax.jit(module.top_summary_device, static_argnums=1)
      calls[prefix + "host_summary"] = (
          lambda module=module: module.top_summary_host(m_host, RESOLUTION))
      calls[prefix + "device_summary"] = (
          lambda fn=device_summary: jax.block_until_ready(
              fn(m_dev, RESOLUTION)))
    result["identical"][str(p)] = identical
    medians = time_interleaved(calls, reps)
    result["medians_ms"][str(p)] = medians
    log(f"P={p}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in medians.items())
        + ("" if all(identical.values()) else f"  NOT IDENTICAL {identical}"))
  result["machine"]["load_average_after"] = list(os.getloadavg())
  result["faster_backend"] = faster_backend(result["medians_ms"])
  result["auto_backend"] = {
      p: measure.resolve_backend("auto", "top", int(p))
      for p in result["medians_ms"]}
  result["switch"] = switch_points(result["faster_backend"])
  out.mkdir(parents=True, exist_ok=True)
  (out / "measure_speed.json").write_text(json.dumps(result, indent=2) + "\n")
  log(table(result))
  return result


def _markdown(result: dict, variants: list[str],
              ratios: list[tuple[str, str, str]]) -> list[str]:
  head = ["P"] + [v.replace("_", " ") for v in variants] + [
      name for name, _, _ in ratios]
  lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
  for p, med in result["medians_ms"].items():
    row = [p] + [f"{med[k]:.2f}" for k in variants]
    row += [f"{med[a] / med[b]:.2f}x" for _, a, b in ratios]
    lines.append("| " + " | ".join(row) + " |")
  return lines


def table(result: dict) -> str:
  """Markdown tables of medians (ms) and speed ratios."""
  prev = result["previous"] is not None
  variants = ["reference", "connectome", "host", "device"]
  ratios = [("ref / host", "reference", "host"),
            ("ref / device", "reference", "device")]
  summaries = ["host_summary", "device_summary"]
  summary_ratios = []
  if prev:
    variants += ["prev_host", "prev_device"]
    ratios += [("prev / new host", "prev_host", "host"),
               ("prev / new device", "prev_device", "device")]
    summaries += ["prev_host_summary", "prev_device_summary"]
    summary_ratios = [("prev / new host", "prev_host_summary", "host_summary"),
                      ("prev / new device", "prev_device_summary",
                       "device_summary")]
  lines = ["Connectome + summary (ms):", ""]
  lines += _markdown(result, variants, ratios)
  lines += ["", "Summary alone, from a ready connectome (ms):", ""]
  lines += _markdown(result, summaries, summary_ratios)
  lines.append("")
  lines.append("faster backend: " + ", ".join(
      f"P = {p}: {b}" for p, b in result["faster_backend"].items()))
  lines.append("switch: " + ("; ".join(result["switch"]) or
                             "none within the sizes measured"))
  if "auto_backend" in result:
    lines.append("backend='auto' here: " + ", ".join(
        f"P = {p}: {b}" for p, b in result["auto_backend"].items())
        + f" (NumPy float32 sort "
        f"{result['machine']['numpy_sort_ns_per_element']:.1f} ns/element, "
        f"{result['machine']['cpu']})")
  identical = all(all(v.values()) for v in result["identical"].values())
  lines.append("summaries bit-identical to the reference's exact quantiles: "
               + ("yes" if identical else f"NO {result['identical']}"))
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", type=Path, required=True,
                      help="directory for measure_speed.json")
  parser.add_argument("--sizes", default=",".join(map(str, SIZES)),
                      help="comma-separated node counts P")
  parser.add_argument("--reps", type=int, default=15,
                      help="timed repetitions per figure (default 15)")
  parser.add_argument("--previous", default=None,
                      help="git revision whose topology and correlation to "
                      "time alongside")
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parser.parse_args(argv)
  sizes = [int(s) for s in args.sizes.split(",") if s]
  command = " ".join(["python -m experiments.measure_speed", *argv])
  return run(args.out, sizes, args.reps, previous=args.previous,
             command=command)


if __name__ == "__main__":
  main()

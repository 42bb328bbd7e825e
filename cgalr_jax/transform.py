"""CG-ALR as Optax gradient transformations (DESIGN.md sections 2 and 3).

This module only composes: :mod:`cgalr_jax.measure` turns a probe, a pool or
a batch into a connectome summary and a distance, :mod:`cgalr_jax.gate`
turns the distance stream into a scale, and the transform applies it.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import math
import types
import warnings
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cgalr_jax import _sums
from cgalr_jax import gate as gate_lib
from cgalr_jax import measure
from cgalr_jax import topology
from cgalr_jax.connectome import (SignalStats, condensed_from_stats,
                                  correlation_from_stats)
from cgalr_jax.gate import GateConfig

# WD runs Vietoris-Rips persistence on the host: always under a node budget.
DEFAULT_WD_MAX_NODES = 64
# Measure on every DEFAULT_EVERY-th update: the cadence at which
# `python -m experiments.overhead` finds the probe source's cost closest to
# its 5% budget on the experiments' MLPs (README, Performance).
DEFAULT_EVERY = 100
DEFAULT_RESOLUTION = 512
# Above these node counts one measurement costs about a second on a CPU
# (README, Performance; TOP: 0.41 s on the host and 0.58 s on the device at
# 8,192 signals, 1.8 s on the host at 16,384): guidance, not a limit.
COSTLY_TOP_NODES = 10240
COSTLY_WD_NODES = 128
# Seconds per measurement on a 2-core CPU, as c * P^2 log2 P (TOP: the host
# pipeline's 0.41 s and 1.8 s at 8,192 and 16,384 signals give the low end,
# the device pipeline's 0.98 s at 8,192 on a CPU with a slow sort the high
# end) and as c * (P / 128)^4.6 for WD (ripser on the full connectome: 0.1-
# 0.2 s at 128 nodes, 2.4-4.7 s at 256). Rough: for the warning's message.
_TOP_SECONDS_PER_P2LOGP = (4.7e-10, 1.13e-9)
_WD_SECONDS_AT_128 = (0.1, 0.2)
_WD_EXPONENT = 4.6


def expected_seconds(distance: str, num_nodes: int) -> tuple[float, float]:
  """Rough ``(low, high)`` seconds one measurement of ``num_nodes`` signals
  takes on a 2-core CPU, from the benchmark's figures (README,
  Performance): what the large-P warning names."""
  p = float(num_nodes)
  if distance == "wd":
    return tuple(c * (p / 128.0) ** _WD_EXPONENT for c in _WD_SECONDS_AT_128)
  return tuple(c * p * p * math.log2(max(p, 2.0))
               for c in _TOP_SECONDS_PER_P2LOGP)


# Extra ``update`` arguments other Optax transformations in a chain consume;
# they reach this transform too and are ignored silently.
KNOWN_EXTRA_ARGS = frozenset({"value", "loss", "grad", "key", "rng"})

# Slots of the packed state vectors (few leaves keep non-measuring steps as
# cheap as a plain optimizer step).
_COUNT, _GATE, _HISTORY_COUNT, _REFERENCE_NODES, _MEASURED, _SKIPPED = range(6)
_SCALE, _Z, _DISTANCE, _NOISE, _EVEN_DISTANCE, _ODD_DISTANCE = range(6)
_NUM_COUNTERS = _SKIPPED + 1


def _slot(slot: int) -> jax.Array:
  """Boolean ``[_NUM_COUNTERS]`` mask of one counter: a mask, not a
  scatter, and from an iota, not a constant (each is a buffer that every
  run of the compiled step sets up: see cgalr_jax._sums)."""
  return jax.lax.iota(jnp.int32, _NUM_COUNTERS) == slot


class ScaleByConnectomeState(NamedTuple):
  """State of :func:`scale_by_connectome`; every field has a fixed shape.

  Scalars are packed into two vectors; read them through the properties
  (``state.scale``, ``state.measured``...) or :func:`diagnostics`.

  Attributes:
    counters: int32 ``[6]``: updates seen, gate state (HOLD 0, BRAKE -1,
      BOOST +1), distances in the history (once full it stays in
      ``[window, 2 window)``), node count of the reference (0: none yet),
      accepted measurements, skipped measurements.
    values: float32 ``[6]``: the scale applied to the next update, the last
      robust score z, the last distance, the last noise floor (the distance
      between the even and odd halves of one measurement), and the last
      consecutive distances of the even and of the odd half. The noise
      fields stay 0 unless ``noise=True``.
    history: float32 ``[window]`` ring buffer of past log distances.
    reference: float32 summaries of the last accepted connectome, ``[S, 2,
      K]`` (TOP) or ``[S, 2, K, 2]`` (WD); S is 3 with ``noise=True`` (whole
      sample, even half, odd half), else 1.
    pool: with ``pool=True``, the statistics pooled since the last
      measurement (fields with a leading axis of 1 part, or 2 halves with
      ``noise=True``); otherwise None.
  """

  counters: jax.Array
  values: jax.Array
  history: jax.Array
  reference: jax.Array
  pool: SignalStats | None = None

  count = property(lambda self: self.counters[..., _COUNT])
  gate = property(lambda self: self.counters[..., _GATE])
  history_count = property(lambda self: self.counters[..., _HISTORY_COUNT])
  reference_nodes = property(lambda self: self.counters[..., _REFERENCE_NODES])
  measured = property(lambda self: self.counters[..., _MEASURED])
  skipped = property(lambda self: self.counters[..., _SKIPPED])
  scale = property(lambda self: self.values[..., _SCALE])
  z = property(lambda self: self.values[..., _Z])
  distance = property(lambda self: self.values[..., _DISTANCE])
  noise = property(lambda self: self.values[..., _NOISE])
  even_distance = property(lambda self: self.values[..., _EVEN_DISTANCE])
  odd_distance = property(lambda self: self.values[..., _ODD_DISTANCE])


def _require(ok: bool, name: str, allowed: str, value: Any) -> None:
  if not ok:
    raise ValueError(
        f"scale_by_connectome: {name} must be {allowed}, got {value!r}.")


def _static(name: str, value: Any, default: Any) -> Any:
  if value is None:
    return default
  return gate_lib.static_int("scale_by_connectome", name, value)


def _selector(select: Any) -> Callable[[Any], Any]:
  """Turn ``select`` (None, key, key path or callable) into a function."""
  if select is None:
    return lambda activations: activations
  if callable(select):
    return select
  if not isinstance(select, (str, int, list, tuple)):
    raise ValueError(
        "scale_by_connectome: select must be None, a key, a sequence of keys "
        f"or a callable, got {select!r}.")
  path = tuple(select) if isinstance(select, (list, tuple)) else (select,)

  def pick(activations):
    part = activations
    for depth, key in enumerate(path):
      try:
        part = part[key]
      except (KeyError, IndexError, TypeError) as err:
        available = list(part.keys()) if hasattr(part, "keys") else type(part)
        raise ValueError(
            f"scale_by_connectome: select={select!r}: no key {key!r} at depth "
            f"{depth} of the activations; available: {available}.") from err
    return part

  return pick


class _OnceWarner:
  """Issues each distinct warning once per transformation."""

  def __init__(self):
    self.seen: set[str] = set()

  def __call__(self, message: str, stacklevel: int = 3) -> None:
    if message not in self.seen:
      self.seen.add(message)
      warnings.warn(message, UserWarning, stacklevel=stacklevel + 1)


def _source_name(probe: Any, pool: bool) -> str:
  return "probe" if probe is not None else ("pool" if pool else "batch")


# The gate's float settings, in the order the host measurement receives them.
_GATE_FLOATS = ("enter_z", "exit_z", "boost", "brake", "min_scale",
                "max_scale")


def fold(config: GateConfig, counters, values, history, dist, noise_values,
         num_nodes: int, xp: Any = jnp):
  """A measurement's distance folded into the packed state vectors.

  The gate scores and moves only when the state holds a reference of the
  same node count; the first measurement only sets the reference. Runs in
  JAX or, with ``xp=numpy``, inside the host measurement (same float32
  arithmetic).

  Returns:
    ``(counters, values, history)`` after the measurement.
  """
  has_ref = counters[_REFERENCE_NODES] == num_nodes
  first = counters[_REFERENCE_NODES] == 0
  count = counters[_HISTORY_COUNT]
  log_d = gate_lib.log_distance(dist, xp)
  z, new_gate, new_scale = gate_lib.step(
      config, history, count, counters[_GATE], values[_SCALE], log_d, xp)
  pushed, pushed_count = gate_lib.push(history, count, log_d, xp)
  keep = lambda new, old: xp.where(has_ref, new, old)  # noqa: E731
  accepted = has_ref | first
  new_counters = xp.stack([
      counters[_COUNT], keep(new_gate, counters[_GATE]),
      keep(pushed_count, count), xp.asarray(num_nodes, xp.int32),
      counters[_MEASURED] + xp.where(accepted, 1, 0),
      counters[_SKIPPED] + xp.where(accepted, 0, 1)]).astype(xp.int32)
  new_values = xp.concatenate([
      xp.stack([keep(new_scale, values[_SCALE]), keep(z, values[_Z]),
                keep(xp.asarray(dist, xp.float32), values[_DISTANCE])]),
      noise_values[:1],  # the floor needs no reference
      xp.where(has_ref, noise_values[1:], values[_EVEN_DISTANCE:])]
                              ).astype(xp.float32)
  return new_counters, new_values, keep(pushed, history)


def _host_layout(window: int, reference_shape: tuple[int, ...]):
  """Offsets of the state in the one int32 vector the host call exchanges:
  ``[counters | values | history | reference]``, floats as their bits.

  Integers, not floats, cross: small integers read as float32 are subnormal
  numbers, which a sharded program may flush to zero when it copies them
  between devices; bits of an int32 array are carried exactly.
  """
  sizes = (6, 6, window, math.prod(reference_shape))
  return np.cumsum((0,) + sizes)


def _measure_host(packed, mats, *, window, min_history, score, num_nodes,
                  resolution, reference_shape):
  """The host measurement: connectomes (condensed) -> the new state.

  ``packed`` is the int32 bits of ``[ok, the gate's floats
  (_GATE_FLOATS)]`` followed by the state laid out by :func:`_host_layout`;
  ``mats`` ``[S, E]`` are the condensed connectomes of the whole sample
  and, with the noise floor, of its even and odd halves; ``ok`` says
  whether their statistics were usable. Returns the new state, laid out
  the same way. A measurement that cannot be used comes back as a counted
  skip.
  """
  head = 1 + len(_GATE_FLOATS)
  settings = np.asarray(packed[:head], np.int32).view(np.float32)
  ok, floats = settings[0], settings[1:]
  flat = np.array(packed[head:], np.int32)
  at = _host_layout(window, reference_shape)
  counters = flat[at[0]:at[1]]
  if not ok:
    counters[_SKIPPED] += 1
    return flat
  state = flat.view(np.float32)
  values, history = state[at[1]:at[2]], state[at[2]:at[3]]
  reference = state[at[3]:at[4]].reshape(reference_shape)
  config = types.SimpleNamespace(
      window=window, min_history=min_history, score=score,
      **dict(zip(_GATE_FLOATS, floats)))
  summaries = np.stack([topology.top_summary_host(m, resolution)
                        for m in mats])
  dist = topology.top_summary_distance(reference, summaries, num_nodes, np)
  if len(mats) == 3:
    floor = topology.top_summary_distance(summaries[1], summaries[2],
                                          num_nodes, np)
    noise_values = np.stack([floor, dist[1], dist[2]]).astype(np.float32)
  else:
    noise_values = np.zeros((3,), np.float32)
  if not (np.all(np.isfinite(dist)) and np.all(np.isfinite(noise_values))):
    raise FloatingPointError("non-finite distance")
  counters, values, history = fold(config, counters, values, history,
                                   dist[0], noise_values, num_nodes, np)
  return np.concatenate([counters, values.view(np.int32),
                         history.view(np.int32),
                         summaries.astype(np.float32).reshape(-1).view(
                             np.int32)])


def scale_by_connectome(
    distance: str = "top",
    *,
    probe: Callable[[Any], Any] | None = None,
    pool: bool = False,
    noise: bool = False,
    every: int | None = None,
    window: int | None = None,
    min_history: int | None = None,
    enter_z: float = GateConfig.enter_z,
    exit_z: float = GateConfig.exit_z,
    boost: float = GateConfig.boost,
    brake: float = GateConfig.brake,
    min_scale: float = GateConfig.min_scale,
    max_scale: float = GateConfig.max_scale,
    score: str = GateConfig.score,
    max_nodes: int | None = None,
    resolution: int | None = None,
    seed: int | None = None,
    backend: str = "auto",
    select: str | Sequence[Any] | Callable[[Any], Any] | None = None,
    axis_name: Any = None,
    layout: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Scale updates by a connectome-guided, gated multiplier.

  Every ``every``-th update, the network's functional connectome (|Pearson|
  between neuron signals on a set of samples) is compared with the previous
  one by a persistent-homology distance. The log distance is scored against
  its recent history with median/MAD; a hysteresis gate then brakes the
  multiplier while the network reorganises (large score) and boosts it
  while the organisation is stable (small score). The multiplier stays in
  ``[min_scale, max_scale]``, so combined with a Robbins-Monro step size the
  product is again Robbins-Monro.

  Where the signals come from (DESIGN.md section 2) decides whether the
  distance describes the network or the sample it was measured on:

  * ``probe=fn`` (recommended): ``fn(params)`` returns the activations of
    a fixed set of training samples in inference mode; the transform calls
    it itself, only on measuring steps. ``update`` then needs ``params`` and
    takes no ``activations``. Use at least ``max(256, 2 P)`` samples.
    :func:`cgalr_jax.flax.probe` builds ``fn`` for Flax models.
  * ``pool=True``: the ``activations=`` passed with every update are summed
    into sufficient statistics and measured together every ``every``-th
    update. The state holds a ``[max_nodes, max_nodes]`` matrix, so
    ``max_nodes`` is required; the measurement acts from the next update.
  * otherwise (batch): the ``activations=`` of the measuring update alone.
    On mini-batches this reads sampling noise (check with ``noise=True``);
    right for full-batch tasks in inference mode. Acts from the next update.

  Args:
    distance: ``"top"`` (graph filtration, fast) or ``"wd"`` (Vietoris-Rips
      Wasserstein, host only, node budget 64 unless ``max_nodes`` says).
    probe: ``fn(params) -> activations`` on fixed inputs (see above).
    pool: pool the activations passed with updates between measurements.
    noise: also measure the distance between the connectomes of the even
      and odd samples (``diagnostics()["noise"]``) and each half's own
      consecutive distance (``"even_distance"``, ``"odd_distance"``): the
      sampling-noise floor and its health check.
      Costs two more summaries per measurement and needs at least 6 samples.
    every: measure on every ``every``-th update (default 100; for short
      runs, about once per epoch).
    window: past distances the robust score reads (default 20).
    min_history: distances needed before the gate may act (default 5).
    enter_z, exit_z, boost, brake, min_scale, max_scale, score: the gate
      (:class:`cgalr_jax.gate.GateConfig`, whose defaults were chosen by the
      validation study in ``experiments/README.md``).
    max_nodes: node budget; a fixed subset of signals drawn from ``seed`` is
      kept at every step. Required with ``pool=True`` (the pool's size).
    resolution: K, points in the fixed-size topological summary (512).
    seed: seed of the node subset (0).
    backend: TOP backend, ``"device"`` (pure JAX), ``"host"`` (the
      connectome on the device, then summaries, distances and the gate in
      NumPy in one ``jax.pure_callback``) or ``"auto"`` (for TOP the device
      backend, on a CPU the host one from 1,408 signals; see
      :func:`cgalr_jax.measure.resolve_backend`). Programs that hold the
      host backend cannot be serialised with ``jax.export``; use
      ``"device"`` there.
    select: which part of the activations this transform reads: a key, a
      sequence of keys, or a callable. Lets several instances inside
      ``optax.multi_transform`` each follow their own layer.
    axis_name: the data-parallel axis under ``shard_map``/``pmap``: the
      statistics are summed across it and the host step runs once and is
      broadcast, so every replica keeps the identical scale. Not needed
      under ``jit`` with sharded arrays (GSPMD).
    layout: how activation leaves are laid out: ``None`` or
      ``"channels_last"`` (``[N, P]``, ``[N, ..., C]``),
      ``"channels_first"`` (``[N, C, ...]``) or ``"time_major"``
      (``[T, N, ..., C]``).

  Under ``jax.vmap`` over optimizer states the measuring ``lax.cond``
  depends on a batched counter and becomes a ``select``: every update then
  pays for a measurement. Map such runs with ``jax.lax.map`` instead.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` is
    ``update(updates, state, params=None, *, activations=None)``.

  References:
    He & Songdechakraiwut, "Connectome-Guided Automatic Learning Rates for
    Deep Networks", arXiv:2510.23781, 2025.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from cgalr_jax import scale_by_connectome
    >>> x = jax.random.normal(jax.random.key(0), (256, 4))
    >>> probe = lambda p: jnp.tanh(x @ p["w"])  # 8 hidden units on 256 inputs
    >>> opt = optax.chain(scale_by_connectome(probe=probe), optax.sgd(0.1))
    >>> params = {"w": jax.random.normal(jax.random.key(1), (4, 8))}
    >>> state = opt.init(params)
    >>> updates, state = opt.update(params, state, params)
  """
  try:
    gate_config = GateConfig(
        window=_static("window", window, GateConfig.window),
        min_history=_static("min_history", min_history,
                            GateConfig.min_history),
        enter_z=enter_z, exit_z=exit_z, boost=boost, brake=brake,
        min_scale=min_scale, max_scale=max_scale, score=score)
  except ValueError as err:
    raise ValueError(str(err).replace("GateConfig:", "scale_by_connectome:",
                                      1)) from None
  resolution = _static("resolution", resolution, DEFAULT_RESOLUTION)
  seed = _static("seed", seed, 0)
  if max_nodes is not None:
    max_nodes = gate_lib.static_int("scale_by_connectome", "max_nodes",
                                    max_nodes)
  every = DEFAULT_EVERY if every is None else every
  every_value = gate_lib.concrete_float(every)
  _require(distance in measure.DISTANCES, "distance",
           f"one of {measure.DISTANCES}", distance)
  _require(every_value is None or (every_value.is_integer() and every_value >= 1
                                   and not isinstance(every, bool)),
           "every", "an int >= 1", every)
  _require(max_nodes is None or max_nodes >= 2, "max_nodes",
           "None or an int >= 2", max_nodes)
  _require(resolution >= 1, "resolution", "an int >= 1", resolution)
  _require(backend in measure.BACKENDS, "backend",
           f"one of {measure.BACKENDS}", backend)
  _require(not (distance == "wd" and backend == "device"), "backend",
           "'auto' or 'host' for distance='wd' (WD runs on the host)", backend)
  _require(layout is None or layout in measure.LAYOUTS, "layout",
           f"None or one of {measure.LAYOUTS}", layout)
  _require(probe is None or callable(probe), "probe",
           "None or a callable fn(params) -> activations", probe)
  _require(isinstance(pool, bool), "pool", "a bool", pool)
  _require(isinstance(noise, bool), "noise", "a bool", noise)
  _require(not (pool and probe is not None), "pool",
           "False when a probe is given (choose one source)", pool)
  if distance == "wd" and max_nodes is None:
    max_nodes = DEFAULT_WD_MAX_NODES
  _require(not (pool and max_nodes is None), "max_nodes",
           "an int with pool=True (the pool keeps a [max_nodes, max_nodes] "
           "matrix in the optimizer state; use at most the network's number "
           "of signals)", max_nodes)
  pick = _selector(select)
  source = _source_name(probe, pool)
  # axis_name=() declares replicas independent: nothing to sum across.
  stats_axis = None if axis_name is None or axis_name == () else axis_name
  num_parts = 2 if noise else 1
  num_summaries = 3 if noise else 1
  reference_shape = (num_summaries,) + measure.summary_shape(distance,
                                                             resolution)
  warn_once = _OnceWarner()

  def init_fn(params):
    if probe is not None:
      # Fails early, with the probe's own error, if it cannot read params.
      jax.eval_shape(lambda p: read_signals(probe(p)), params)
    values = jnp.zeros((6,), jnp.float32).at[_SCALE].set(1.0)
    return ScaleByConnectomeState(
        counters=jnp.zeros((6,), jnp.int32),
        values=values,
        history=jnp.zeros((gate_config.window,), jnp.float32),
        reference=jnp.zeros(reference_shape, jnp.float32),
        pool=measure.empty_pool(num_parts, max_nodes) if pool else None)

  def read_signals(activations):
    """Activations -> ``[N, P]`` signals, with trace-time guidance."""
    a = measure.signals(pick(activations), max_nodes=max_nodes, seed=seed,
                        layout=layout)
    if probe is None:  # a probe reads replicated params and fixed inputs
      measure.check_axis(a, axis_name)
    num_samples, num_nodes = a.shape
    if pool and num_nodes != max_nodes:
      raise ValueError(
          f"scale_by_connectome: pool=True with max_nodes={max_nodes} needs "
          f"at least {max_nodes} signals, got {num_nodes}: set max_nodes <= "
          f"{num_nodes}.")
    costly = COSTLY_WD_NODES if distance == "wd" else COSTLY_TOP_NODES
    if num_nodes > costly:
      low, high = expected_seconds(distance, num_nodes)
      warn_once(
          f"scale_by_connectome: {num_nodes} signals with distance="
          f"{distance!r}: one measurement takes roughly {low:.2g}-"
          f"{high:.2g} s on a 2-core CPU; set max_nodes (<= {costly}) or "
          "a larger every.")
    if probe is not None and num_samples < num_nodes + 1:
      warn_once(
          f"scale_by_connectome: the probe gives {num_samples} samples for "
          f"{num_nodes} signals: a correlation from fewer than P + 1 samples "
          "is rank-deficient; use at least max(256, 2 P) samples.")
    return a

  def skip(state):
    return state._replace(
        counters=state.counters + _slot(_SKIPPED).astype(jnp.int32))

  def accept(state, summaries, dist, noise_values, num_nodes):
    """Fold an accepted measurement into the state (DESIGN.md 2)."""
    counters, values, history = fold(
        gate_config, state.counters, state.values, state.history, dist,
        noise_values, num_nodes)
    new = state._replace(counters=counters, values=values, history=history,
                         reference=summaries)
    return measure.match_varying(new, state)

  def measure_stats(state, stats):
    """Measure split statistics (leading parts axis) and update the state."""
    whole = measure.merge_parts(stats)
    num_nodes = whole.total.shape[-1]
    parts = [whole]
    if noise:
      parts += [measure.part(stats, 0), measure.part(stats, 1)]
    ok = functools.reduce(jnp.logical_and, [measure.usable(s) for s in parts])
    if on_host_after_connectome(num_nodes):
      return measure_on_host(state, parts, ok, num_nodes)

    def from_usable(state):
      mats = [correlation_from_stats(s) for s in parts]
      outs = [measure.summarise(m, state.reference[i], distance=distance,
                                resolution=resolution, backend=backend,
                                axis_name=stats_axis)
              for i, m in enumerate(mats)]
      summaries = jnp.stack([o[0] for o in outs])
      dists = jnp.stack([o[1] for o in outs])
      good = functools.reduce(jnp.logical_and, [o[2] for o in outs])
      if noise:
        floor, floor_ok = measure.summary_distance(
            summaries[1], summaries[2], mats[2], distance=distance,
            num_nodes=num_nodes, resolution=resolution)
        noise_values = jnp.stack([floor, dists[1], dists[2]])
        good = good & floor_ok
      else:
        noise_values = jnp.zeros((3,), jnp.float32)
      # x * 0 is NaN exactly where x is not finite; a product, not a
      # reduction (see cgalr_jax._sums).
      good = good & ~jnp.isnan(_sums.total(jnp.concatenate(
          [summaries.reshape(-1), dists, noise_values]) * 0))
      return jax.lax.cond(
          good, lambda s: accept(s, summaries, dists[0], noise_values,
                             num_nodes), skip,
          state)

    return jax.lax.cond(ok, from_usable, skip, state)

  def on_host_after_connectome(num_nodes):
    """TOP on the host, one replica: everything after the connectome runs
    in one host call (summaries, distances, gate, state), so the measuring
    branch stays a handful of operations."""
    return (distance == "top" and stats_axis is None
            and not measure.bound_axis_names()
            and measure.resolve_backend(backend, distance,
                                        num_nodes) == "host")

  def measure_on_host(state, parts, ok, num_nodes):
    mats = jnp.stack([condensed_from_stats(s) for s in parts])
    floats = [jnp.asarray(getattr(gate_config, k), jnp.float32)
              for k in _GATE_FLOATS]
    bits = lambda x: jax.lax.bitcast_convert_type(  # noqa: E731
        x.astype(jnp.float32), jnp.int32).reshape(-1)
    packed = jnp.concatenate([
        bits(jnp.stack([ok.astype(jnp.float32)] + floats)), state.counters,
        bits(state.values), bits(state.history), bits(state.reference)])
    at = _host_layout(gate_config.window, reference_shape)
    host = functools.partial(
        _measure_host, window=gate_config.window,
        min_history=gate_config.min_history, score=gate_config.score,
        num_nodes=num_nodes, resolution=resolution,
        reference_shape=reference_shape)
    flat, good = topology.host_callback(
        lambda *args: (host(*args),),
        (jax.ShapeDtypeStruct((int(at[-1]),), jnp.int32),
         jax.ShapeDtypeStruct((), jnp.bool_)), packed, mats)
    as_float = jax.lax.bitcast_convert_type(flat, jnp.float32)
    skipped = skip(state)
    return state._replace(
        counters=jnp.where(good, flat[at[0]:at[1]], skipped.counters),
        values=jnp.where(good, as_float[at[1]:at[2]], state.values),
        history=jnp.where(good, as_float[at[2]:at[3]], state.history),
        reference=jnp.where(good, as_float[at[3]:].reshape(reference_shape),
                            state.reference))

  def measure_signals(state, a):
    return measure_stats(state, measure.split_stats(
        a, halves=noise, axis_name=stats_axis))

  def measure_pool(state):
    state = measure_stats(state, state.pool)
    return state._replace(pool=measure.match_varying(
        measure.empty_pool(num_parts, max_nodes), state.pool))

  # Jitted so that eager (un-jitted) training loops compile the measurement
  # once; inside an outer jit, vmap, scan or shard_map it simply inlines.
  @jax.jit
  def scaled_update(updates, state, params, activations):
    count = state.count
    due = (count + 1) % jnp.asarray(every, count.dtype) == 0
    applied = state.scale  # pool and batch act from the next update (Lag)
    if probe is not None:
      state = jax.lax.cond(
          due, lambda s: measure_signals(s, read_signals(probe(params))),
          lambda s: s, state)
      applied = state.scale  # a probe reads only params: it may act now
    elif pool:
      if activations is not None:
        state = state._replace(pool=measure.pool_add(
            state.pool, read_signals(activations), axis_name=stats_axis))
      state = jax.lax.cond(due, measure_pool, lambda s: s, state)
    elif activations is not None:
      state = jax.lax.cond(
          due, lambda s: measure_signals(s, read_signals(activations)),
          lambda s: s, state)
    else:
      state = jax.lax.cond(due, skip, lambda s: s, state)
    state = state._replace(counters=jnp.where(
        _slot(_COUNT), optax.safe_increment(count), state.counters))
    updates = jax.tree.map(
        lambda u: None if u is None else u * applied.astype(u.dtype), updates)
    return updates, state

  def check_state(state):
    """Static shape checks: a state restored from another configuration."""
    if not isinstance(state, ScaleByConnectomeState):
      raise TypeError(
          "scale_by_connectome: expected a ScaleByConnectomeState, got "
          f"{type(state).__name__}.")
    if state.history.shape != (gate_config.window,):
      raise ValueError(
          f"scale_by_connectome: the state's history holds "
          f"{state.history.shape[0]} distances but window="
          f"{gate_config.window}: the state comes from another configuration "
          "(restore it into an optimizer built with the same window).")
    if state.reference.shape != reference_shape:
      raise ValueError(
          f"scale_by_connectome: the state's reference has shape "
          f"{state.reference.shape}, this configuration (distance="
          f"{distance!r}, resolution={resolution}, noise={noise}) needs "
          f"{reference_shape}: restore into the same configuration.")
    has_pool = state.pool is not None
    if has_pool != pool:
      raise ValueError(
          f"scale_by_connectome: the state was built for the "
          f"{'pool' if has_pool else 'probe or batch'} source, this "
          f"optimizer uses the {source} source.")
    if pool and state.pool.gram.shape != (num_parts, max_nodes, max_nodes):
      raise ValueError(
          f"scale_by_connectome: the state's pool has "
          f"{state.pool.gram.shape[-1]} nodes and noise halves "
          f"{state.pool.gram.shape[0] == 2}; this optimizer has max_nodes="
          f"{max_nodes}, noise={noise}.")

  def check_extra(extra_args):
    for name in extra_args:
      if name in KNOWN_EXTRA_ARGS:
        continue
      if difflib.get_close_matches(name, ["activations"], n=1, cutoff=0.7):
        raise TypeError(
            f"scale_by_connectome: update() got {name!r}; did you mean "
            "'activations'?")
      warn_once(
          f"scale_by_connectome: update() ignores the extra argument "
          f"{name!r} (it takes params and activations=).")

  def update_fn(updates, state, params=None, *, activations=None,
                **extra_args):
    check_extra(extra_args)
    check_state(state)
    if probe is not None:
      if activations is not None:
        raise TypeError(
            "scale_by_connectome: this transform reads its signals from its "
            "probe; do not pass activations= to update (or build it "
            "without probe= to measure the activations you pass).")
      if params is None:
        raise TypeError(
            "scale_by_connectome: with a probe, update needs params "
            "(opt.update(grads, state, params)): the probe reads them.")
    elif activations is None:
      warn_once(
          f"scale_by_connectome: update() without activations and no probe: "
          f"the {source} source has nothing to measure, so every measuring "
          "step is a counted skip (diagnostics()['skipped']) and the scale "
          "stays put. Build it with probe=fn(params) -> activations.")
    return scaled_update(updates, state, params if probe is not None else None,
                         activations)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def cgalr(
    learning_rate: optax.ScalarOrSchedule,
    momentum: float | None = 0.9,
    nesterov: bool = False,
    accumulator_dtype: Any | None = None,
    **connectome_kwargs: Any,
) -> optax.GradientTransformationExtraArgs:
  """SGD with momentum whose step is scaled by CG-ALR.

  ``chain(trace(momentum), scale_by_connectome(...),
  scale_by_learning_rate(learning_rate))``, with ``optax.sgd``'s positional
  order (``learning_rate, momentum, nesterov, accumulator_dtype``). Use
  :func:`cgalr_jax.robbins_monro` as ``learning_rate`` for the envelope the
  convergence guarantee needs.

  Works under ``optax.inject_hyperparams``: the learning rate, momentum and
  the gate's float settings (``enter_z``, ``exit_z``, ``boost``, ``brake``,
  ``min_scale``, ``max_scale``, ``every``) may be injected. Callables other
  than the learning rate (``probe``, ``select``) must be named in
  ``static_args``, and sizes (``window``, ``min_history``, ``resolution``,
  ``max_nodes``, ``seed``) must either keep their ``None`` default or be
  named there too.

  Args:
    learning_rate: float or ``optax.Schedule``.
    momentum: momentum decay in [0, 1); None disables momentum.
    nesterov: use Nesterov momentum.
    accumulator_dtype: dtype of the momentum accumulator (default: the
      params' dtype).
    **connectome_kwargs: the keywords of :func:`scale_by_connectome`
      (``distance``, ``probe``, ``every``, the gate's settings...); the
      signature names each of them.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from cgalr_jax import cgalr, robbins_monro
    >>> x = jax.random.normal(jax.random.key(0), (256, 4))
    >>> opt = cgalr(robbins_monro(0.1), probe=lambda p: jnp.tanh(x @ p["w"]))
    >>> state = opt.init({"w": jnp.ones((4, 8))})
  """
  m = gate_lib.concrete_float(momentum) if momentum is not None else None
  if momentum is not None and m is not None and not (
      math.isfinite(m) and 0 <= m < 1) or isinstance(momentum, bool):
    raise ValueError(f"cgalr: momentum must be in [0, 1), got {momentum!r}.")
  parts = []
  if momentum is not None:
    parts.append(optax.trace(decay=momentum, nesterov=nesterov,
                             accumulator_dtype=accumulator_dtype))
  parts.append(scale_by_connectome(**connectome_kwargs))
  parts.append(optax.scale_by_learning_rate(learning_rate))
  return optax.chain(*parts)


# cgalr's signature lists scale_by_connectome's keywords by name: unknown
# keywords are then a TypeError, and optax.inject_hyperparams (which binds
# arguments by signature) can see and inject the gate's settings.
cgalr.__signature__ = inspect.Signature(
    list(inspect.signature(cgalr).parameters.values())[:4] + [
        p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
        for p in inspect.signature(scale_by_connectome).parameters.values()],
    return_annotation=optax.GradientTransformationExtraArgs)


def find_states(opt_state: Any) -> list[ScaleByConnectomeState]:
  """Every :class:`ScaleByConnectomeState` inside a (chained) optimizer state."""
  is_state = lambda x: isinstance(x, ScaleByConnectomeState)  # noqa: E731
  return [x for x in jax.tree.leaves(opt_state, is_leaf=is_state)
          if is_state(x)]


DIAGNOSTIC_FIELDS = ("distance", "z", "gate", "scale", "measured", "skipped",
                     "noise", "even_distance", "odd_distance")


def diagnostics(opt_state: Any) -> dict[str, jax.Array]:
  """Read CG-ALR's distance, z, gate, scale, counts and noise floor.

  Finds the connectome state anywhere inside ``opt_state`` (a chain, a
  ``multi_transform``, an ``inject_hyperparams`` wrapper...). With several
  CG-ALR transforms (per-layer gates) each value is stacked along a new
  leading axis in tree order. Works inside ``jit``.

  Returns:
    A dict with ``distance`` (last distance), ``z``, ``gate`` (HOLD 0, BRAKE
    -1, BOOST +1), ``scale`` (applied to the next update), ``measured`` and
    ``skipped`` (counts), ``noise`` (distance between the even and odd
    halves of the last measurement), ``even_distance`` and
    ``odd_distance`` (each half's distance to the same half of the previous
    measurement). The noise fields are 0 unless the transform was built with
    ``noise=True``. Every value is a scalar per CG-ALR transform.

  Raises:
    ValueError: if ``opt_state`` holds no CG-ALR state.
  """
  states = find_states(opt_state)
  if not states:
    raise ValueError("diagnostics: no scale_by_connectome state in opt_state.")
  if len(states) == 1:
    return {k: getattr(states[0], k) for k in DIAGNOSTIC_FIELDS}
  return {k: jnp.stack([getattr(s, k) for s in states])
          for k in DIAGNOSTIC_FIELDS}

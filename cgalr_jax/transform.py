"""CG-ALR as Optax gradient transformations (DESIGN.md sections 2 and 3)."""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from cgalr_jax.connectome import (correlation_from_stats, live_signals,
                                  signal_stats, signals)
from cgalr_jax import gate as gate_lib
from cgalr_jax import topology

_DISTANCES = ("top", "wd")
_BACKENDS = ("auto", "device", "host")
# WD runs Vietoris-Rips persistence on the host: always under a node budget.
DEFAULT_WD_MAX_NODES = 64


class ScaleByConnectomeState(NamedTuple):
  """State of :func:`scale_by_connectome`; every field has a fixed shape.

  Attributes:
    count: int32, number of updates seen (drives ``every``).
    scale: float32, the current multiplier, in ``[min_scale, max_scale]``.
    gate: int32, hysteresis state: HOLD 0, BRAKE -1, BOOST +1.
    z: float32, robust score of the last distance (0 until ``min_history``).
    distance: float32, the last distance measured (0 before the first).
    history: float32 ``[window]`` ring buffer of past log distances.
    history_count: int32, number of distances pushed (once the buffer is
      full it stays in ``[window, 2 window)``, wrapping by ``window``).
    reference: float32 summary of the last accepted connectome: ``[2, K]``
      birth/death quantiles for TOP, ``[2, K, 2]`` H0/H1 diagrams for WD.
    reference_nodes: int32, node count P of ``reference``; 0 means none yet.
    measured: int32, number of accepted measurements.
    skipped: int32, number of measurements skipped (bad activations, failed
      host step, or a change of node count).
  """

  count: jax.Array
  scale: jax.Array
  gate: jax.Array
  z: jax.Array
  distance: jax.Array
  history: jax.Array
  history_count: jax.Array
  reference: jax.Array
  reference_nodes: jax.Array
  measured: jax.Array
  skipped: jax.Array


def _require(ok: bool, name: str, allowed: str, value: Any) -> None:
  if not ok:
    raise ValueError(
        f"scale_by_connectome: {name} must be {allowed}, got {value!r}.")


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
  return (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value))


def _validate(distance, window, min_history, enter_z, exit_z, boost, brake,
              min_scale, max_scale, every, max_nodes, resolution, seed,
              backend):
  _require(distance in _DISTANCES, "distance", f"one of {_DISTANCES}", distance)
  _require(_is_int(window) and window >= 2, "window", "an int >= 2", window)
  _require(_is_int(min_history) and 1 <= min_history <= window, "min_history",
           f"an int in [1, window={window}]", min_history)
  _require(_is_real(enter_z) and enter_z > 0, "enter_z", "a finite float > 0",
           enter_z)
  _require(_is_real(exit_z) and 0 <= exit_z < enter_z, "exit_z",
           f"a float in [0, enter_z={enter_z})", exit_z)
  _require(_is_real(boost) and boost > 1, "boost", "a finite float > 1", boost)
  _require(_is_real(brake) and 0 < brake < 1, "brake", "a float in (0, 1)",
           brake)
  _require(_is_real(min_scale) and 0 < min_scale <= 1, "min_scale",
           "a float in (0, 1]", min_scale)
  _require(_is_real(max_scale) and max_scale >= 1, "max_scale",
           "a finite float >= 1", max_scale)
  _require(_is_int(every) and every >= 1, "every", "an int >= 1", every)
  _require(max_nodes is None or (_is_int(max_nodes) and max_nodes >= 2),
           "max_nodes", "None or an int >= 2", max_nodes)
  _require(_is_int(resolution) and resolution >= 1, "resolution",
           "an int >= 1", resolution)
  _require(_is_int(seed), "seed", "an int", seed)
  _require(backend in _BACKENDS, "backend", f"one of {_BACKENDS}", backend)
  _require(not (distance == "wd" and backend == "device"), "backend",
           "'auto' or 'host' for distance='wd' (WD runs on the host)", backend)


def _selector(select: Any) -> Callable[[Any], Any]:
  """Turn ``select`` (None, key, key path or callable) into a function."""
  if select is None:
    return lambda activations: activations
  if callable(select):
    return select
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


def resolve_backend(backend: str, distance: str,
                    num_nodes: int | None = None) -> str:
  """The TOP backend ``"auto"`` stands for on the current default platform.

  Chosen by ``python -m experiments.overhead`` (README, Performance). On an
  idle 2-core CPU the device backend is as fast or faster up to ~384
  signals (and clearly faster for the reference MLP at ``every=10``): a
  ``jax.pure_callback`` costs ~0.3 ms per call and ~1 ms per step merely by
  being in the program. From ~512 signals the host backend wins
  (1.5-1.7x): XLA:CPU sorts ~6x slower per edge than NumPy. So on CPU
  "auto" is the device backend unless ``num_nodes`` is known to be at least
  512. On GPU/TPU it is the device backend, which avoids the host round
  trip (not measured here).

  Args:
    backend: ``"auto"``, ``"device"`` or ``"host"``.
    distance: ``"top"`` or ``"wd"`` (WD always runs on the host).
    num_nodes: the connectome's P when known at trace time.
  """
  if distance == "wd":
    return "host"
  if backend != "auto":
    return backend
  if jax.default_backend() != "cpu":
    return "device"
  host_min_nodes = 512
  if num_nodes is not None and num_nodes >= host_min_nodes:
    return "host"
  return "device"


def scale_by_connectome(
    distance: str = "top",
    *,
    window: int = 20,
    min_history: int = 5,
    enter_z: float = 1.0,
    exit_z: float = 0.25,
    boost: float = 1.05,
    brake: float = 0.95,
    min_scale: float = 0.1,
    max_scale: float = 4.0,
    every: int = 1,
    max_nodes: int | None = None,
    resolution: int = 512,
    seed: int = 0,
    backend: str = "auto",
    select: str | Sequence[Any] | Callable[[Any], Any] | None = None,
    axis_name: Any = None,
) -> optax.GradientTransformationExtraArgs:
  """Scale updates by a connectome-guided, gated multiplier.

  Every ``every``-th update that receives ``activations``, the network's
  functional connectome (|Pearson| between neuron signals on the batch) is
  compared with the previous one by a persistent-homology distance. The log
  distance is scored against a trailing window with median/MAD; a hysteresis
  gate then brakes the multiplier while the network reorganises (large
  score) and boosts it while the organisation is stable (small score). The
  multiplier stays in ``[min_scale, max_scale]``, so combined with a
  Robbins-Monro step size the product is again Robbins-Monro.

  Pass activations through the extra arguments of ``update``:
  ``opt.update(grads, state, params, activations=acts)``. ``activations``
  is a pytree of ``[N, P]`` dense or ``[N, ..., C]`` channels-last leaves;
  ``None`` (the default) means no measurement on this step. Bad
  measurements (non-finite, fewer than 2 samples or live signals, failed
  host step) are skipped and counted; the scale is then unchanged.

  Args:
    distance: ``"top"`` (graph filtration, fast) or ``"wd"`` (Vietoris-Rips
      Wasserstein, host only, node budget 64 unless ``max_nodes`` says).
    window: number of past distances the robust score uses.
    min_history: distances needed before the gate may act.
    enter_z: score at which the gate enters BRAKE (``z >= enter_z``) or BOOST
      (``z <= -enter_z``).
    exit_z: score at which it returns to HOLD, ``0 <= exit_z < enter_z``.
    boost: factor applied per measured step in BOOST, > 1.
    brake: factor applied per measured step in BRAKE, in (0, 1).
    min_scale: lower bound of the multiplier, in (0, 1].
    max_scale: upper bound of the multiplier, >= 1.
    every: measure on every ``every``-th update.
    max_nodes: optional node budget; a fixed subset of signals drawn from
      ``seed`` is kept at every step.
    resolution: K, points in the fixed-size topological summary.
    seed: seed of the node subset.
    backend: TOP backend, ``"device"`` (pure JAX), ``"host"`` (NumPy through
      ``jax.pure_callback``) or ``"auto"``: the device backend on GPU/TPU,
      and on CPU below 512 signals; the host backend on CPU from 512 signals
      (see :func:`resolve_backend` and README, Performance).
    select: which part of ``activations`` this transform reads: a key, a
      sequence of keys (a path into nested dicts), or a callable mapping the
      activations pytree to the part. Lets several instances inside
      ``optax.multi_transform`` each follow their own layer (per-layer gates).
    axis_name: the data-parallel axis under ``shard_map``/``pmap``: the
      connectome's sufficient statistics are summed across it, host
      persistence runs once (on the axis' first replica) and is broadcast,
      so every replica keeps the identical scale. Not needed under ``jit``
      with sharded arrays (GSPMD), where the reductions are already global.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  References:
    He & Songdechakraiwut, "Connectome-Guided Automatic Learning Rates for
    Deep Networks", arXiv:2510.23781, 2025.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from cgalr_jax import scale_by_connectome
    >>> opt = optax.chain(scale_by_connectome(), optax.sgd(0.1))
    >>> params = {"w": jnp.ones(3)}
    >>> state = opt.init(params)
    >>> acts = jax.random.normal(jax.random.key(0), (32, 16))
    >>> updates, state = opt.update(params, state, params, activations=acts)
  """
  _validate(distance, window, min_history, enter_z, exit_z, boost, brake,
            min_scale, max_scale, every, max_nodes, resolution, seed, backend)
  if not (select is None or callable(select) or isinstance(
      select, (str, int, list, tuple))):
    raise ValueError(
        "scale_by_connectome: select must be None, a key, a sequence of keys "
        f"or a callable, got {select!r}.")
  pick = _selector(select)
  if distance == "wd" and max_nodes is None:
    max_nodes = DEFAULT_WD_MAX_NODES
  summary_shape = (2, resolution) if distance == "top" else (2, resolution, 2)

  def init_fn(params):
    del params
    zero_i = jnp.zeros((), jnp.int32)
    zero_f = jnp.zeros((), jnp.float32)
    return ScaleByConnectomeState(
        count=zero_i, scale=jnp.ones((), jnp.float32), gate=zero_i,
        z=zero_f, distance=zero_f,
        history=jnp.zeros((window,), jnp.float32), history_count=zero_i,
        reference=jnp.zeros(summary_shape, jnp.float32),
        reference_nodes=zero_i, measured=zero_i, skipped=zero_i)

  def skip(state):
    return state._replace(skipped=state.skipped + 1)

  def summarise(m, reference, num_nodes):
    """``(summary, distance_to_reference, ok)`` for a connectome."""
    chosen = resolve_backend(backend, distance, num_nodes)
    if axis_name is not None and chosen == "host":
      # Run the host step once per data axis, on its first replica, and
      # broadcast it: adding zeros is exact, so every replica agrees bitwise.
      lead = jax.lax.axis_index(axis_name) == 0
      shapes = jax.eval_shape(lambda: summarise_here(m, reference, num_nodes,
                                                     chosen))
      out = jax.lax.cond(
          lead, lambda: summarise_here(m, reference, num_nodes, chosen),
          lambda: jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes))
      summary, dist, ok = jax.lax.psum(
          (out[0], out[1], out[2].astype(jnp.int32)), axis_name)
      return summary, dist, ok > 0
    return summarise_here(m, reference, num_nodes, chosen)

  def summarise_here(m, reference, num_nodes, chosen):
    if distance == "wd":
      return topology.wd_measure_via_host(m, reference, resolution)
    if chosen == "device":
      summary, ok = topology.top_summary_device(m, resolution), jnp.array(True)
    else:
      summary, ok = topology.top_summary_via_host(m, resolution)
    return (summary, topology.top_summary_distance(reference, summary,
                                                   num_nodes), ok)

  def accept(state, summary, dist, num_nodes):
    """Fold an accepted measurement into the state (DESIGN.md 2)."""
    has_ref = state.reference_nodes == num_nodes
    first = state.reference_nodes == 0
    log_d = gate_lib.log_distance(dist)
    ready = has_ref & (state.history_count >= min_history)
    z = jnp.where(ready, gate_lib.robust_z(state.history, state.history_count,
                                           log_d), 0.0)
    new_gate = jnp.where(ready, gate_lib.next_gate(state.gate, z, enter_z,
                                                   exit_z), state.gate)
    new_scale = jnp.where(ready, gate_lib.next_scale(
        state.scale, new_gate, brake=brake, boost=boost,
        min_scale=min_scale, max_scale=max_scale), state.scale)
    pushed, pushed_count = gate_lib.push(state.history, state.history_count,
                                         log_d)
    return state._replace(
        scale=new_scale, gate=new_gate,
        z=jnp.where(has_ref, z, state.z),
        distance=jnp.where(has_ref, dist, state.distance).astype(jnp.float32),
        history=jnp.where(has_ref, pushed, state.history),
        history_count=jnp.where(has_ref, pushed_count, state.history_count),
        reference=summary,
        reference_nodes=jnp.asarray(num_nodes, jnp.int32),
        measured=state.measured + jnp.where(has_ref | first, 1, 0),
        skipped=state.skipped + jnp.where(has_ref | first, 0, 1))

  def measure(state, activations):
    a = signals(pick(activations), max_nodes=max_nodes, seed=seed)
    num_samples, num_nodes = a.shape
    if num_nodes < 2 or (axis_name is None and num_samples < 2):
      return skip(state)
    stats = signal_stats(a, axis_name=axis_name)
    valid = ((stats.n >= 2) & jnp.all(jnp.isfinite(stats.gram))
             & jnp.all(jnp.isfinite(stats.shift))
             & (jnp.sum(live_signals(stats)) >= 2))

    def from_valid_stats(state):
      m = correlation_from_stats(stats)
      summary, dist, ok = summarise(m, state.reference, num_nodes)
      ok = ok & jnp.all(jnp.isfinite(summary)) & jnp.isfinite(dist)
      return jax.lax.cond(ok, lambda s: accept(s, summary, dist, num_nodes),
                          skip, state)

    return jax.lax.cond(valid, from_valid_stats, skip, state)

  # Jitted so that eager (un-jitted) training loops compile the measurement
  # once instead of retracing its branches on every call; inside an outer
  # jit, vmap, scan or shard_map it simply inlines.
  @jax.jit
  def scaled_update(updates, state, activations):
    if activations is not None:
      due = state.count % every == 0
      state = jax.lax.cond(due, lambda s: measure(s, activations),
                           lambda s: s, state)
    state = state._replace(count=optax.safe_increment(state.count))
    scale = state.scale
    updates = jax.tree.map(
        lambda u: None if u is None else u * scale.astype(u.dtype), updates)
    return updates, state

  def update_fn(updates, state, params=None, *, activations=None,
                **extra_args):
    del params, extra_args
    return scaled_update(updates, state, activations)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def cgalr(learning_rate: optax.ScalarOrSchedule, *, momentum: float | None = 0.9,
          nesterov: bool = False,
          **connectome_kwargs) -> optax.GradientTransformationExtraArgs:
  """SGD with momentum whose step is scaled by CG-ALR.

  ``chain(trace(momentum), scale_by_connectome(...),
  scale_by_learning_rate(learning_rate))``. Use
  :func:`cgalr_jax.robbins_monro` as ``learning_rate`` for the envelope the
  convergence guarantee needs.

  Args:
    learning_rate: float or ``optax.Schedule``.
    momentum: momentum decay in [0, 1); 0 or None disables momentum.
    nesterov: use Nesterov momentum.
    **connectome_kwargs: passed to :func:`scale_by_connectome`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; pass ``activations=`` to
    its ``update``.

  Example:
    >>> import jax.numpy as jnp
    >>> from cgalr_jax import cgalr, robbins_monro
    >>> opt = cgalr(robbins_monro(0.1))
    >>> state = opt.init({"w": jnp.zeros(3)})
  """
  if momentum is not None and not (
      isinstance(momentum, (int, float)) and 0 <= momentum < 1):
    raise ValueError(f"cgalr: momentum must be in [0, 1), got {momentum!r}.")
  parts = []
  if momentum:
    parts.append(optax.trace(decay=momentum, nesterov=nesterov))
  parts.append(scale_by_connectome(**connectome_kwargs))
  parts.append(optax.scale_by_learning_rate(learning_rate))
  return optax.chain(*parts)


def find_states(opt_state: Any) -> list[ScaleByConnectomeState]:
  """Every :class:`ScaleByConnectomeState` inside a (chained) optimizer state."""
  is_state = lambda x: isinstance(x, ScaleByConnectomeState)  # noqa: E731
  return [x for x in jax.tree.leaves(opt_state, is_leaf=is_state)
          if is_state(x)]


_DIAGNOSTIC_FIELDS = ("distance", "z", "gate", "scale", "measured", "skipped")


def diagnostics(opt_state: Any) -> dict[str, jax.Array]:
  """Read CG-ALR's distance, z, gate, scale, measured and skipped counts.

  Finds the connectome state anywhere inside ``opt_state`` (a chain, a
  ``multi_transform``, an ``inject_hyperparams`` wrapper...). With several
  CG-ALR transforms (per-layer gates) each value is stacked along a new
  leading axis in tree order. Works inside ``jit``.

  Raises:
    ValueError: if ``opt_state`` holds no CG-ALR state.
  """
  states = find_states(opt_state)
  if not states:
    raise ValueError("diagnostics: no scale_by_connectome state in opt_state.")
  if len(states) == 1:
    return {k: getattr(states[0], k) for k in _DIAGNOSTIC_FIELDS}
  return {k: jnp.stack([getattr(s, k) for s in states])
          for k in _DIAGNOSTIC_FIELDS}

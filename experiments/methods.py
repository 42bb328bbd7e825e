"""Every optimiser of the comparison, one registry (DESIGN.md section 5).

``METHODS[name]`` is a :class:`Method` that knows its family;
``build(name, lr, total_steps, steps_per_epoch, ...)`` returns its Optax
transformation. All are built from Optax (and ``cgalr_jax`` for CG-ALR):

==============  ==============================================================
cgalr_top       ``cgalr`` (SGD momentum 0.9, TOP distance) on a Robbins-Monro
                envelope; probe source (a fixed probe set, see train.py)
cgalr_wd        the same with the WD distance (64-node budget, the default);
                tunes its own learning rate
cgalr_batch     version 1: TOP on the activations of each training batch
                (``update(activations=...)``); tunes its own learning rate
cgalr_pool      TOP on the pool of the batches since the last measurement
                (gate study only; not in the default comparison)
cgalr_shuffled  control: the same gate fed a random permutation of the z
                sequence cgalr_top produced on the same seed (no measurement)
cgalr_replay    control: the ungated envelope times a scale trajectory
                recorded by cgalr_top on the tuning seeds (open loop)
rm_envelope     SGD momentum 0.9 on the same Robbins-Monro envelope, no gate
                (the ablation: what the gate adds)
sgd_const       SGD momentum 0.9, constant step
sgd_step        ... x0.1 at 50% and again at 75% of training
sgd_exp         ... exponential decay to 1% of the base step at the end
sgd_cosine      ... cosine decay to 0
adam_const      Adam, constant step
adam_cosine     Adam, cosine decay to 0
dog             ``optax.contrib.dog`` (learning-rate free, lr 1.0)
prodigy         ``optax.contrib.prodigy`` (learning-rate free, lr 1.0)
plateau         SGD momentum 0.9 + ``optax.contrib.reduce_on_plateau`` on the
                epoch-averaged training loss (halve after 3 flat epochs);
                ``update`` needs ``value=loss``
==============  ==============================================================

The Robbins-Monro envelope is ``robbins_monro(lr, t0=total_steps / 10,
power=0.75)``: it ends at 11^-0.75 ~ 17% of the base step whatever the run
length. CG-ALR's gate constants and cadence are the gate study's choice
(``STUDY_GATE``, once per epoch) on every dataset; the gate study itself
passes its variants through ``build(..., gate=..., every=...)``.

Every tuned method is linear in its base learning rate: the transformation
built with ``lr`` equals the one built with ``lr=1`` followed by a
multiplication of the updates by ``lr`` (the training loop uses this to run
several learning rates in one compiled program). ``test_experiments.py``
checks it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax

import cgalr_jax
from cgalr_jax import gate as gate_lib

MOMENTUM = 0.9
# Geometric centres of the learning-rate grids, per optimiser family (not per
# dataset). With tuning's 4-point grid over 1.5 decades: SGD family 0.0316,
# 0.1, 0.316, 1; Adam family 0.001, 0.00316, 0.01, 0.0316 (half-decade steps;
# version 1's 5-point grids also had 0.01 and 3e-4, which no method chose).
SGD_CENTRE = 10 ** -0.75
ADAM_CENTRE = 10 ** -2.25

# The gate validation study's choice (experiments/README.md, "Gate study";
# validation data only, one setting for every dataset). Every CG-ALR method
# and both controls use it unless build() is given gate=/every=.
STUDY_GATE = dict(score="detrended", enter_z=1.5, exit_z=0.5, boost=1.1,
                  brake=1 / 1.1, min_scale=0.25, max_scale=4.0, window=20,
                  min_history=5)
STUDY_EVERY = "epoch"  # measure once per epoch (steps_per_epoch updates)

# Families. "cgalr": measures the network; "control": CG-ALR's envelope and
# multiplier without measurement; the rest are the baselines.
FAMILIES = ("cgalr", "control", "envelope", "sgd", "adam", "free")
# Families whose transformation measures inside a lax.cond (train.py runs
# their seeds with lax.map rather than vmap).
MEASURING_FAMILIES = ("cgalr",)


@dataclasses.dataclass(frozen=True)
class Method:
  """One optimiser of the comparison.

  Attributes:
    name: registry key.
    family: one of ``FAMILIES``.
    factory: ``factory(lr, total_steps, steps_per_epoch, **options) ->
      transformation`` (``options``: see :func:`build`).
    tuned: whether the base learning rate is tuned (False: learning-rate free,
      lr is reported as null).
    centre: centre of the tuning grid (ignored when not tuned).
    source: CG-ALR's signal source: ``"probe"``, ``"pool"``, ``"batch"``, or
      None (no measurement).
    uses_value: ``update`` takes ``value=loss`` (reduce_on_plateau).
    lr_from: take the tuned learning rate of this method instead of tuning
      (the controls use cgalr_top's: same envelope, same base step).
    needs: what the training loop must hand the factory per run:
      ``"z_sequence"`` (cgalr_shuffled), ``"scale_trajectory"``
      (cgalr_replay) or None.
  """

  name: str
  family: str
  factory: Callable[..., optax.GradientTransformation]
  tuned: bool = True
  centre: float = SGD_CENTRE
  source: str | None = None
  uses_value: bool = False
  lr_from: str | None = None
  needs: str | None = None

  @property
  def uses_activations(self) -> bool:
    """``update`` takes ``activations=`` (pool and batch sources)."""
    return self.source in ("pool", "batch")

  @property
  def gated(self) -> bool:
    """Holds a CG-ALR state (``cgalr_jax.diagnostics`` reads it)."""
    return self.family == "cgalr"


def envelope(lr: float, total_steps: int) -> optax.Schedule:
  """The Robbins-Monro envelope shared by CG-ALR, its controls, rm_envelope."""
  return cgalr_jax.robbins_monro(lr, t0=max(1.0, total_steps / 10.0),
                                 power=0.75)


def resolve_every(every: Any, steps_per_epoch: int) -> int | None:
  """``every``: None (library default), an int, or ``"epoch"``."""
  if every == "epoch":
    return int(steps_per_epoch)
  return None if every is None else int(every)


def measuring_period(every: Any, steps_per_epoch: int) -> int:
  """The measuring period in updates that ``build(..., every=every)`` uses
  (None: the study's choice, ``STUDY_EVERY``)."""
  return resolve_every(STUDY_EVERY if every is None else every,
                       steps_per_epoch)


def _sgd(schedule):
  return optax.sgd(schedule, momentum=MOMENTUM)


def _step_schedule(lr, total):
  return optax.piecewise_constant_schedule(
      lr, {max(1, total // 2): 0.1, max(2, (3 * total) // 4): 0.1})


def _plateau(lr, total, spe, **_):
  del total
  return optax.chain(
      _sgd(lr),
      optax.contrib.reduce_on_plateau(factor=0.5, patience=3,
                                      accumulation_size=spe))


def _cgalr(distance: str, source: str):
  def factory(lr, total, spe, *, probe=None, gate=None, every=None,
              noise=False, max_nodes=None, **_):
    kwargs: dict[str, Any] = dict(gate or {})
    if source == "probe":
      if probe is None:
        raise ValueError("the probe source needs probe=fn(params).")
      kwargs["probe"] = probe
    elif source == "pool":
      kwargs.update(pool=True, max_nodes=max_nodes)
    return cgalr_jax.cgalr(envelope(lr, total), momentum=MOMENTUM,
                           distance=distance, noise=noise,
                           every=resolve_every(every, spe), **kwargs)
  return factory


class ReplayGateState(NamedTuple):
  count: jax.Array  # updates seen
  index: jax.Array  # next entry of the z sequence
  gate: jax.Array
  scale: jax.Array


def replay_gate(z_sequence: jax.Array, *, every: int,
                config: gate_lib.GateConfig) -> optax.GradientTransformation:
  """The shuffled-z control: CG-ALR's gate fed a given z sequence.

  At every ``every``-th update (the updates at which CG-ALR measures) the
  next z of ``z_sequence`` goes through :func:`cgalr_jax.gate.next_gate` and
  :func:`cgalr_jax.gate.next_scale`, exactly as CG-ALR's gate would treat
  it; nothing is measured. Past the sequence's end z is 0. The scale acts
  on the update it is computed at (as with the probe source).
  """
  z_sequence = jnp.asarray(z_sequence, jnp.float32)
  length = z_sequence.shape[0]
  if length == 0:  # a run too short to measure: z is 0 throughout
    z_sequence = jnp.zeros((1,), jnp.float32)

  def init_fn(params):
    del params
    return ReplayGateState(jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32),
                           jnp.zeros((), jnp.int32), jnp.ones((), jnp.float32))

  def update_fn(updates, state, params=None):
    del params
    due = (state.count + 1) % every == 0
    z = jnp.where(state.index < length,
                  z_sequence[jnp.minimum(state.index, length - 1)], 0.0)
    gate = jnp.where(due, gate_lib.next_gate(state.gate, z, config.enter_z,
                                             config.exit_z), state.gate)
    scale = jnp.where(due, gate_lib.next_scale(
        state.scale, gate, brake=config.brake, boost=config.boost,
        min_scale=config.min_scale, max_scale=config.max_scale), state.scale)
    updates = jax.tree.map(lambda u: u * scale.astype(u.dtype), updates)
    return updates, ReplayGateState(state.count + 1,
                                    state.index + due.astype(jnp.int32),
                                    gate.astype(jnp.int32), scale)

  return optax.GradientTransformation(init_fn, update_fn)


def replay_scale(trajectory: jax.Array) -> optax.GradientTransformation:
  """Multiply update t by ``trajectory[t]`` (the last value past the end)."""
  trajectory = jnp.asarray(trajectory, jnp.float32)
  length = trajectory.shape[0]

  def init_fn(params):
    del params
    return optax.ScaleByScheduleState(count=jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None):
    del params
    s = trajectory[jnp.minimum(state.count, length - 1)]
    updates = jax.tree.map(lambda u: u * s.astype(u.dtype), updates)
    return updates, optax.ScaleByScheduleState(count=state.count + 1)

  return optax.GradientTransformation(init_fn, update_fn)


def gate_config(gate: Mapping[str, Any] | None = None) -> gate_lib.GateConfig:
  """The GateConfig CG-ALR builds from the same keyword overrides."""
  return gate_lib.GateConfig(**dict(gate or {}))


def _shuffled(lr, total, spe, *, z_sequence=None, gate=None, every=None, **_):
  every = measuring_period(every, spe)
  return optax.chain(
      optax.trace(decay=MOMENTUM),
      replay_gate(z_sequence, every=every, config=gate_config(gate)),
      optax.scale_by_learning_rate(envelope(lr, total)))


def _replay(lr, total, spe, *, scale_trajectory=None, **_):
  return optax.chain(
      optax.trace(decay=MOMENTUM), replay_scale(scale_trajectory),
      optax.scale_by_learning_rate(envelope(lr, total)))


def _plain(make):
  return lambda lr, t, spe, **_: make(lr, t)


_ALL = [
    Method("cgalr_top", "cgalr", _cgalr("top", "probe"), source="probe"),
    Method("cgalr_wd", "cgalr", _cgalr("wd", "probe"), source="probe"),
    Method("cgalr_batch", "cgalr", _cgalr("top", "batch"), source="batch"),
    Method("cgalr_pool", "cgalr", _cgalr("top", "pool"), source="pool",
           lr_from="cgalr_top"),
    Method("cgalr_shuffled", "control", _shuffled, lr_from="cgalr_top",
           needs="z_sequence"),
    Method("cgalr_replay", "control", _replay, lr_from="cgalr_top",
           needs="scale_trajectory"),
    Method("rm_envelope", "envelope",
           _plain(lambda lr, t: _sgd(envelope(lr, t)))),
    Method("sgd_const", "sgd", _plain(lambda lr, t: _sgd(lr))),
    Method("sgd_step", "sgd",
           _plain(lambda lr, t: _sgd(_step_schedule(lr, t)))),
    Method("sgd_exp", "sgd",
           _plain(lambda lr, t: _sgd(optax.exponential_decay(
               lr, transition_steps=max(1, t), decay_rate=0.01)))),
    Method("sgd_cosine", "sgd",
           _plain(lambda lr, t: _sgd(optax.cosine_decay_schedule(
               lr, max(1, t))))),
    Method("adam_const", "adam", _plain(lambda lr, t: optax.adam(lr)),
           centre=ADAM_CENTRE),
    Method("adam_cosine", "adam",
           _plain(lambda lr, t: optax.adam(optax.cosine_decay_schedule(
               lr, max(1, t)))), centre=ADAM_CENTRE),
    Method("dog", "free",
           _plain(lambda lr, t: optax.contrib.dog(learning_rate=lr)),
           tuned=False),
    Method("prodigy", "free",
           _plain(lambda lr, t: optax.contrib.prodigy(learning_rate=lr)),
           tuned=False),
    Method("plateau", "sgd", _plateau, uses_value=True),
]

METHODS: dict[str, Method] = {m.name: m for m in _ALL}
# The default comparison (benchmark --methods default): every method but the
# gate study's pool variant.
DEFAULT_METHODS = tuple(n for n in METHODS if n != "cgalr_pool")


def family(name: str) -> str:
  return METHODS[name].family


def build(name: str, lr: float, total_steps: int, steps_per_epoch: int = 1,
          **options: Any) -> optax.GradientTransformation:
  """The transformation of method ``name`` (untuned methods ignore ``lr``).

  ``options`` (each used only by the methods it concerns): ``probe``
  (``fn(params) -> activations``), ``gate`` (gate keywords; None:
  ``STUDY_GATE``), ``every`` (int or ``"epoch"``; None: ``STUDY_EVERY``),
  ``noise``, ``max_nodes`` (pool),
  ``z_sequence`` (cgalr_shuffled), ``scale_trajectory`` (cgalr_replay).
  """
  try:
    method = METHODS[name]
  except KeyError:
    raise ValueError(
        f"unknown method {name!r}; expected one of {sorted(METHODS)}") from None
  options.pop("steps_per_epoch", None)
  if options.get("gate") is None:
    options["gate"] = STUDY_GATE
  if options.get("every") is None:
    options["every"] = STUDY_EVERY
  return method.factory(lr if method.tuned else 1.0, int(total_steps),
                        int(steps_per_epoch), **options)

"""Every optimiser of the comparison, one registry (DESIGN.md section 5).

``METHODS[name]`` is a :class:`Method`; ``build(name, lr, total_steps)``
returns its Optax transformation. All are built from Optax (and
``cgalr_jax`` for CG-ALR):

==============  ==============================================================
cgalr_top       ``cgalr`` (SGD momentum 0.9, TOP distance) on a Robbins-Monro
                envelope; activations required
cgalr_wd        the same with the WD distance (64-node budget, the default)
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
length. CG-ALR's gate constants are the library defaults on every dataset.

Every tuned method is linear in its base learning rate: the transformation
built with ``lr`` equals the one built with ``lr=1`` followed by a
multiplication of the updates by ``lr`` (the benchmark uses this to run
several learning rates in one compiled program). ``test_experiments.py``
checks it.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import optax

import cgalr_jax

MOMENTUM = 0.9
# Centres of the learning-rate grids, per optimiser family (not per dataset).
SGD_CENTRE = 0.1
ADAM_CENTRE = 3e-3


@dataclasses.dataclass(frozen=True)
class Method:
  """One optimiser of the comparison.

  Attributes:
    name: registry key.
    factory: ``factory(lr, total_steps, steps_per_epoch) -> transformation``.
    tuned: whether the base learning rate is tuned (False: learning-rate free,
      lr is reported as null).
    centre: centre of the tuning grid (ignored when not tuned).
    uses_activations: ``update`` takes ``activations=`` (CG-ALR).
    uses_value: ``update`` takes ``value=loss`` (reduce_on_plateau).
    lr_from: take the tuned learning rate of this method instead of tuning
      (cgalr_wd uses cgalr_top's: same envelope and momentum, and WD's host
      persistence would make its tuning the most expensive by far).
  """

  name: str
  factory: Callable[..., optax.GradientTransformation]
  tuned: bool = True
  centre: float = SGD_CENTRE
  uses_activations: bool = False
  uses_value: bool = False
  lr_from: str | None = None


def envelope(lr: float, total_steps: int) -> optax.Schedule:
  """The Robbins-Monro envelope shared by cgalr_top, cgalr_wd, rm_envelope."""
  return cgalr_jax.robbins_monro(lr, t0=max(1.0, total_steps / 10.0),
                                 power=0.75)


def _sgd(schedule):
  return optax.sgd(schedule, momentum=MOMENTUM)


def _step_schedule(lr, total):
  return optax.piecewise_constant_schedule(
      lr, {max(1, total // 2): 0.1, max(2, (3 * total) // 4): 0.1})


def _plateau(lr, total, steps_per_epoch):
  del total
  return optax.chain(
      _sgd(lr),
      optax.contrib.reduce_on_plateau(factor=0.5, patience=3,
                                      accumulation_size=steps_per_epoch))


_ALL = [
    Method("cgalr_top",
           lambda lr, t, spe: cgalr_jax.cgalr(envelope(lr, t),
                                              momentum=MOMENTUM),
           uses_activations=True),
    Method("cgalr_wd",
           lambda lr, t, spe: cgalr_jax.cgalr(envelope(lr, t),
                                              momentum=MOMENTUM,
                                              distance="wd"),
           uses_activations=True, lr_from="cgalr_top"),
    Method("rm_envelope", lambda lr, t, spe: _sgd(envelope(lr, t))),
    Method("sgd_const", lambda lr, t, spe: _sgd(lr)),
    Method("sgd_step", lambda lr, t, spe: _sgd(_step_schedule(lr, t))),
    Method("sgd_exp",
           lambda lr, t, spe: _sgd(optax.exponential_decay(
               lr, transition_steps=max(1, t), decay_rate=0.01))),
    Method("sgd_cosine",
           lambda lr, t, spe: _sgd(optax.cosine_decay_schedule(lr, max(1, t)))),
    Method("adam_const", lambda lr, t, spe: optax.adam(lr),
           centre=ADAM_CENTRE),
    Method("adam_cosine",
           lambda lr, t, spe: optax.adam(
               optax.cosine_decay_schedule(lr, max(1, t))),
           centre=ADAM_CENTRE),
    Method("dog", lambda lr, t, spe: optax.contrib.dog(learning_rate=lr),
           tuned=False),
    Method("prodigy",
           lambda lr, t, spe: optax.contrib.prodigy(learning_rate=lr),
           tuned=False),
    Method("plateau", _plateau, uses_value=True),
]

METHODS: dict[str, Method] = {m.name: m for m in _ALL}
SGD_SCHEDULES = ("sgd_const", "sgd_step", "sgd_exp", "sgd_cosine", "plateau")
ADAM_FAMILY = ("adam_const", "adam_cosine", "prodigy")


def build(name: str, lr: float, total_steps: int,
          steps_per_epoch: int = 1) -> optax.GradientTransformation:
  """The transformation of method ``name`` (untuned methods ignore ``lr``)."""
  try:
    method = METHODS[name]
  except KeyError:
    raise ValueError(
        f"unknown method {name!r}; expected one of {sorted(METHODS)}") from None
  return method.factory(lr if method.tuned else 1.0, int(total_steps),
                        int(steps_per_epoch))


def grid(name: str, size: int = 5, decades: float = 2.0) -> list[float]:
  """``size`` log-spaced learning rates over ``decades``, centred per method."""
  method = METHODS[name]
  if size == 1:
    return [method.centre]
  half = decades / 2.0
  return [float(f"{method.centre * 10 ** (-half + decades * i / (size - 1)):.3g}")
          for i in range(size)]

"""Getting activations out of Flax models for :func:`scale_by_connectome`.

Linen and NNX both record intermediate values by "sowing" them. These
helpers use a dedicated place for the connectome's signals so they never mix
with a model's other intermediates:

* :func:`tap` inside a module's ``__call__`` records a hidden layer's output
  (and returns it unchanged), in Linen or NNX.
* :func:`apply_with_activations` (Linen) and :func:`call_with_activations`
  (NNX) run the model and return ``(output, activations)``.
* :func:`capture_layers` (Linen) taps existing layers by name without
  editing the model, through ``capture_intermediates``.

The returned ``activations`` is a pytree that goes straight into
``optimizer.update(..., activations=activations)``.

Example (Linen):
  >>> import jax, jax.numpy as jnp, flax.linen as nn
  >>> from cgalr_jax.flax import tap, apply_with_activations
  >>> class MLP(nn.Module):
  ...   @nn.compact
  ...   def __call__(self, x):
  ...     x = tap(self, nn.relu(nn.Dense(16)(x)), "hidden")
  ...     return nn.Dense(2)(x)
  >>> model = MLP()
  >>> x = jnp.ones((8, 4))
  >>> variables = model.init(jax.random.key(0), x)
  >>> logits, acts = apply_with_activations(model, variables, x)
  >>> jax.tree.leaves(acts)[0].shape
  (8, 16)
"""

from __future__ import annotations

import contextvars
from typing import Any, Iterable

import flax.linen as nn
from flax import nnx

# Linen collection that holds tapped activations.
COLLECTION = "connectome"


class ConnectomeTap(nnx.Intermediate):
  """NNX variable type of tapped activations (a kind of ``nnx.Intermediate``)."""


# True while call_with_activations runs. Outside nnx.capture, NNX's sow stores
# the value on the module itself and appends on every call (an ever-growing
# tuple that also changes the module's state), so NNX taps only sow inside.
_NNX_TAPPING = contextvars.ContextVar("cgalr_nnx_tapping", default=False)


def tap(module: Any, x: Any, name: str = "activations") -> Any:
  """Record ``x`` (``[N, P]`` or ``[N, ..., C]``) as connectome signals.

  Call it inside a Linen module's ``__call__`` (or ``@nn.compact`` body) or an
  NNX module's ``__call__``. Returns ``x`` unchanged, so it can wrap an
  expression in place. Outside :func:`apply_with_activations` /
  :func:`call_with_activations` it records nothing and costs nothing.
  """
  if isinstance(module, nn.Module):
    module.sow(COLLECTION, name, x)
  elif isinstance(module, nnx.Module):
    if _NNX_TAPPING.get():
      module.sow(ConnectomeTap, name, x)
  else:
    raise TypeError(
        f"tap: expected a flax.linen or flax.nnx Module, got {type(module)}.")
  return x


def activations_of(mutated: Any) -> Any:
  """The tapped activations inside the mutated collections of a Linen apply."""
  return dict(mutated).get(COLLECTION, {})


def apply_with_activations(module: nn.Module, variables: Any, *args: Any,
                           **kwargs: Any) -> tuple[Any, Any]:
  """``module.apply`` that also returns the activations recorded by :func:`tap`.

  For models with other mutable collections (``batch_stats``), call
  ``module.apply(..., mutable=["batch_stats", COLLECTION])`` yourself and read
  the signals with :func:`activations_of`.

  Returns:
    ``(output, activations)``.
  """
  # ``module.init`` sows too: drop any stale taps so they are not appended to.
  variables = {k: v for k, v in dict(variables).items() if k != COLLECTION}
  out, mutated = module.apply(variables, *args, mutable=[COLLECTION], **kwargs)
  return out, activations_of(mutated)


def capture_layers(module: nn.Module, variables: Any, *args: Any,
                   layers: Iterable[str], **kwargs: Any) -> tuple[Any, Any]:
  """Apply a Linen model and return the outputs of the named submodules.

  Uses Linen's ``capture_intermediates``, so the model needs no :func:`tap`
  calls. ``layers`` are submodule names (``"Dense_0"``, or the ``name=`` given
  to the layer).

  Returns:
    ``(output, activations)`` with ``activations`` a dict name -> output.
  """
  wanted = frozenset(layers)
  if not wanted:
    raise ValueError("capture_layers: layers must name at least one submodule.")

  def chosen(mdl: nn.Module, method_name: str) -> bool:
    return method_name == "__call__" and mdl.name in wanted

  out, state = module.apply(variables, *args, capture_intermediates=chosen,
                            mutable=["intermediates"], **kwargs)
  found: dict[str, Any] = {}

  def collect(tree: Any) -> None:
    for key, value in dict(tree).items():
      if key in wanted and "__call__" in value:
        found[key] = value["__call__"]
      elif hasattr(value, "items"):
        collect(value)

  collect(state.get("intermediates", {}))
  missing = wanted - set(found)
  if missing:
    raise ValueError(
        f"capture_layers: no submodule named {sorted(missing)} was called; "
        f"captured {sorted(found)}.")
  return out, found


def call_with_activations(model: nnx.Module, *args: Any,
                          **kwargs: Any) -> tuple[Any, Any]:
  """Call an NNX model and return ``(output, activations)`` from :func:`tap`.

  Works inside ``nnx.jit`` / ``nnx.value_and_grad`` (return the activations
  as auxiliary output of the loss).
  """
  token = _NNX_TAPPING.set(True)
  try:
    out, captured = nnx.capture(model, ConnectomeTap)(*args, **kwargs)
  finally:
    _NNX_TAPPING.reset(token)
  return out, nnx.to_pure_dict(captured)

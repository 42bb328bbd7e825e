"""Getting activations out of Flax models for :func:`scale_by_connectome`.

:func:`probe` builds the recommended signal source: ``fn(params)`` that runs
a Linen or NNX model on a fixed set of inputs in inference mode and returns
the chosen layers' outputs, after their nonlinearity. Pass it as
``cgalr(lr, probe=probe(model, inputs, ...))``; ``TrainState`` and
``nnx.Optimizer`` loops then need no change.

For the pool and batch sources, activations come out of the training
forward pass. Linen and NNX both record intermediate values by "sowing"
them; these helpers use a dedicated place for the connectome's signals so
they never mix with a model's other intermediates:

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
from typing import Any, Callable, Iterable, Mapping

import flax.linen as nn
import jax
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

  mutable = kwargs.pop("mutable", ["intermediates"])
  out, state = module.apply(variables, *args, capture_intermediates=chosen,
                            mutable=mutable, **kwargs)
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


Layers = Iterable[str] | Mapping[str, Callable[[Any], Any]] | None


def _layer_map(layers: Layers) -> dict[str, Callable[[Any], Any] | None] | None:
  if layers is None:
    return None
  if isinstance(layers, str):
    raise TypeError(
        f"probe: layers must be a sequence of names or a mapping, got the "
        f"string {layers!r}; write layers=[{layers!r}].")
  chosen = (dict(layers) if isinstance(layers, Mapping)
            else {name: None for name in layers})
  if not chosen:
    raise ValueError("probe: layers must name at least one layer.")
  for name, fn in chosen.items():
    if fn is not None and not callable(fn):
      raise TypeError(f"probe: layers[{name!r}] must be a callable "
                      f"nonlinearity or None, got {fn!r}.")
  return chosen


def _apply_nonlinearities(found: dict[str, Any],
                          chosen: dict[str, Callable[[Any], Any] | None]
                          ) -> dict[str, Any]:
  return {name: (found[name] if fn is None else fn(found[name]))
          for name, fn in chosen.items()}


def probe(model: Any, inputs: Any, *, layers: Layers = None,
          variables: Mapping[str, Any] | None = None,
          **call_kwargs: Any) -> Callable[[Any], Any]:
  """Build ``fn(params) -> activations`` for ``scale_by_connectome(probe=)``.

  The returned function runs ``model`` on the fixed ``inputs`` in inference
  mode and returns the signals of the chosen layers. Choose ``inputs`` once:
  training samples, at least ``max(256, 2 P)`` of them for P signals.

  What is read (``layers``):

  * ``None``: every value the model records with :func:`tap` (place taps
    after the nonlinearities).
  * a sequence of submodule names: those submodules' outputs as they are
    (right for blocks that end in their nonlinearity).
  * a mapping name -> nonlinearity: the submodule's output passed through
    it, e.g. ``{"Dense_0": nn.relu, "Conv_0": nn.relu}``. A dense or conv
    layer's raw output is pre-activation: pooled conv channels of a linear
    map are affine in the pooled input and every |rho| is then 1.

  Linen: ``fn(params)`` applies ``{"params": params, **variables}``;
  ``variables`` holds the other collections (for example ``batch_stats``),
  frozen at the values given, and ``call_kwargs`` put the model in
  inference mode (for example ``train=False``). Anything the forward pass
  would write is discarded. ``params`` is what ``TrainState`` passes to its
  optimizer: the ``"params"`` collection.

  NNX: ``fn(params)`` merges ``params`` (the ``nnx.Param`` state that
  ``nnx.Optimizer`` passes) into a copy of ``model`` whose other state (batch
  statistics, RNG counters) is frozen as it is now, switches the copy to
  ``eval()`` mode and calls it with ``inputs`` and ``call_kwargs``.
  ``variables`` does not apply. The model must have been built with
  ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` (the default).

  Args:
    model: a ``flax.linen.Module`` or an ``nnx.Module``.
    inputs: the fixed probe inputs (an array or a tuple of positional args).
    layers: which layers to read (see above).
    variables: Linen only: non-parameter collections, frozen.
    **call_kwargs: keyword arguments of the model's call.

  Returns:
    ``fn(params) -> dict`` of activations, traceable under ``jit``.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> from cgalr_jax import cgalr
    >>> from cgalr_jax.flax import probe
    >>> class MLP(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     return nn.Dense(2)(nn.relu(nn.Dense(16, name="hidden")(x)))
    >>> model, x = MLP(), jnp.ones((256, 4))
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> fn = probe(model, x, layers={"hidden": nn.relu})
    >>> fn(params)["hidden"].shape
    (256, 16)
    >>> opt = cgalr(0.1, probe=fn)
  """
  chosen = _layer_map(layers)
  args = inputs if isinstance(inputs, tuple) else (inputs,)
  if isinstance(model, nn.Module):
    return _linen_probe(model, args, chosen, dict(variables or {}),
                        call_kwargs)
  if isinstance(model, nnx.Module):
    if variables is not None:
      raise TypeError("probe: variables= is for Linen models; an NNX model "
                      "carries its own state.")
    return _nnx_probe(model, args, chosen, call_kwargs)
  raise TypeError(
      f"probe: expected a flax.linen or flax.nnx Module, got {type(model)}.")


def _linen_probe(model, args, chosen, variables, call_kwargs):
  if "params" in variables:
    raise ValueError("probe: variables holds the non-parameter collections; "
                     "params come from the optimizer.")
  variables.pop(COLLECTION, None)

  def fn(params):
    full = {"params": params, **variables}
    if chosen is None:
      _, mutated = model.apply(full, *args, mutable=True, **call_kwargs)
      found = activations_of(mutated)
      if not found:
        raise ValueError(
            "probe: the model records no activations with tap(); name the "
            "layers to read with layers=.")
      return found
    _, found = capture_layers(model, full, *args, layers=chosen,
                              mutable=True, **call_kwargs)
    return _apply_nonlinearities(
        {name: _single_call(name, out) for name, out in found.items()}, chosen)

  return fn


def _single_call(name: str, outputs: Any) -> Any:
  """The one output of a submodule that the probe's forward pass called once."""
  if isinstance(outputs, tuple):
    if len(outputs) != 1:
      raise ValueError(
          f"probe: submodule {name!r} was called {len(outputs)} times in one "
          "forward pass; tap() the output you want instead.")
    return outputs[0]
  return outputs


def _module_outputs(captured: Any, chosen: dict) -> dict[str, Any]:
  """Find each chosen name's ``__call__`` output in a captured state tree."""
  found: dict[str, Any] = {}

  def walk(tree, path):
    for key, value in tree.items():
      here = path + (str(key),)
      if key == "__call__":
        name = "/".join(path)
        for wanted in chosen:
          if wanted == name or (path and wanted == path[-1]):
            if wanted in found:
              raise ValueError(
                  f"probe: layer name {wanted!r} matches several submodules; "
                  "give its full path ('parent/child').")
            found[wanted] = _single_call(wanted, value)
      elif isinstance(value, Mapping):
        walk(value, here)

  walk(captured, ())
  missing = set(chosen) - set(found)
  if missing:
    raise ValueError(f"probe: no submodule named {sorted(missing)} was "
                     f"called; found {sorted(found)}.")
  return found


def _nnx_probe(model, args, chosen, call_kwargs):
  graphdef, param_state, rest = nnx.split(model, nnx.Param, ...)

  def fn(params):
    state = jax.tree.map(lambda x: x, param_state)
    nnx.replace_by_pure_dict(state, nnx.to_pure_dict(nnx.State(params))
                             if isinstance(params, nnx.State) else params)
    copy = nnx.merge(graphdef, state, rest)
    copy.eval()
    if chosen is None:
      _, found = call_with_activations(copy, *args, **call_kwargs)
      if not found:
        raise ValueError(
            "probe: the model records no activations with tap(); name the "
            "layers to read with layers=.")
      return found
    _, captured = nnx.capture(copy, ConnectomeTap,
                              method_outputs=ConnectomeTap)(*args,
                                                            **call_kwargs)
    return _apply_nonlinearities(
        _module_outputs(nnx.to_pure_dict(captured), chosen), chosen)

  return fn

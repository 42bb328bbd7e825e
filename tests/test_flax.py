"""cgalr_jax.flax: getting activations out of Linen and NNX models."""

from __future__ import annotations

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cgalr_jax import connectome
from cgalr_jax.flax import (ConnectomeTap, apply_with_activations,
                            call_with_activations, capture_layers, tap)

X = np.random.default_rng(0).normal(size=(12, 3)).astype(np.float32)


class LinenMLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    h1 = tap(self, nn.relu(nn.Dense(16)(x)), "hidden")
    h2 = tap(self, jnp.tanh(nn.Dense(8, name="second")(h1)), "h2")
    return nn.Dense(2)(h2)


def dense(params, x):
  return x @ np.asarray(params["kernel"]) + np.asarray(params["bias"])


@pytest.fixture(scope="module")
def linen():
  model = LinenMLP()
  variables = jax.jit(model.init)(jax.random.key(0), X)
  p = variables["params"]
  h1 = np.maximum(dense(p["Dense_0"], X), 0.0)
  h2 = np.tanh(dense(p["second"], h1))
  return model, variables, h1, h2, dense(p["Dense_1"], h2)


def test_apply_with_activations_returns_tapped_arrays(linen, maybe_jit):
  model, variables, h1, h2, logits = linen
  apply = maybe_jit(lambda v, x: apply_with_activations(model, v, x))
  # ``variables`` from init already hold one sown copy: it must not be
  # appended to (each tap yields exactly one array).
  out, acts = apply(variables, X)
  assert set(acts) == {"hidden", "h2"}
  assert len(acts["hidden"]) == 1 and len(acts["h2"]) == 1
  np.testing.assert_allclose(np.asarray(acts["hidden"][0]), h1, rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(np.asarray(acts["h2"][0]), h2, rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(np.asarray(out), logits, rtol=1e-5, atol=1e-5)
  # The pytree goes straight into the connectome, leaves in tree order.
  m = np.asarray(jax.jit(connectome)(acts))
  both = np.concatenate([h2, h1], axis=1)  # sorted keys: "h2", "hidden"
  live = both.std(axis=0) > 1e-6
  ref = np.abs(np.corrcoef(both[:, live], rowvar=False))
  np.fill_diagonal(ref, 0.0)
  np.testing.assert_allclose(m[np.ix_(live, live)], ref, atol=1e-4)
  # Taps outside apply_with_activations record nothing and change nothing.
  params_only = {"params": variables["params"]}
  np.testing.assert_allclose(np.asarray(model.apply(params_only, X)), logits,
                             rtol=1e-5, atol=1e-5)


def test_apply_with_activations_in_a_gradient_step(linen):
  model, variables, h1, _, _ = linen

  @jax.jit
  def step(params):
    def loss_fn(p):
      out, acts = apply_with_activations(model, {"params": p}, X)
      return jnp.mean(out ** 2), acts
    return jax.value_and_grad(loss_fn, has_aux=True)(params)

  (loss, acts), grads = step(variables["params"])
  assert np.isfinite(float(loss))
  assert jax.tree.structure(grads) == jax.tree.structure(variables["params"])
  np.testing.assert_allclose(np.asarray(acts["hidden"][0]), h1, rtol=1e-5,
                             atol=1e-5)


def test_capture_layers_returns_named_layer_outputs(linen):
  model, variables, h1, h2, logits = linen
  params_only = {"params": variables["params"]}
  out, acts = capture_layers(model, params_only, X,
                             layers=["Dense_0", "second"])
  assert set(acts) == {"Dense_0", "second"}
  p = variables["params"]
  # Layer outputs are the pre-activation Dense outputs.
  np.testing.assert_allclose(np.asarray(jax.tree.leaves(acts["Dense_0"])[0]),
                             dense(p["Dense_0"], X), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(jax.tree.leaves(acts["second"])[0]),
                             dense(p["second"], h1), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(out), logits, rtol=1e-5, atol=1e-5)


def test_capture_layers_rejects_unknown_or_no_names(linen):
  model, variables, *_ = linen
  with pytest.raises(ValueError, match="Dense_7"):
    capture_layers(model, variables, X, layers=["Dense_0", "Dense_7"])
  with pytest.raises(ValueError, match="at least one"):
    capture_layers(model, variables, X, layers=[])


class NNXMLP(nnx.Module):

  def __init__(self, rngs):
    self.l1 = nnx.Linear(3, 16, rngs=rngs)
    self.l2 = nnx.Linear(16, 2, rngs=rngs)

  def __call__(self, x):
    return self.l2(tap(self, nnx.relu(self.l1(x)), "hidden"))


def nnx_reference(model):
  h = np.maximum(X @ np.asarray(model.l1.kernel[...]) +
                 np.asarray(model.l1.bias[...]), 0.0)
  return h, h @ np.asarray(model.l2.kernel[...]) + np.asarray(
      model.l2.bias[...])


def test_call_with_activations_nnx():
  model = NNXMLP(nnx.Rngs(0))
  h, logits = nnx_reference(model)
  for _ in range(2):  # a second call does not accumulate taps
    out, acts = call_with_activations(model, X)
    leaves = jax.tree.leaves(acts)
    assert len(leaves) == 1
    np.testing.assert_allclose(np.asarray(leaves[0]), h, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out), logits, rtol=1e-5, atol=1e-5)
  # Plain calls work and record nothing: the module's state does not grow.
  before = jax.tree.structure(nnx.state(model))
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # e.g. NNX's "sow outside capture"
    for _ in range(3):
      np.testing.assert_allclose(np.asarray(model(X)), logits, rtol=1e-5,
                                 atol=1e-5)
  assert jax.tree.structure(nnx.state(model)) == before
  assert not jax.tree.leaves(nnx.state(model, ConnectomeTap))
  _, acts = call_with_activations(model, X)
  assert len(jax.tree.leaves(acts)) == 1


def test_call_with_activations_inside_nnx_jit_and_grad():
  model = NNXMLP(nnx.Rngs(1))
  h, _ = nnx_reference(model)

  @nnx.jit
  def step(model, x):
    def loss_fn(model):
      out, acts = call_with_activations(model, x)
      return jnp.mean(out ** 2), acts
    return nnx.value_and_grad(loss_fn, has_aux=True)(model)

  (loss, acts), grads = step(model, X)
  assert np.isfinite(float(loss))
  np.testing.assert_allclose(np.asarray(jax.tree.leaves(acts)[0]), h,
                             rtol=1e-5, atol=1e-5)
  assert len(jax.tree.leaves(grads)) == 4


@pytest.mark.parametrize("not_a_module", [object(), None, {"a": 1},
                                          jnp.ones(3)])
def test_tap_on_a_non_module_raises_type_error(not_a_module):
  with pytest.raises(TypeError, match="Module"):
    tap(not_a_module, jnp.ones((2, 2)))

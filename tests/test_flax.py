"""cgalr_jax.flax: getting activations out of Linen and NNX models."""

from __future__ import annotations

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import cgalr_jax
import cgalr_jax.flax
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


# ----------------------------------------------------------------------------
# probe: the transform's own signal source for Linen and NNX models.

PROBE_X = np.random.default_rng(1).normal(size=(64, 6)).astype(np.float32)
PROBE_Y = (PROBE_X[:, 0] > 0).astype(np.int32)


class LinenBNNet(nn.Module):
  """Dense -> BatchNorm -> ReLU -> Dropout -> Dense: train and eval differ."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Dense(16, name="hidden")(x)
    x = nn.BatchNorm(use_running_average=not train, name="bn")(x)
    x = nn.relu(x)
    x = nn.Dropout(0.5, deterministic=not train)(x)
    return nn.Dense(2)(x)


def test_linen_probe_reads_named_layers_after_the_nonlinearity():
  model = LinenBNNet()
  variables = model.init(jax.random.key(0), PROBE_X)
  fn = cgalr_jax.flax.probe(model, PROBE_X, layers={"bn": nn.relu},
                            variables={"batch_stats": variables["batch_stats"]},
                            train=False)
  got = fn(variables["params"])["bn"]
  # Reference: the same forward pass written out in NumPy (inference mode).
  p, bs = variables["params"], variables["batch_stats"]["bn"]
  h = PROBE_X @ np.asarray(p["hidden"]["kernel"]) + np.asarray(
      p["hidden"]["bias"])
  h = (h - np.asarray(bs["mean"])) / np.sqrt(np.asarray(bs["var"]) + 1e-5)
  h = h * np.asarray(p["bn"]["scale"]) + np.asarray(p["bn"]["bias"])
  np.testing.assert_allclose(np.asarray(got), np.maximum(h, 0), rtol=1e-4,
                             atol=1e-5)
  # Deterministic: no dropout, nothing written back.
  np.testing.assert_array_equal(np.asarray(fn(p)["bn"]), np.asarray(got))
  with pytest.raises(ValueError, match="no submodule"):
    cgalr_jax.flax.probe(model, PROBE_X, layers=["nope"], variables={
        "batch_stats": variables["batch_stats"]})(p)
  with pytest.raises(TypeError, match="layers"):
    cgalr_jax.flax.probe(model, PROBE_X, layers="bn")


def test_conv_channels_after_the_nonlinearity_are_not_degenerate():
  class Conv(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Conv(8, (3, 3), name="conv")(x)

  # Digit-like images: ink inside a blank border. Every 3x3 shift of the
  # image then has the same sum, so each pooled raw channel is an affine
  # function of one number per image.
  x = np.zeros((64, 12, 12, 1), np.float32)
  x[:, 1:-1, 1:-1] = np.random.default_rng(2).random(size=(64, 10, 10, 1))
  model = Conv()
  params = model.init(jax.random.key(0), x)["params"]
  raw = cgalr_jax.flax.probe(model, x, layers=["conv"])(params)
  post = cgalr_jax.flax.probe(model, x, layers={"conv": nn.relu})(params)
  m_raw = np.asarray(cgalr_jax.connectome(raw))
  m_post = np.asarray(cgalr_jax.connectome(post))
  off = ~np.eye(8, dtype=bool)
  # Pooled channels of a linear map of a 1-channel input: every |rho| ~ 1.
  assert np.all(m_raw[off] > 0.999)
  assert np.median(m_post[off]) < 0.9


def test_unmodified_trainstate_loop_measures_through_the_probe():
  from flax.training import train_state  # pylint: disable=import-outside-toplevel
  model = LinenBNNet()
  variables = model.init(jax.random.key(0), PROBE_X)
  fn = cgalr_jax.flax.probe(model, PROBE_X, layers={"bn": nn.relu},
                            variables={"batch_stats": variables["batch_stats"]},
                            train=False)
  tx = cgalr_jax.cgalr(0.05, probe=fn, every=2)
  state = train_state.TrainState.create(apply_fn=model.apply,
                                        params=variables["params"], tx=tx)

  def train_step(state, batch_stats, key):
    def loss_fn(params):
      logits, new = model.apply(
          {"params": params, "batch_stats": batch_stats}, PROBE_X, train=True,
          rngs={"dropout": key}, mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(
          logits, PROBE_Y).mean()
      return loss, new["batch_stats"]
    (_, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    return state.apply_gradients(grads=grads), batch_stats

  step = jax.jit(train_step, donate_argnums=(0,))
  batch_stats = variables["batch_stats"]
  for t in range(6):
    state, batch_stats = step(state, batch_stats, jax.random.key(t))
  d = cgalr_jax.diagnostics(state.opt_state)
  assert int(d["measured"]) == 3 and int(d["skipped"]) == 0
  assert float(d["distance"]) > 0


class NNXBNNet(nnx.Module):

  def __init__(self, rngs):
    self.hidden = nnx.Linear(6, 16, rngs=rngs)
    self.bn = nnx.BatchNorm(16, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)
    self.out = nnx.Linear(16, 2, rngs=rngs)

  def __call__(self, x):
    return self.out(self.drop(nnx.relu(self.bn(self.hidden(x)))))


def test_nnx_probe_runs_in_eval_mode_on_the_given_params():
  model = NNXBNNet(nnx.Rngs(0))
  fn = cgalr_jax.flax.probe(model, PROBE_X, layers={"hidden": nnx.relu})
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  got = np.asarray(fn(params)["hidden"])
  k = np.asarray(params["hidden"]["kernel"])
  b = np.asarray(params["hidden"]["bias"])
  np.testing.assert_allclose(got, np.maximum(PROBE_X @ k + b, 0), rtol=1e-5,
                             atol=1e-5)
  # Other params give other signals: the probe reads what it is given.
  shifted = jax.tree.map(lambda v: v + 1.0, params)
  assert not np.allclose(np.asarray(fn(shifted)["hidden"]), got)
  # The model itself is untouched (still in training mode).
  assert model.drop.deterministic is False


def test_unmodified_nnx_optimizer_loop_measures_through_the_probe():
  model = NNXBNNet(nnx.Rngs(0))
  fn = cgalr_jax.flax.probe(model, PROBE_X, layers={"hidden": nnx.relu})
  optimizer = nnx.Optimizer(model, cgalr_jax.cgalr(0.05, probe=fn, every=2),
                            wrt=nnx.Param)

  @nnx.jit(donate_argnums=(0, 1))
  def train_step(model, optimizer):
    def loss_fn(model):
      return optax.softmax_cross_entropy_with_integer_labels(
          model(PROBE_X), PROBE_Y).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  for _ in range(6):
    train_step(model, optimizer)
  d = cgalr_jax.diagnostics(optimizer.opt_state)
  assert int(d["measured"]) == 3 and int(d["skipped"]) == 0
  assert float(d["distance"]) > 0

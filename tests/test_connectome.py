"""cgalr_jax.connectome (and measure.signals) against numpy.corrcoef (DESIGN.md 2)."""

from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cgalr_jax import connectome
from cgalr_jax.connectome import _transposed as _transposed_copy
from cgalr_jax.connectome import condensed_from_stats, correlation_from_stats
from cgalr_jax.measure import merge_parts, num_signals, signals, split_stats


def signal_stats(a, shift=None):
  return merge_parts(split_stats(a, shift))


def reference_connectome(a: np.ndarray) -> np.ndarray:
  """|corrcoef| of the columns of ``a`` in float64, zero diagonal."""
  m = np.abs(np.corrcoef(np.asarray(a, np.float64), rowvar=False))
  np.fill_diagonal(m, 0.0)
  return m


# Most tests share the [64, 12] float32 shape so eager op compilation and jit
# traces are reused across tests (keeps the suite fast on 2 CI cores).
N, P = 64, 12


def correlated_groups(rng, n=N, groups=(3, 4, 5), noise=0.3):
  """Signals in groups that share a latent factor, some with flipped sign."""
  cols = []
  for size in groups:
    latent = rng.normal(size=n)
    for j in range(size):
      sign = -1.0 if j % 2 else 1.0
      cols.append(sign * latent + noise * rng.normal(size=n) + 3.0 * j)
  return np.stack(cols, axis=1).astype(np.float32)


def test_random_activations_match_corrcoef(maybe_jit):
  a = np.random.default_rng(0).normal(size=(N, P)).astype(np.float32)
  m = np.asarray(maybe_jit(connectome)(a))
  assert m.dtype == np.float32 and m.shape == (P, P)
  np.testing.assert_allclose(m, reference_connectome(a), atol=2e-6)
  np.testing.assert_array_equal(np.diagonal(m), 0.0)
  np.testing.assert_array_equal(m, m.T)


def test_structured_activations_match_corrcoef(maybe_jit):
  a = correlated_groups(np.random.default_rng(1))
  m = np.asarray(maybe_jit(connectome)(a))
  ref = reference_connectome(a)
  np.testing.assert_allclose(m, ref, atol=2e-6)
  # The structure is really there: within-group |rho| are large.
  assert ref[0, 1] > 0.8 and ref[3, 4] > 0.8 and ref[0, 3] < 0.3


def test_large_offset_signals_keep_float32_accuracy():
  # Mean 1e4, std ~1: a naive E[x^2] - E[x]^2 in float32 would lose all
  # digits; the shifted sufficient statistics must not.
  rng = np.random.default_rng(2)
  a = correlated_groups(rng) + np.float32(1e4)
  ref = reference_connectome(a.astype(np.float64))
  np.testing.assert_allclose(np.asarray(connectome(a)), ref, atol=2e-3)


def test_pooled_conv_leaf_is_corrcoef_of_spatial_means():
  x = np.random.default_rng(3).normal(size=(32, 5, 4, 6)).astype(np.float32)
  # Give the channels some spatially varying correlation.
  x[..., 1] += 0.8 * x[..., 0]
  m = np.asarray(jax.jit(connectome)(x))
  pooled = x.astype(np.float64).mean(axis=(1, 2))
  np.testing.assert_allclose(m, reference_connectome(pooled), atol=2e-6)
  # A 3-D leaf [N, L, C] pools over its single middle axis.
  y = x[:, 0]
  np.testing.assert_allclose(
      np.asarray(jax.jit(connectome)(y)),
      reference_connectome(y.astype(np.float64).mean(axis=1)), atol=2e-6)


def test_multiple_leaves_concatenate_in_tree_leaves_order():
  rng = np.random.default_rng(4)
  n = 48
  dense = rng.normal(size=(n, 3)).astype(np.float32)
  conv = rng.normal(size=(n, 3, 3, 2)).astype(np.float32)
  single = rng.normal(size=(n,)).astype(np.float32)
  # Dict leaves come in sorted-key order: "a_conv", "b_dense", "c_single".
  acts = {"c_single": single, "b_dense": dense, "a_conv": conv}
  expected = np.concatenate(
      [conv.mean(axis=(1, 2)), dense, single[:, None]], axis=1)
  got_signals = np.asarray(jax.jit(signals)(acts))
  np.testing.assert_allclose(got_signals, expected, rtol=1e-6, atol=1e-6)
  m = np.asarray(jax.jit(connectome)(acts))
  np.testing.assert_allclose(m, reference_connectome(expected), atol=2e-6)
  assert num_signals(acts) == 6
  # Lists keep their own order.
  m_list = np.asarray(jax.jit(connectome)([dense, single]))
  np.testing.assert_allclose(
      m_list, reference_connectome(np.concatenate([dense, single[:, None]], 1)),
      atol=2e-6)


def test_bfloat16_input_is_computed_in_float32():
  a = correlated_groups(np.random.default_rng(5))
  a_bf16 = jnp.asarray(a, jnp.bfloat16)
  m = jax.jit(connectome)(a_bf16)
  assert m.dtype == jnp.float32
  rounded = np.asarray(a_bf16.astype(jnp.float32))
  np.testing.assert_allclose(np.asarray(m), reference_connectome(rounded),
                             atol=1e-4)


def test_integer_and_bool_input():
  rng = np.random.default_rng(6)
  a = rng.integers(0, 10, size=(N, P)).astype(np.int32)
  a[:, 1] += 2 * a[:, 0]
  m = jax.jit(connectome)(a)
  assert m.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(m), reference_connectome(a), atol=2e-6)
  b = rng.random(size=(N, 4)) > 0.5
  np.testing.assert_allclose(np.asarray(jax.jit(connectome)(b)),
                             reference_connectome(b.astype(np.float64)),
                             atol=2e-6)


def test_complex_input_raises_type_error():
  with pytest.raises(TypeError, match="activations"):
    connectome(jnp.ones((4, 3), jnp.complex64))


def test_dead_units_give_zero_rows_and_no_nan(maybe_jit):
  rng = np.random.default_rng(7)
  a = rng.normal(size=(N, P)).astype(np.float32)
  a[:, 1] = 0.0          # relu that never fires
  a[:, 4] = 3.7          # constant
  a[:, 6] = 1234.5678    # large constant: float32 mean rounding must not
                         # make it look alive
  m = np.asarray(maybe_jit(connectome)(a))
  assert np.all(np.isfinite(m))
  for dead in (1, 4, 6):
    np.testing.assert_array_equal(m[dead], 0.0)
    np.testing.assert_array_equal(m[:, dead], 0.0)
  live = [0, 2, 3, 5, 7, 8, 9, 10, 11]
  np.testing.assert_allclose(m[np.ix_(live, live)],
                             reference_connectome(a[:, live]), atol=2e-6)
  # All units dead: the zero matrix.
  np.testing.assert_array_equal(
      np.asarray(maybe_jit(connectome)(np.ones((N, P), np.float32))), 0.0)


def _subset_indices(full: np.ndarray, kept: np.ndarray) -> list[int]:
  """Which columns of ``full`` the columns of ``kept`` are (exact match)."""
  idx = []
  for j in range(kept.shape[1]):
    hits = np.flatnonzero(np.all(full == kept[:, j:j + 1], axis=0))
    assert hits.size == 1
    idx.append(int(hits[0]))
  return idx


def test_max_nodes_keeps_a_fixed_subset():
  rng = np.random.default_rng(8)
  a1 = rng.normal(size=(30, 20)).astype(np.float32)
  a2 = rng.normal(size=(30, 20)).astype(np.float32)
  a2[:, 3] = a2[:, 5] + 0.1 * a2[:, 7]
  sig = jax.jit(functools.partial(signals, max_nodes=6, seed=3))
  idx1 = _subset_indices(a1, np.asarray(sig(a1)))
  idx2 = _subset_indices(a2, np.asarray(sig(a2)))
  assert len(idx1) == 6 and len(set(idx1)) == 6
  assert idx1 == idx2  # identical across calls (and data)
  conn = jax.jit(functools.partial(connectome, max_nodes=6, seed=3))
  for a in (a1, a2):
    full = reference_connectome(a)
    np.testing.assert_allclose(np.asarray(conn(a)),
                               full[np.ix_(idx1, idx1)], atol=2e-6)
  # Another seed draws another subset (with overwhelming probability).
  other = _subset_indices(
      a1, np.asarray(signals(a1, max_nodes=6, seed=4)))
  assert other != idx1
  # A budget at or above P keeps everything.
  np.testing.assert_array_equal(np.asarray(signals(a1, max_nodes=20)), a1)


def test_sufficient_statistics_of_chunks_sum_to_the_whole():
  # DESIGN.md 2: stats of chunks (or shards) with a common shift add up.
  a = correlated_groups(np.random.default_rng(9)) + 50.0
  shift = jnp.asarray(a.mean(axis=0))
  parts = [jax.jit(signal_stats)(jnp.asarray(c), shift) for c in np.split(a, 4)]
  summed = jax.tree.map(lambda *xs: sum(xs), *parts)
  summed = summed._replace(shift=shift)
  np.testing.assert_allclose(np.asarray(correlation_from_stats(summed)),
                             reference_connectome(a), atol=1e-5)


def test_bad_activation_trees_raise():
  with pytest.raises(ValueError, match="sample"):
    connectome({"a": np.ones((8, 3)), "b": np.ones((9, 2))})
  with pytest.raises(ValueError, match="sample axis"):
    connectome([np.ones((8, 3)), np.float32(1.0)])
  with pytest.raises(ValueError, match="no leaves"):
    connectome({})


def test_transposed_copy_is_the_transpose_bit_for_bit():
  """The CPU's row-major transposed copy (a loop that normally runs zero
  times, once when m[0, 0] is NaN) returns m.T exactly, -0.0 and NaN
  included, for any shape, and passes derivatives through."""
  transposed = _transposed_copy
  rng = np.random.default_rng(11)
  for m in (rng.normal(size=(3, 5)).astype(np.float32),
            np.array([[np.nan, -0.0], [np.inf, 2.0]], np.float32)):
    got = np.asarray(jax.jit(transposed)(jnp.asarray(m)))
    np.testing.assert_array_equal(got.view(np.int32), m.T.view(np.int32))
  m = jnp.asarray(rng.normal(size=(4, 4)), jnp.float32)
  weights = jnp.asarray(rng.normal(size=(4, 4)), jnp.float32)
  np.testing.assert_array_equal(
      np.asarray(jax.grad(lambda x: jnp.sum(transposed(x) * weights))(m)),
      np.asarray(weights.T))


def _upper_weights_numpy(stats):
  """|rho| of Gram entry (i, j), i < j, in float64 NumPy (independent of
  the library's float32 arithmetic)."""
  n = float(stats.n)
  mu = np.asarray(stats.total, np.float64) / n
  cov = np.asarray(stats.gram, np.float64) / n - np.outer(mu, mu)
  sd = np.sqrt(np.diagonal(cov))
  return np.clip(np.abs(cov / np.outer(sd, sd)), 0, 1)


def test_each_weight_comes_from_one_gram_entry(maybe_jit):
  """M[i, j] = M[j, i] is the weight of Gram entry (i, j), i < j: a Gram
  matrix made asymmetric on purpose gives the upper triangle's weights in
  both triangles, and condensed_from_stats is that triangle bit for bit
  (the host backend reads it without forming M)."""
  a = correlated_groups(np.random.default_rng(3))
  stats = signal_stats(a)
  rng = np.random.default_rng(4)
  skew = np.triu(rng.normal(scale=0.2, size=(P, P)), k=1).astype(np.float32)
  stats = stats._replace(gram=stats.gram + jnp.asarray(skew))
  m = np.asarray(maybe_jit(correlation_from_stats)(stats))
  upper = np.triu_indices(P, k=1)
  np.testing.assert_array_equal(m, m.T)
  np.testing.assert_array_equal(np.diagonal(m), 0.0)
  np.testing.assert_allclose(m[upper], _upper_weights_numpy(stats)[upper],
                             atol=2e-6)
  cond = np.asarray(maybe_jit(condensed_from_stats)(stats))
  np.testing.assert_array_equal(cond.view(np.int32),
                                m[upper].view(np.int32))
  host = jax.tree.map(np.asarray, stats)
  m_np = correlation_from_stats(host, np)
  np.testing.assert_array_equal(m_np, m_np.T)
  np.testing.assert_array_equal(condensed_from_stats(host, np),
                                m_np[upper])
  np.testing.assert_allclose(m_np, m, atol=1e-6)


def test_dead_and_non_finite_statistics_in_the_condensed_form():
  a = correlated_groups(np.random.default_rng(5))
  a[:, 2] = 7.0  # a dead unit
  stats = signal_stats(a)
  gram = np.array(stats.gram)
  gram[0, 5] = np.nan  # one non-finite entry: its weight is 0
  stats = stats._replace(gram=jnp.asarray(gram))
  m = np.asarray(jax.jit(correlation_from_stats)(stats))
  cond = np.asarray(jax.jit(condensed_from_stats)(stats))
  assert np.all(np.isfinite(m)) and m[0, 5] == m[5, 0] == 0.0
  np.testing.assert_array_equal(m[2], 0.0)
  np.testing.assert_array_equal(cond, m[np.triu_indices(P, k=1)])


def test_weights_are_the_same_bits_in_every_program():
  """The barrier between the statistics and the correlation: the weights
  computed in one program with the statistics equal those computed from
  statistics handed in from another program, as the full matrix and as
  the condensed triangle (what the two backends compute). P = 256, where
  without the barrier XLA:CPU's fusion moved some weights by one ulp."""
  rng = np.random.default_rng(256)
  # Four latent factors, noise, and an offset per signal.
  a = jnp.asarray(rng.normal(size=(300, 4)) @ rng.normal(size=(4, 256))
                  + 0.3 * rng.normal(size=(300, 256))
                  + 5 * rng.normal(size=256), jnp.float32)
  stats = jax.jit(signal_stats)(a)
  together = np.asarray(jax.jit(
      lambda x: correlation_from_stats(signal_stats(x)))(a))
  apart = np.asarray(jax.jit(correlation_from_stats)(stats))
  cond = np.asarray(jax.jit(
      lambda x: condensed_from_stats(signal_stats(x)))(a))
  np.testing.assert_array_equal(together.view(np.int32),
                                apart.view(np.int32))
  np.testing.assert_array_equal(
      cond.view(np.int32),
      together[np.triu_indices(256, k=1)].view(np.int32))


def test_barrier_passes_derivatives():
  a = jnp.asarray(correlated_groups(np.random.default_rng(6)))
  f = lambda x: correlation_from_stats(signal_stats(x))  # noqa: E731
  g = jax.grad(lambda x: jnp.sum(f(x) ** 2))(a)
  g_plain = jax.grad(lambda x: jnp.sum(
      connectome_module_without_barrier(x) ** 2))(a)
  np.testing.assert_allclose(np.asarray(g), np.asarray(g_plain), rtol=1e-5,
                             atol=1e-6)


def connectome_module_without_barrier(x):
  module = importlib.import_module("cgalr_jax.connectome")
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(module, "_separately", lambda stats: stats)
    return module.correlation_from_stats(signal_stats(x))

"""cgalr_jax._sums: sums written as products and scans, against NumPy.

They replace reductions inside the training step's measuring branch, so
they must give the same values where their uses need exactness (integer
prefix sums, 0/1 counts, sums with one nonzero term) and propagate
non-finite values like a sum.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cgalr_jax import _sums


@pytest.mark.parametrize("shape,axis", [((1,), 0), ((16384,), 0),
                                        ((1000,), 0), ((7, 64), 1)])
def test_cumsum_is_exact_on_integers(shape, axis):
  x = np.random.default_rng(7).integers(-1000, 100_000, size=shape,
                                        dtype=np.int32)
  np.testing.assert_array_equal(
      np.asarray(jax.jit(_sums.cumsum, static_argnums=1)(x, axis)),
      np.cumsum(x, axis=axis, dtype=np.int32))


def test_matvec_counts_and_picks_exactly():
  rng = np.random.default_rng(8)
  mask = rng.random((300, 4000)) < 0.5
  np.testing.assert_array_equal(
      np.asarray(_sums.matvec(jnp.asarray(mask), jnp.ones(4000))),
      mask.sum(1).astype(np.float32))
  # One nonzero term per row: the pick is the value itself, bit for bit.
  x = rng.normal(size=4000).astype(np.float32) * 1e30
  one_hot = np.eye(4000, dtype=np.float32)[[5, 17, 3999]]
  np.testing.assert_array_equal(
      np.asarray(_sums.matvec(jnp.asarray(one_hot * x), jnp.ones(4000))),
      x[[5, 17, 3999]])


@pytest.mark.parametrize("values", [
    [1.0, 2.0, 3.0], [1.0, np.inf, 2.0], [-np.inf, 1.0], [np.inf, -np.inf],
    [np.nan, 1.0], [0.0] * 100 + [np.nan], [0.0, -0.0]])
def test_total_is_a_sum(values):
  v = np.asarray(values, np.float32)
  got = float(jax.jit(_sums.total)(jnp.asarray(v)))
  with np.errstate(invalid="ignore"):  # inf - inf
    want = float(np.sum(v))
  assert got == want or (np.isnan(got) and np.isnan(want))


def test_total_wants_a_vector_and_stays_a_product():
  with pytest.raises(ValueError, match="vector"):
    _sums.total(jnp.ones((2, 2)))
  text = jax.jit(_sums.total).lower(jnp.ones(500)).compile().as_text()
  assert re.search(r" dot\(", text) and not re.search(r" reduce\(", text)


@pytest.mark.parametrize("shape,axis", [((16384,), 0), ((512,), 0), ((33,), 0),
                                        ((512, 64), 1), ((3, 640), 1),
                                        ((64, 5), 0), ((1000,), 0),
                                        ((2, 129, 3), 1)])
def test_count_cumsum_is_exact(shape, axis):
  # Counts as the radix selection has them (its 2^14-entry histogram, its
  # K x 64 rows, slot ids over K), whole tiles (640 = 5 x 128), a short
  # leading axis, and axes padded to whole tiles (1000, 129).
  rng = np.random.default_rng(9)
  x = rng.integers(0, 1000, size=shape, dtype=np.int32)
  bound = int(np.abs(x).sum(axis=axis).max()) + 1
  got = jax.jit(_sums.count_cumsum, static_argnums=(1, 2))(x, bound, axis)
  np.testing.assert_array_equal(np.asarray(got),
                                np.cumsum(x, axis=axis, dtype=np.int32))


def test_count_cumsum_uses_products_only_below_two_to_the_24():
  # Near 2^24 float32 stops holding every integer: 2^24 + 1 is lost.
  x = np.zeros((16384,), np.int32)
  x[0], x[1], x[-1] = (1 << 24), 1, 3
  got = _sums.count_cumsum(jnp.asarray(x), _sums.EXACT_COUNT_LIMIT)
  np.testing.assert_array_equal(np.asarray(got), np.cumsum(x, dtype=np.int32))
  small = jnp.ones((16384,), jnp.int32)
  product = jax.jit(_sums.count_cumsum, static_argnums=1).lower(
      small, 16384).compile().as_text()
  scan = jax.jit(_sums.count_cumsum, static_argnums=1).lower(
      small, 1 << 24).compile().as_text()
  assert re.search(r" dot\(", product) and not re.search(r" dot\(", scan)


@pytest.mark.parametrize("bound", [10, 1 << 24])
def test_count_cumsum_returns_int32_on_both_paths(bound):
  got = _sums.count_cumsum(jnp.ones((5,), jnp.int8), bound)
  assert got.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(got), np.arange(1, 6))


def test_column_sums_match_numpy_and_stay_a_product():
  x = np.random.default_rng(10).normal(size=(512, 384)).astype(np.float32)
  got = np.asarray(jax.jit(_sums.column_sums)(x))
  np.testing.assert_allclose(got, x.astype(np.float64).sum(0), rtol=0,
                             atol=2e-4)
  text = jax.jit(_sums.column_sums).lower(x).compile().as_text()
  assert re.search(r" dot\(", text) and not re.search(r" reduce\(", text)
  ints = np.arange(12, dtype=np.int32).reshape(4, 3)  # any dtype in
  np.testing.assert_array_equal(np.asarray(_sums.column_sums(ints)),
                                [18.0, 22.0, 26.0])

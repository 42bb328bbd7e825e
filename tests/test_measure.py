"""cgalr_jax.measure: layouts, split halves, pooling, backend policy.

References are NumPy: means over the right axes, ``np.corrcoef`` of the
concatenated or split samples.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cgalr_jax import measure
from cgalr_jax.connectome import correlation_from_stats


def reference_connectome(a):
  m = np.abs(np.corrcoef(np.asarray(a, np.float64), rowvar=False))
  np.fill_diagonal(m, 0.0)
  return m


def correlated(rng, n, p):
  latent = rng.normal(size=(n, 2))
  return (latent @ rng.normal(size=(2, p)) + 0.5 * rng.normal(size=(n, p))
          + 10.0).astype(np.float32)


def test_channels_first_reads_channels_not_the_last_spatial_axis():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(32, 6, 5, 4)).astype(np.float32)  # N, C, H, W
  got = np.asarray(measure.leaf_signals(x, "channels_first"))
  np.testing.assert_allclose(got, x.mean(axis=(2, 3)), rtol=1e-5, atol=1e-6)
  assert measure.num_signals(x, "channels_first") == 6
  assert measure.num_signals(x) == 4  # the default reads W as channels
  # Dense leaves are the same under either layout.
  d = rng.normal(size=(32, 3)).astype(np.float32)
  np.testing.assert_array_equal(measure.leaf_signals(d, "channels_first"), d)


def test_time_major_averages_over_time_with_samples_second():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(7, 20, 5)).astype(np.float32)  # T, N, P
  got = np.asarray(measure.signals({"h": x}, layout="time_major"))
  np.testing.assert_allclose(got, x.mean(axis=0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
      np.asarray(measure.connectome(x, layout="time_major")),
      reference_connectome(x.mean(axis=0)), atol=2e-6)
  with pytest.raises(ValueError, match="time_major"):
    measure.leaf_signals(np.ones(4, np.float32), "time_major")
  with pytest.raises(ValueError, match="layout"):
    measure.leaf_signals(x, "NCHW")


def test_split_halves_are_the_even_and_odd_rows():
  a = correlated(np.random.default_rng(2), 41, 6)
  stats = jax.jit(lambda x: measure.split_stats(x, halves=True))(a)
  assert stats.n.tolist() == [21.0, 20.0]
  for i, rows in enumerate((a[0::2], a[1::2])):
    np.testing.assert_allclose(
        np.asarray(correlation_from_stats(measure.part(stats, i))),
        reference_connectome(rows), atol=2e-6)
  np.testing.assert_allclose(
      np.asarray(correlation_from_stats(measure.merge_parts(stats))),
      reference_connectome(a), atol=2e-6)


@pytest.mark.parametrize("halves", [False, True])
def test_pooled_statistics_equal_those_of_the_concatenated_batches(halves):
  rng = np.random.default_rng(3)
  batches = [correlated(rng, 16, 7) * (1 + k) for k in range(4)]
  pool = measure.empty_pool(2 if halves else 1, 7)
  add = jax.jit(measure.pool_add)
  for b in batches:
    pool = add(pool, b)
  whole = np.concatenate(batches)
  assert float(jnp.sum(pool.n)) == whole.shape[0]
  np.testing.assert_allclose(
      np.asarray(correlation_from_stats(measure.merge_parts(pool))),
      reference_connectome(whole), atol=5e-6)
  if halves:  # each half pools the even (odd) rows of every batch
    evens = np.concatenate([b[0::2] for b in batches])
    np.testing.assert_allclose(
        np.asarray(correlation_from_stats(measure.part(pool, 0))),
        reference_connectome(evens), atol=5e-6)


def test_usable_needs_three_samples_and_two_live_signals():
  rng = np.random.default_rng(4)
  ok = lambda a: bool(measure.usable(measure.merge_parts(  # noqa: E731
      measure.split_stats(jnp.asarray(a, jnp.float32)))))
  assert ok(rng.normal(size=(3, 4)))
  assert not ok(rng.normal(size=(2, 4)))  # every |rho| would be 1
  assert not ok(np.ones((10, 4)))
  dead = rng.normal(size=(10, 4))
  dead[:, 1:] = 0.0
  assert not ok(dead)
  assert not ok(np.where(np.eye(10, 4) > 0, np.nan, rng.normal(size=(10, 4))))


@pytest.mark.parametrize("field", ["gram", "total", "shift"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_usable_rejects_any_non_finite_statistic(field, value):
  """The traced check (one reduction) against the NumPy one (one per
  field): a single non-finite entry anywhere makes statistics unusable."""
  rng = np.random.default_rng(5)
  stats = measure.merge_parts(measure.split_stats(
      jnp.asarray(rng.normal(size=(12, 5)), jnp.float32)))
  as_np = lambda s: jax.tree.map(np.asarray, s)  # noqa: E731
  assert bool(measure.usable(stats))
  assert bool(measure.usable(as_np(stats), np))
  x = np.array(getattr(stats, field))
  x.reshape(-1)[x.size // 2 + 1] = value
  bad = stats._replace(**{field: jnp.asarray(x)})
  assert not bool(jax.jit(measure.usable)(bad))
  assert not bool(measure.usable(as_np(bad), np))


def test_host_sort_speed_is_measured_once_per_process():
  """The sort probe sorts 2^16 values three times, then answers from its
  cache; its figure is a plausible time per element."""
  sorted_sizes = []
  real_sort = np.sort

  def counting_sort(values, *args, **kwargs):
    sorted_sizes.append(np.shape(values))
    return real_sort(values, *args, **kwargs)

  measure.host_sort_ns_per_element.cache_clear()
  try:
    with pytest.MonkeyPatch.context() as patch:
      patch.setattr(np, "sort", counting_sort)
      first = measure.host_sort_ns_per_element()
      assert measure.host_sort_ns_per_element() == first
    assert sorted_sizes == [(1 << 16,)] * 3
    # Between 0.05 ns (faster than any CPU sorts) and 10 us per element.
    assert 0.05 < first < 1e4
  finally:
    measure.host_sort_ns_per_element.cache_clear()


def test_usable_accepts_huge_finite_statistics():
  """Finite statistics near float32's limit stay usable in both checks (the
  traced one multiplies by zero before it sums, so nothing overflows)."""
  gram = np.diag(np.float32([2e38, 1e38, 3e38, 2.5e38])) + np.float32(1e37)
  stats = measure.SignalStats(
      n=jnp.float32(10.0), shift=jnp.zeros(4, jnp.float32),
      total=jnp.zeros(4, jnp.float32), gram=jnp.asarray(gram))
  assert bool(jax.jit(measure.usable)(stats))
  assert bool(measure.usable(jax.tree.map(np.asarray, stats), np))


def test_backend_policy():
  assert measure.resolve_backend("auto", "wd") == "host"
  assert measure.resolve_backend("device", "top", 4096) == "device"
  assert measure.resolve_backend("host", "top", 8) == "host"
  # On a CPU with a vectorised NumPy sort, the host backend from
  # HOST_MIN_NODES_ON_CPU signals on.
  threshold = measure.HOST_MIN_NODES_ON_CPU
  assert 1280 < threshold <= 1536  # the measured crossover (README)
  fast = measure.FAST_SORT_NS_PER_ELEMENT
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(jax, "default_backend", lambda: "cpu")
    patch.setattr(measure, "host_sort_ns_per_element", lambda: fast)
    for nodes in (None, 64, 1024, threshold - 1):
      assert measure.resolve_backend("auto", "top", nodes) == "device"
    for nodes in (threshold, 100_000):
      assert measure.resolve_backend("auto", "top", nodes) == "host"
    # Where the sort is slow (AMD Zen 4's AVX-512 sort), the device backend
    # at every size; an explicit backend is still honoured.
    patch.setattr(measure, "host_sort_ns_per_element", lambda: 2 * fast)
    for nodes in (None, 64, threshold, 100_000):
      assert measure.resolve_backend("auto", "top", nodes) == "device"
    assert measure.resolve_backend("host", "top", 100_000) == "host"
    # Several processes: the device backend, whatever one process's sort
    # timing says (every process must trace the same program).
    patch.setattr(measure, "host_sort_ns_per_element", lambda: fast)
    patch.setattr(jax, "process_count", lambda: 2)
    for nodes in (threshold, 100_000):
      assert measure.resolve_backend("auto", "top", nodes) == "device"
    assert measure.resolve_backend("host", "top", 100_000) == "host"
  # Elsewhere the device backend at every size.
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(jax, "default_backend", lambda: "gpu")
    assert measure.resolve_backend("auto", "top", 100_000) == "device"

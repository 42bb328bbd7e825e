"""cgalr_jax.wd against independent references (DESIGN.md 2, "WD").

References: ripser diagrams of ``sqrt(1 - M)`` built here plus
``persim.wasserstein`` (WD), brute force over all matchings (diagram
distances).
"""

from __future__ import annotations

import itertools

import jax
import numpy as np
import persim
import pytest
import ripser

from cgalr_jax import topology, wd, wd_distance

# ----------------------------------------------------------------------------
# Helpers and references.


def activation_connectome(rng, p, n=16):
  """|corrcoef| of structured random signals (NumPy)."""
  a = rng.normal(size=(n, p))
  a[:, 1::3] += a[:, 0:1]  # some structure
  m = np.abs(np.corrcoef(a, rowvar=False))
  m = 0.5 * (m + m.T)
  np.fill_diagonal(m, 0.0)
  return m.astype(np.float32)


def reference_diagrams(m):
  """Ripser H0 (finite) and H1 diagrams of ``sqrt(1 - M)``, written here."""
  dist = np.sqrt(np.clip(1.0 - np.asarray(m, np.float64), 0.0, 1.0))
  np.fill_diagonal(dist, 0.0)
  dgms = ripser.ripser(dist, maxdim=1, distance_matrix=True)["dgms"]
  return [d[np.isfinite(d[:, 1])] for d in dgms[:2]]


def reference_wd(m1, m2):
  (a0, a1), (b0, b1) = reference_diagrams(m1), reference_diagrams(m2)
  return persim.wasserstein(a0, b0) + persim.wasserstein(a1, b1)


def brute_force_diagram_distance(a, b, p):
  """Min over all partial matchings; unmatched points go to the diagonal."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  to_diag = lambda x: (x[1] - x[0]) / np.sqrt(2.0)  # noqa: E731
  best = np.inf
  slots = list(range(len(b))) + [None] * len(a)
  for choice in set(itertools.permutations(slots, len(a))):
    cost = 0.0
    for i, j in enumerate(choice):
      cost += (to_diag(a[i]) if j is None
               else np.linalg.norm(a[i] - b[j])) ** p
    used = {j for j in choice if j is not None}
    cost += sum(to_diag(b[j]) ** p for j in range(len(b)) if j not in used)
    best = min(best, cost)
  return best ** (1.0 / p)


def wd_matrices():
  rng = np.random.default_rng(7)
  for p in [9, 10, 12]:
    yield activation_connectome(rng, p), activation_connectome(rng, p)


# ----------------------------------------------------------------------------
# Distances.


@pytest.mark.parametrize("m1, m2", list(wd_matrices()))
def test_wd_distance_matches_persim_on_ripser_diagrams(m1, m2):
  h1_sizes = [reference_diagrams(m)[1].shape[0] for m in (m1, m2)]
  assert max(h1_sizes) > 0  # H1 really takes part
  expected = reference_wd(m1, m2)
  assert expected > 0
  assert wd_distance(m1, m2) == pytest.approx(expected, rel=1e-6, abs=1e-9)
  assert wd_distance(m2, m1) == pytest.approx(expected, rel=1e-6, abs=1e-9)
  assert wd_distance(m1, m1) == 0.0
  # Diagrams themselves equal ripser's.
  for got, ref in zip(wd.persistence_diagrams(m1), reference_diagrams(m1)):
    np.testing.assert_allclose(np.asarray(got), ref, atol=1e-12)


def test_wd_distance_rejects_p_below_one():
  m = activation_connectome(np.random.default_rng(0), 4)
  with pytest.raises(ValueError, match="p"):
    wd_distance(m, m, p=0.5)


@pytest.mark.parametrize("p", [1, 2])
def test_diagram_distance_brute_force(p):
  rng = np.random.default_rng(8 + p)
  for na, nb in [(0, 2), (1, 1), (2, 3), (3, 3), (3, 1)]:
    births_a = rng.uniform(0, 1, na)
    a = np.stack([births_a, births_a + rng.uniform(0.01, 0.5, na)], 1)
    births_b = rng.uniform(0, 1, nb)
    b = np.stack([births_b, births_b + rng.uniform(0.01, 0.5, nb)], 1)
    expected = brute_force_diagram_distance(a.reshape(-1, 2), b.reshape(-1, 2),
                                            p)
    got = wd.diagram_distance(a, b, p=p)
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-12)
    if p == 1:
      assert got == pytest.approx(persim.wasserstein(a, b), rel=1e-9,
                                  abs=1e-12)
    # Diagonal points (padding) change nothing.
    padded = np.concatenate([a, [[0.0, 0.0], [0.3, 0.3]]])
    assert wd.diagram_distance(padded, b, p=p) == pytest.approx(
        got, rel=1e-12, abs=1e-12)


# ----------------------------------------------------------------------------
# Fixed-size summaries and the host step inside jit.


def test_wd_summary_padding_keeps_distances():
  rng = np.random.default_rng(9)
  m1 = activation_connectome(rng, 8)
  m2 = activation_connectome(rng, 8)
  k = 32  # more than any diagram here has points
  s1, s2 = wd.wd_summary_host(m1, k), wd.wd_summary_host(m2, k)
  assert s1.shape == (2, k, 2) and s1.dtype == np.float32
  ref1 = reference_diagrams(m1)
  for dim in range(2):
    n = ref1[dim].shape[0]
    assert n < k
    np.testing.assert_array_equal(s1[dim, n:], 0.0)  # padding
  from_summaries = (wd.diagram_distance(s1[0], s2[0])
                    + wd.diagram_distance(s1[1], s2[1]))
  assert from_summaries == pytest.approx(reference_wd(m1, m2), rel=1e-5)
  # Inside jit: the host step returns the same diagrams and distance.
  diagrams, dist, ok = jax.jit(wd.wd_measure_via_host,
                               static_argnums=2)(m2, s1, k)
  assert bool(ok)
  np.testing.assert_array_equal(np.asarray(diagrams), s2)
  assert float(dist) == pytest.approx(reference_wd(m1, m2), rel=1e-5)


def test_wd_summary_keeps_the_most_persistent_points():
  m = activation_connectome(np.random.default_rng(10), 12)
  k = 3
  summary = wd.wd_summary_host(m, k)
  for dim, ref in enumerate(reference_diagrams(m)):
    expected = np.sort(ref[:, 1] - ref[:, 0])[::-1][:k]
    got = np.sort(summary[dim, :, 1] - summary[dim, :, 0])[::-1]
    np.testing.assert_allclose(got[:expected.shape[0]], expected, atol=1e-6)


def test_wd_host_step_failure_is_a_skip():
  # Ripser returns diagrams even for NaN distances; the step must not.
  with pytest.raises(ValueError, match="non-finite"):
    wd.persistence_diagrams(np.full((5, 5), np.nan, np.float32))
  k = 4
  step = jax.jit(wd.wd_measure_via_host, static_argnums=2)
  bad = np.full((5, 5), np.nan, np.float32)
  diagrams, dist, ok = step(bad, np.zeros((2, k, 2), np.float32), k)
  assert not bool(ok)
  assert np.all(np.asarray(diagrams) == 0) and float(dist) == 0.0


# ----------------------------------------------------------------------------
# Layout: WD has its own module; topology keeps the old names working.


def test_topology_reexports_wd_names():
  for name in ("persistence_diagrams", "diagram_distance", "wd_distance",
               "wd_summary_host", "wd_measure_via_host"):
    assert getattr(topology, name) is getattr(wd, name)
  from cgalr_jax.topology import wd_distance as old  # pylint: disable=C0415
  assert old is wd.wd_distance is wd_distance
  with pytest.raises(AttributeError):
    getattr(topology, "no_such_name")


def test_patching_the_old_location_reaches_the_wd_step(monkeypatch):
  m = activation_connectome(np.random.default_rng(12), 6)
  step = jax.jit(topology.wd_measure_via_host, static_argnums=2)
  ref = np.zeros((2, 4, 2), np.float32)
  assert bool(step(m, ref, 4)[2])
  real = wd.persistence_diagrams

  def broken(*args, **kwargs):
    raise RuntimeError("ripser failed")

  monkeypatch.setattr(topology, "persistence_diagrams", broken)
  assert wd.persistence_diagrams is broken
  assert not bool(step(m, ref, 4)[2])
  monkeypatch.undo()
  assert wd.persistence_diagrams is real
  assert bool(step(m, ref, 4)[2])

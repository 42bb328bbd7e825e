"""cgalr_jax.topology against independent references (DESIGN.md 2).

References: scipy's minimum spanning tree on negated weights and brute force
over all spanning trees (birth sets), hand-computed TOP cases, ripser +
persim.wasserstein (WD), brute force over all matchings (diagram distances).
"""

from __future__ import annotations

import collections
import itertools

import jax
import numpy as np
import persim
import pytest
import ripser
from scipy.sparse.csgraph import minimum_spanning_tree

from cgalr_jax import top_distance, wd_distance
from cgalr_jax import topology

# ----------------------------------------------------------------------------
# Helpers and references.


def random_matrix(rng, p, *, low=0.01):
  """Symmetric float32 weights in [low, 1), zero diagonal."""
  upper = np.triu(rng.uniform(low, 1.0, size=(p, p)), k=1)
  return (upper + upper.T).astype(np.float32)


def from_edges(p, weights):
  """Matrix from ``{(i, j): w}``."""
  m = np.zeros((p, p), np.float32)
  for (i, j), w in weights.items():
    m[i, j] = m[j, i] = w
  return m


def upper(m):
  return np.asarray(m)[np.triu_indices(m.shape[0], k=1)]


def scipy_max_tree(m):
  """Sorted maximum-spanning-tree weights: scipy MST on ``-M``."""
  tree = minimum_spanning_tree(-np.asarray(m, np.float64))
  assert tree.nnz == m.shape[0] - 1  # weights must be nonzero for this
  return np.sort(-tree.data)


def is_spanning_tree(p, edges):
  parent = list(range(p))

  def find(x):
    while parent[x] != x:
      x = parent[x]
    return x

  for i, j in edges:
    ri, rj = find(i), find(j)
    if ri == rj:
      return False
    parent[ri] = rj
  return True


def brute_force_max_tree(weights_int):
  """Sorted integer weights of a maximum spanning tree, by enumeration."""
  p = weights_int.shape[0]
  pairs = list(itertools.combinations(range(p), 2))
  best, best_set = None, None
  for edges in itertools.combinations(pairs, p - 1):
    if is_spanning_tree(p, edges):
      total = sum(int(weights_int[i, j]) for i, j in edges)
      if best is None or total > best:
        best = total
        best_set = sorted(int(weights_int[i, j]) for i, j in edges)
  return best_set


def multiset_minus(values, removed):
  """Sorted ``values`` with one copy of each of ``removed`` taken out."""
  left = collections.Counter(values.tolist())
  left.subtract(collections.Counter(removed.tolist()))
  assert all(c >= 0 for c in left.values())
  return np.sort(np.array(list(left.elements()), np.float32))


def reference_quantiles(sorted_values, k):
  """``q_k = x[floor((k + 1/2) n / K)]`` computed in float64."""
  n = sorted_values.shape[0]
  ranks = np.floor((np.arange(k) + 0.5) * n / k).astype(int)
  return sorted_values[ranks]


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


def activation_connectome(rng, p, n=24, dead=()):
  """|corrcoef| of structured random signals (NumPy), dead units give 0."""
  a = rng.normal(size=(n, p))
  a[:, 1::3] += a[:, 0:1]  # some structure
  for j in dead:
    a[:, j] = 0.0
  with np.errstate(invalid="ignore", divide="ignore"):
    m = np.abs(np.corrcoef(a, rowvar=False))
  m = np.nan_to_num(0.5 * (m + m.T), nan=0.0)
  np.fill_diagonal(m, 0.0)
  return m.astype(np.float32)


device_summary = jax.jit(topology.top_summary_device, static_argnums=1)
device_tree = jax.jit(topology.max_spanning_tree_weights_device)

# ----------------------------------------------------------------------------
# Birth and death sets.


def test_birth_set_is_scipy_maximum_spanning_tree():
  rng = np.random.default_rng(0)
  for p in [3, 4, 5, 7, 12, 23, 40]:
    m = random_matrix(rng, p)
    ref = scipy_max_tree(m)
    births, deaths = topology.birth_death_sets(m)
    np.testing.assert_array_equal(births, ref.astype(np.float32))
    np.testing.assert_array_equal(topology.max_spanning_tree_weights(m),
                                  births)
    np.testing.assert_array_equal(np.sort(np.asarray(device_tree(m))),
                                  ref.astype(np.float32))
    # Death set: every other edge, as a multiset, sorted ascending.
    np.testing.assert_array_equal(deaths, multiset_minus(upper(m), ref))
    assert births.shape == (p - 1,)
    assert deaths.shape == (p * (p - 1) // 2 - (p - 1),)
    assert topology.set_sizes(p) == (births.shape[0], deaths.shape[0])


@pytest.mark.parametrize("p", [3, 4, 5])
@pytest.mark.parametrize("levels", [3, 1000])  # tie-heavy and near-distinct
def test_birth_set_is_brute_force_maximum_spanning_tree(p, levels):
  rng = np.random.default_rng(p * levels)
  for _ in range(5):
    w_int = np.triu(rng.integers(0, levels, size=(p, p)), k=1)
    w_int = w_int + w_int.T
    m = (w_int / levels).astype(np.float32)
    expected = np.array(brute_force_max_tree(w_int)) / levels
    births, deaths = topology.birth_death_sets(m)
    np.testing.assert_allclose(births, expected.astype(np.float32), atol=0)
    np.testing.assert_allclose(np.sort(np.asarray(device_tree(m))), births,
                               atol=0)
    np.testing.assert_array_equal(deaths, multiset_minus(upper(m), births))


def test_device_spanning_tree_eager_and_jit(maybe_jit):
  m = random_matrix(np.random.default_rng(1), 6)
  got = maybe_jit(topology.max_spanning_tree_weights_device)(m)
  np.testing.assert_array_equal(np.sort(np.asarray(got)),
                                scipy_max_tree(m).astype(np.float32))


# ----------------------------------------------------------------------------
# Exact TOP distance.

# 3 nodes. M1: w01=.9, w02=.1, w12=.5 -> tree {.9, .5}: B=[.5,.9], D=[.1].
#          M2: w01=.2, w02=.6, w12=.4 -> tree {.6, .4}: B=[.4,.6], D=[.2].
# TOP = (.5-.4)^2 + (.9-.6)^2 + (.1-.2)^2 = .01 + .09 + .01 = .11
M3_A = from_edges(3, {(0, 1): .9, (0, 2): .1, (1, 2): .5})
M3_B = from_edges(3, {(0, 1): .2, (0, 2): .6, (1, 2): .4})
TOP3 = 0.11

# 4 nodes. M1: w01=.9 w02=.8 w03=.1 w12=.7 w13=.6 w23=.2. Kruskal, heaviest
#   first: .9 (0-1) take, .8 (0-2) take, .7 (1-2) closes a cycle, .6 (1-3)
#   take. B=[.6,.8,.9], D=[.1,.2,.7].
# M2: w01=.3 w02=.4 w03=.5 w12=.6 w13=.1 w23=.2. .6 (1-2) take, .5 (0-3)
#   take, .4 (0-2) take (joins {1,2} and {0,3}). B=[.4,.5,.6], D=[.1,.2,.3].
# TOP = (.6-.4)^2 + (.8-.5)^2 + (.9-.6)^2 + 0 + 0 + (.7-.3)^2
#     = .04 + .09 + .09 + .16 = .38
M4_A = from_edges(4, {(0, 1): .9, (0, 2): .8, (0, 3): .1, (1, 2): .7,
                      (1, 3): .6, (2, 3): .2})
M4_B = from_edges(4, {(0, 1): .3, (0, 2): .4, (0, 3): .5, (1, 2): .6,
                      (1, 3): .1, (2, 3): .2})
TOP4 = 0.38


def test_hand_computed_sets():
  b, d = topology.birth_death_sets(M3_A)
  np.testing.assert_allclose(b, [.5, .9], rtol=1e-6)
  np.testing.assert_allclose(d, [.1], rtol=1e-6)
  b, d = topology.birth_death_sets(M4_B)
  np.testing.assert_allclose(b, [.4, .5, .6], rtol=1e-6)
  np.testing.assert_allclose(d, [.1, .2, .3], rtol=1e-6)


@pytest.mark.parametrize("m1, m2, expected",
                         [(M3_A, M3_B, TOP3), (M4_A, M4_B, TOP4)])
def test_top_distance_hand_computed(m1, m2, expected):
  assert top_distance(m1, m2) == pytest.approx(expected, abs=1e-6)
  assert top_distance(m2, m1) == pytest.approx(expected, abs=1e-6)


def test_top_distance_zero_on_equal_and_symmetric():
  rng = np.random.default_rng(2)
  for p in [2, 3, 9, 17]:
    a, b = random_matrix(rng, p), random_matrix(rng, p)
    assert top_distance(a, a) == 0.0
    assert top_distance(a, b) == top_distance(b, a)
    assert top_distance(a, b) > 0.0
    # Node relabelling does not change the topology.
    perm = rng.permutation(p)
    assert top_distance(a, a[np.ix_(perm, perm)]) == pytest.approx(0, abs=1e-12)


def test_top_distance_rejects_bad_shapes():
  with pytest.raises(ValueError, match="equal node counts"):
    top_distance(np.zeros((3, 3)), np.zeros((4, 4)))
  with pytest.raises(ValueError, match="square"):
    top_distance(np.zeros((3, 4)), np.zeros((3, 4)))


# ----------------------------------------------------------------------------
# K-point summaries.


@pytest.mark.parametrize("p, ks", [(4, [3, 12]), (5, [12, 24]), (7, [30])])
@pytest.mark.parametrize("backend", ["host", "device"])
def test_summary_distance_is_exact_when_k_divides(p, ks, backend):
  rng = np.random.default_rng(p)
  n_b, n_d = topology.set_sizes(p)
  for k in ks:
    assert k % n_b == 0 and k % n_d == 0
    for _ in range(3):
      a, b = random_matrix(rng, p), random_matrix(rng, p)
      if backend == "host":
        sa, sb = topology.top_summary_host(a, k), topology.top_summary_host(b, k)
      else:
        sa, sb = device_summary(a, k), device_summary(b, k)
      got = float(topology.top_summary_distance(sa, sb, p))
      assert got == pytest.approx(top_distance(a, b), rel=1e-5, abs=1e-7)


def test_hand_computed_cases_through_summaries():
  for m1, m2, expected, k in [(M3_A, M3_B, TOP3, 2), (M4_A, M4_B, TOP4, 3)]:
    p = m1.shape[0]
    got = topology.top_summary_distance(
        topology.top_summary_host(m1, k), device_summary(m2, k), p)
    assert float(got) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("k", [1, 7, 16, 64, 100])
def test_summary_is_the_quantile_formula(k):
  m = random_matrix(np.random.default_rng(k), 11)
  births = scipy_max_tree(m).astype(np.float32)
  deaths = multiset_minus(upper(m), births)
  host = topology.top_summary_host(m, k)
  assert host.shape == (2, k) and host.dtype == np.float32
  np.testing.assert_array_equal(host[0], reference_quantiles(births, k))
  np.testing.assert_array_equal(host[1], reference_quantiles(deaths, k))


def test_summary_distance_approximates_otherwise():
  rng = np.random.default_rng(3)
  p = 16  # n_b = 15, n_d = 105
  errors = {16: [], 512: []}
  for _ in range(5):
    a = activation_connectome(rng, p)
    b = activation_connectome(rng, p)
    exact = top_distance(a, b)
    for k in errors:
      approx = float(topology.top_summary_distance(
          topology.top_summary_host(a, k), topology.top_summary_host(b, k), p))
      errors[k].append(abs(approx - exact) / exact)
  assert max(errors[16]) < 0.5
  assert max(errors[512]) < 0.05
  assert np.mean(errors[512]) < np.mean(errors[16])


def tie_heavy_matrices():
  rng = np.random.default_rng(4)
  yield "random", random_matrix(rng, 13)
  yield "dead-units", activation_connectome(rng, 13, dead=(2, 5, 6, 11))
  quantised = np.round(random_matrix(rng, 13) * 4) / 4
  yield "quantised", quantised.astype(np.float32)
  yield "all-zero", np.zeros((13, 13), np.float32)
  yield "all-equal", (1.0 - np.eye(13)).astype(np.float32) * np.float32(0.3)
  yield "two-nodes", from_edges(2, {(0, 1): 0.7})


@pytest.mark.parametrize("name, m", list(tie_heavy_matrices()))
@pytest.mark.parametrize("k", [8, 33])
def test_device_and_host_summaries_agree(name, m, k):
  host = topology.top_summary_host(m, k)
  dev = np.asarray(device_summary(m, k))
  np.testing.assert_allclose(dev, host, atol=1e-6, rtol=0)
  via_host, ok = jax.jit(topology.top_summary_via_host, static_argnums=1)(m, k)
  assert bool(ok)
  np.testing.assert_array_equal(np.asarray(via_host), host)


def test_host_summary_callback_failures_and_vmap(monkeypatch):
  summary = jax.jit(topology.top_summary_via_host, static_argnums=1)
  bad = np.full((5, 5), np.nan, np.float32)
  out, ok = summary(bad, 4)
  assert not bool(ok) and np.all(np.isfinite(np.asarray(out)))
  # A batch of matrices under vmap equals one call per matrix.
  rng = np.random.default_rng(6)
  batch = np.stack([random_matrix(rng, 5) for _ in range(3)])
  outs, oks = jax.vmap(lambda x: topology.top_summary_via_host(x, 4))(batch)
  assert np.all(np.asarray(oks))
  for i in range(3):
    np.testing.assert_array_equal(np.asarray(outs[i]),
                                  topology.top_summary_host(batch[i], 4))

  def boom(*args, **kwargs):
    raise RuntimeError("host failure")

  monkeypatch.setattr(topology, "top_summary_host", boom)
  out, ok = summary(batch[0], 4)
  assert not bool(ok)


# ----------------------------------------------------------------------------
# WD.


def wd_matrices():
  rng = np.random.default_rng(7)
  for p in [9, 10, 12]:
    yield activation_connectome(rng, p, n=16), activation_connectome(
        rng, p, n=16)


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
  for got, ref in zip(topology.persistence_diagrams(m1),
                      reference_diagrams(m1)):
    np.testing.assert_allclose(np.asarray(got), ref, atol=1e-12)


def test_wd_distance_rejects_p_below_one():
  with pytest.raises(ValueError, match="p"):
    wd_distance(M3_A, M3_B, p=0.5)


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
    got = topology.diagram_distance(a, b, p=p)
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-12)
    if p == 1:
      assert got == pytest.approx(persim.wasserstein(a, b), rel=1e-9,
                                  abs=1e-12)
    # Diagonal points (padding) change nothing.
    padded = np.concatenate([a, [[0.0, 0.0], [0.3, 0.3]]])
    assert topology.diagram_distance(padded, b, p=p) == pytest.approx(
        got, rel=1e-12, abs=1e-12)


def test_wd_summary_padding_keeps_distances():
  rng = np.random.default_rng(9)
  m1 = activation_connectome(rng, 8, n=16)
  m2 = activation_connectome(rng, 8, n=16)
  k = 32  # more than any diagram here has points
  s1, s2 = topology.wd_summary_host(m1, k), topology.wd_summary_host(m2, k)
  assert s1.shape == (2, k, 2) and s1.dtype == np.float32
  ref1 = reference_diagrams(m1)
  for dim in range(2):
    n = ref1[dim].shape[0]
    assert n < k
    np.testing.assert_array_equal(s1[dim, n:], 0.0)  # padding
  from_summaries = (topology.diagram_distance(s1[0], s2[0])
                    + topology.diagram_distance(s1[1], s2[1]))
  assert from_summaries == pytest.approx(reference_wd(m1, m2), rel=1e-5)
  # Inside jit: the host step returns the same diagrams and distance.
  diagrams, dist, ok = jax.jit(topology.wd_measure_via_host,
                               static_argnums=2)(m2, s1, k)
  assert bool(ok)
  np.testing.assert_array_equal(np.asarray(diagrams), s2)
  assert float(dist) == pytest.approx(reference_wd(m1, m2), rel=1e-5)


def test_wd_summary_keeps_the_most_persistent_points():
  m = activation_connectome(np.random.default_rng(10), 12, n=16)
  k = 3
  summary = topology.wd_summary_host(m, k)
  for dim, ref in enumerate(reference_diagrams(m)):
    expected = np.sort(ref[:, 1] - ref[:, 0])[::-1][:k]
    got = np.sort(summary[dim, :, 1] - summary[dim, :, 0])[::-1]
    np.testing.assert_allclose(got[:expected.shape[0]], expected, atol=1e-6)

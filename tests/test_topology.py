"""cgalr_jax.topology against independent references (DESIGN.md 2).

References: scipy's minimum spanning tree on negated weights, brute force
over all spanning trees and a plain Kruskal written here (birth sets), full
NumPy sorts (death sets and quantiles), hand-computed TOP cases. Both
summary backends must equal the reference quantiles bit for bit, on every
path each of them can take (dense or sparse spanning tree and Boruvka
rounds on the host; sort or radix selection on the device). WD is tested in
test_wd.py.
"""

# The tests reach into the private paths each backend can take.
# pylint: disable=protected-access

from __future__ import annotations

import collections
import itertools

import jax
import numpy as np
import pytest
from scipy.sparse.csgraph import minimum_spanning_tree

from cgalr_jax import top_distance
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
  np.testing.assert_array_equal(dev, host)
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
# Exactness of every path, bit for bit, on awkward matrices.


def kruskal_sets(m):
  """Sorted birth and death sets by a plain Kruskal (union-find) written here.

  Reads the upper triangle; zeros are ordinary weights (unlike SciPy's
  sparse spanning tree, which drops them).
  """
  m = np.asarray(m, np.float32)
  p = m.shape[0]
  rows, cols = np.triu_indices(p, k=1)
  weights = m[rows, cols]
  parent = list(range(p))

  def find(x):
    while parent[x] != x:
      parent[x] = parent[parent[x]]
      x = parent[x]
    return x

  in_tree = np.zeros(weights.shape[0], bool)
  taken = 0
  for e in np.argsort(-weights, kind="stable"):
    if taken == p - 1:
      break
    ri, rj = find(rows[e]), find(cols[e])
    if ri != rj:
      parent[ri] = rj
      in_tree[e] = True
      taken += 1
  return np.sort(weights[in_tree]), np.sort(weights[~in_tree])


def exact_summary(m, k):
  births, deaths = kruskal_sets(m)
  out = np.zeros((2, k), np.float32)
  if births.shape[0]:
    out[0] = reference_quantiles(births, k)
  if deaths.shape[0]:
    out[1] = reference_quantiles(deaths, k)
  return out


def symmetric(upper_values, p):
  """Symmetric float32 matrix with zero diagonal from a ``[p, p]`` draw."""
  upper = np.triu(np.asarray(upper_values, np.float64), k=1)
  return (upper + upper.T).astype(np.float32)


def awkward_matrix(kind, p, seed):
  """A symmetric ``[p, p]`` connectome of the named kind."""
  rng = np.random.default_rng(seed)
  if kind == "uniform":
    return symmetric(rng.uniform(0, 1, (p, p)), p)
  if kind == "activations":
    return activation_connectome(rng, p, n=max(24, 2 * p))
  if kind == "dead-rows":  # row 0 and the last row dead, exact zeros
    dead = sorted({0, p - 1} | set(range(2, p, 5)))
    return activation_connectome(rng, p, n=max(24, 2 * p), dead=dead)
  if kind == "ties":  # a handful of levels, 0 and 1 included
    return symmetric(rng.integers(0, 9, (p, p)) / 8.0, p)
  if kind == "zeros-and-ones":
    w = rng.uniform(0, 1, (p, p))
    w[rng.uniform(size=(p, p)) < 0.3] = 0.0
    w[rng.uniform(size=(p, p)) < 0.2] = 1.0
    return symmetric(w, p)
  if kind == "tiny":  # 1 - M would round these away
    return symmetric(10.0 ** rng.uniform(-30, -1, (p, p)), p)
  if kind == "blocks":  # strong inside 3 blocks, weak across: a split forest
    block = rng.integers(0, 3, p)
    w = np.where(block[:, None] == block[None, :],
                 rng.uniform(0.5, 1.0, (p, p)), rng.uniform(0, 0.05, (p, p)))
    return symmetric(w, p)
  if kind == "all-zero":
    return np.zeros((p, p), np.float32)
  if kind == "all-equal":
    return ((1.0 - np.eye(p)) * 0.3).astype(np.float32)
  raise ValueError(kind)


KINDS = ("uniform", "activations", "dead-rows", "ties", "zeros-and-ones",
         "tiny", "blocks", "all-zero", "all-equal")
SIZES = (2, 3, 4, 5, 7, 16, 33, 64, 101)


@pytest.fixture
def sparse_host_tree(monkeypatch):
  """Host summaries take the sparse-tree path at every P, with few heavy edges.

  One heavy edge per node leaves most nodes outside the first forest, so
  Boruvka rounds do most of the work; the calls are counted.
  """
  calls = []
  real = topology._boruvka_completion

  def counted(*args):
    calls.append(args[3])  # the number of components to join
    return real(*args)

  monkeypatch.setattr(topology, "_SPARSE_TREE_MIN_EDGES", 0)
  monkeypatch.setattr(topology, "_HEAVY_EDGES_PER_NODE", 1)
  monkeypatch.setattr(topology, "_boruvka_completion", counted)
  return calls


@pytest.mark.parametrize("p", SIZES)
@pytest.mark.parametrize("kind", KINDS)
def test_host_summary_is_exact(kind, p, sparse_host_tree):
  m = awkward_matrix(kind, p, seed=p)
  expected = exact_summary(m, 33)
  sparse = topology.top_summary_host(m, 33)
  np.testing.assert_array_equal(sparse, expected)
  births = np.sort(topology._tree_weights_host(
      m[np.triu_indices(p, k=1)], p))
  np.testing.assert_array_equal(births, kruskal_sets(m)[0])
  sparse_host_tree.clear()
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(topology, "_SPARSE_TREE_MIN_EDGES", 1 << 62)
    np.testing.assert_array_equal(topology.top_summary_host(m, 33), expected)
  assert not sparse_host_tree


def test_host_summary_reads_the_upper_triangle_in_either_form():
  rng = np.random.default_rng(12)
  for p in [2, 3, 9, 800]:
    m = awkward_matrix("activations", p, seed=p)
    upper = m[np.triu_indices(p, k=1)]
    junk = m + np.tril(rng.uniform(0, 1, (p, p)), k=-1).astype(np.float32)
    expected = topology.top_summary_host(m, 64)
    np.testing.assert_array_equal(topology.top_summary_host(junk, 64),
                                  expected)
    np.testing.assert_array_equal(topology.top_summary_host(upper, 64),
                                  expected)
  with pytest.raises(ValueError, match="complete graph"):
    topology.top_summary_host(np.zeros(5, np.float32), 4)


def test_condensed_rows_are_matrix_rows():
  m = awkward_matrix("uniform", 9, seed=0)
  nodes = np.array([0, 4, 8])
  rows = topology._condensed_rows(
      m[np.triu_indices(9, k=1)], 9, nodes)
  off_diagonal = nodes[:, None] != np.arange(9)[None, :]
  np.testing.assert_array_equal(rows[off_diagonal], m[nodes][off_diagonal])


def test_host_sparse_tree_really_runs_boruvka(sparse_host_tree):
  m = awkward_matrix("blocks", 101, seed=0)
  np.testing.assert_array_equal(topology.top_summary_host(m, 512),
                                exact_summary(m, 512))
  assert sparse_host_tree and max(sparse_host_tree) >= 3


device_radix = jax.jit(
    lambda m, k: topology._top_summary_device(m, k, radix=True),
    static_argnums=1)


@pytest.mark.parametrize("p", SIZES)
def test_device_summary_is_exact(p):
  # The radix selection is the default from P = 182 only; it runs at a few
  # small sizes here too (each size is one more compile).
  radix = p in (2, 3, 7, 33, 101)
  for kind in KINDS:
    m = awkward_matrix(kind, p, seed=p)
    expected = exact_summary(m, 33)
    np.testing.assert_array_equal(np.asarray(device_summary(m, 33)), expected,
                                  err_msg=kind)
    if radix:
      np.testing.assert_array_equal(np.asarray(device_radix(m, 33)), expected,
                                    err_msg=kind)


def test_radix_selection_matches_sorting():
  rng = np.random.default_rng(11)
  # Negative, positive, signed zeros, infinities and heavy duplicates.
  pool = np.concatenate([rng.normal(size=40).astype(np.float32),
                         np.float32([0.0, -0.0, np.inf, -np.inf, 1e-38, -3.5])])
  values = rng.choice(pool, size=5000).astype(np.float32)
  removed = values[rng.choice(values.shape[0], size=700, replace=False)]
  keys = topology._float_keys(values)
  removed_keys = topology._float_keys(removed)
  left = collections.Counter(np.asarray(keys).tolist())
  left.subtract(collections.Counter(np.asarray(removed_keys).tolist()))
  left = np.sort(np.array(list(left.elements()), np.int32))
  ranks = np.unique(rng.integers(0, left.shape[0], 200))
  got = jax.jit(topology._select_keys_device, static_argnums=2)(
      keys, removed_keys, tuple(ranks))
  np.testing.assert_array_equal(np.asarray(got), left[ranks])


def test_device_radix_default_just_above_its_threshold():
  # P = 190 (17,955 edges): the smallest MLP sizes of the experiments take
  # the radix selection by default on the device.
  p = 190
  assert p * (p - 1) // 2 >= topology._RADIX_MIN_EDGES > 181 * 180 // 2
  for kind in ("activations", "dead-rows", "blocks"):
    m = awkward_matrix(kind, p, seed=3)
    np.testing.assert_array_equal(np.asarray(device_summary(m, 512)),
                                  exact_summary(m, 512), err_msg=kind)


@pytest.mark.parametrize("kind", ["activations", "dead-rows", "blocks"])
def test_default_paths_at_a_large_size(kind):
  # P = 800: the host's sparse tree and the device's radix selection are the
  # defaults here; K = 512 as in scale_by_connectome.
  p = 800
  assert p * (p - 1) // 2 >= topology._SPARSE_TREE_MIN_EDGES
  assert p * (p - 1) // 2 >= topology._RADIX_MIN_EDGES
  m = awkward_matrix(kind, p, seed=1)
  expected = exact_summary(m, 512)
  np.testing.assert_array_equal(topology.top_summary_host(m, 512), expected)
  np.testing.assert_array_equal(np.asarray(device_summary(m, 512)), expected)
  via_host, ok = jax.jit(topology.top_summary_via_host, static_argnums=1)(
      m, 512)
  assert bool(ok)
  np.testing.assert_array_equal(np.asarray(via_host), expected)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_host_summary_rejects_non_finite_weights(bad, sparse_host_tree):
  del sparse_host_tree  # the sparse path must stop too, not loop
  m = awkward_matrix("uniform", 40, seed=3)
  m[3, 7] = m[7, 3] = bad
  m[5, :] = m[:, 5] = np.where(np.arange(40) == 5, 0, bad)
  with pytest.raises(ValueError, match="non-finite"):
    topology.top_summary_host(m, 16)
  _, ok = jax.jit(topology.top_summary_via_host, static_argnums=1)(m, 16)
  assert not bool(ok)


@pytest.fixture
def split_sort(monkeypatch):
  """The host's two-thread sort at every size (from 2^18 edges by default)."""
  monkeypatch.setattr(topology, "_SPLIT_SORT_MIN_EDGES", 0)


@pytest.mark.parametrize("p", SIZES)
def test_host_summary_with_split_sort_is_exact(p, split_sort):
  del split_sort
  for kind in KINDS:
    m = awkward_matrix(kind, p, seed=p)
    upper = m[np.triu_indices(p, k=1)]
    for k in (33, 512):
      expected = exact_summary(m, k)
      np.testing.assert_array_equal(topology.top_summary_host(m, k),
                                    expected, err_msg=kind)
      np.testing.assert_array_equal(topology.top_summary_host(upper, k),
                                    expected, err_msg=kind)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_split_sort_rejects_non_finite_weights(bad, split_sort,
                                               sparse_host_tree):
  del split_sort, sparse_host_tree
  m = awkward_matrix("uniform", 40, seed=3)
  m[3, 7] = m[7, 3] = bad
  with pytest.raises(ValueError, match="non-finite"):
    topology.top_summary_host(m, 16)


def test_select_from_two_sorted_halves_matches_merging():
  rng = np.random.default_rng(21)
  pool = np.float32([-3.5, -1.0, 0.0, 0.25, 0.25, 1.0, 2.0, 1e-30])
  for _ in range(400):
    na, nb = rng.integers(0, 25, 2)
    if na + nb == 0:
      continue
    a = np.sort(rng.choice(pool, na))
    b = np.sort(rng.choice(pool, nb))
    merged = np.sort(np.concatenate([a, b]))
    ranks = np.arange(na + nb)
    np.testing.assert_array_equal(topology._select_from_two(a, b, ranks),
                                  merged[ranks])
    values = rng.choice(pool, 5)
    for side in ("left", "right"):
      np.testing.assert_array_equal(
          topology._rank_in_two(a, b, values, side),
          np.searchsorted(merged, values, side=side))


@pytest.mark.filterwarnings("ignore:os.fork")  # the child runs no JAX
def test_split_sort_threads_work_in_a_forked_child(split_sort):
  """A child process gets its own sort threads (a fork copies no threads)."""
  del split_sort
  import multiprocessing  # pylint: disable=import-outside-toplevel
  m = awkward_matrix("activations", 30, seed=1)
  expected = topology.top_summary_host(m, 16)  # starts the parent's threads
  ctx = multiprocessing.get_context("fork")
  with ctx.Pool(1) as pool:
    got = pool.apply_async(topology.top_summary_host, (m, 16)).get(timeout=60)
  np.testing.assert_array_equal(got, expected)


def test_via_host_takes_the_condensed_triangle():
  m = awkward_matrix("activations", 12, seed=2)
  upper = m[np.triu_indices(12, k=1)]
  via = jax.jit(topology.top_summary_via_host, static_argnums=1)
  from_matrix, ok_m = via(m, 16)
  from_upper, ok_u = via(upper, 16)
  assert bool(ok_m) and bool(ok_u)
  np.testing.assert_array_equal(np.asarray(from_upper), exact_summary(m, 16))
  np.testing.assert_array_equal(np.asarray(from_matrix),
                                np.asarray(from_upper))
  with pytest.raises(ValueError, match="complete graph"):
    topology.top_summary_via_host(upper[:-1], 16)
  with pytest.raises(ValueError, match="square"):
    topology.top_summary_via_host(m[:, :5], 16)


def test_split_sort_without_worker_threads_sorts_here(split_sort,
                                                      monkeypatch):
  """When no worker takes the sorts (the interpreter is shutting down its
  thread pools), the calling thread sorts and the summary is the same."""
  del split_sort

  class ShutDown:
    def submit(self, *args):
      raise RuntimeError("cannot schedule new futures after shutdown")

  monkeypatch.setattr(topology, "_sort_threads", ShutDown)
  m = awkward_matrix("activations", 40, seed=4)
  np.testing.assert_array_equal(topology.top_summary_host(m, 33),
                                exact_summary(m, 33))


def test_upper_indices_are_the_upper_triangle_and_refuse_overflow():
  from cgalr_jax.connectome import upper_indices  # pylint: disable=import-outside-toplevel
  for p in (0, 1, 2, 3, 9):
    expected = np.flatnonzero(np.triu(np.ones((p, p), bool), k=1))
    got = upper_indices(p)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, expected)
  with pytest.raises(ValueError, match="max_nodes"):
    upper_indices(46341)  # 46341^2 > 2^31 - 1


@pytest.mark.parametrize("resolution", [1, 7, 512, 1000])
def test_device_quantile_ranks_match_the_int64_formula(resolution):
  # Built from an iota on the device (no constant in the program), split so
  # that int32 holds every term; the reference computes in int64.
  rng = np.random.default_rng(resolution)
  sizes = [0, 1, 2, resolution - 1, resolution, 2 * resolution + 1, 18_145,
           73_153, 33_550_336, 2**31 - 1,
           *rng.integers(1, 2**31 - 1, 20).tolist()]
  for n in sizes:
    got = jax.jit(topology._quantile_ranks_device, static_argnums=(0, 1))(
        n, resolution)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(
        np.asarray(got), topology.quantile_ranks(n, resolution), err_msg=n)


def test_device_quantile_ranks_fall_back_past_int32():
  # 4 K^2 past int32: the (int32) constant instead of the split formula.
  got = topology._quantile_ranks_device(10**6, 23_170)
  np.testing.assert_array_equal(np.asarray(got),
                                topology.quantile_ranks(10**6, 23_170))

"""Birth/death sets of a connectome, their quantile summaries and TOP.

DESIGN.md section 2, "Birth/death sets and TOP" and "Fixed-size summaries".

TOP reads the graph filtration of the complete graph weighted by ``M``. Its
birth set is the multiset of maximum-spanning-tree weights (P - 1 values),
its death set every other edge weight. The optimizer keeps a K-point quantile
summary of each sorted set, ``q_k = x[floor((k + 1/2) n / K)]``; two backends
compute it, both exactly (bit for bit what indexing the fully sorted sets
gives):

* ``host`` (NumPy/SciPy through ``jax.pure_callback``, which receives only
  the upper triangle): on large graphs the spanning tree of the heaviest
  edges, completed by Boruvka rounds when they do not connect every node,
  else SciPy's single linkage; one sort of the edges for the death
  quantiles (NumPy's vectorised sort beat histogram selection on the host).
* ``device`` (pure JAX, stays on the accelerator): Prim's algorithm on
  integer keys; the death quantiles by radix selection (four counting
  passes over the edges) instead of a sort from about 180 nodes on.

The host reads the upper triangle only. The device backend reads ``M`` as
the symmetric matrix :func:`cgalr_jax.connectome` returns (Prim's algorithm
reads rows).

The exact ``top_distance`` is public for analysis and tests. The WD distance
lives in :mod:`cgalr_jax.wd`; its names are re-exported here for code written
before the split.
"""

from __future__ import annotations

import concurrent.futures
import functools
import math
import os
import sys
import threading
import types
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cgalr_jax import _sums
from cgalr_jax.connectome import upper_indices

# ----------------------------------------------------------------------------
# Set sizes and quantile ranks (static, shared by both backends).


def set_sizes(num_nodes: int) -> tuple[int, int]:
  """Sizes of the birth and death sets of a complete graph.

  Args:
    num_nodes: P.

  Returns:
    ``(n_b, n_d)``: ``(P - 1, P (P - 1) / 2 - (P - 1))``, or zeros for P < 2.
  """
  p = int(num_nodes)
  if p < 2:
    return 0, 0
  n_b = p - 1
  return n_b, p * (p - 1) // 2 - n_b


def quantile_ranks(n: int, resolution: int) -> np.ndarray:
  """Ranks of the K-point summary of n sorted values.

  Args:
    n: number of values.
    resolution: K.

  Returns:
    int64 ``[K]``: ``floor((k + 1/2) n / K)``, computed in integers.
  """
  k = np.arange(resolution, dtype=np.int64)
  return ((2 * k + 1) * int(n)) // (2 * resolution)


def _quantile_ranks_device(n: int, resolution: int) -> jax.Array:
  """:func:`quantile_ranks` as int32, computed from an iota where it is used
  (an array constant is a buffer every run of a compiled program sets up,
  even in a branch that does not run). With ``n = 2Kq + r``, ``floor((2k +
  1) n / 2K) = (2k + 1) q + floor((2k + 1) r / 2K)``: exact in int32 for
  ``n < 2^31`` and ``K < 23170``."""
  two_k = 2 * int(resolution)
  if two_k * two_k >= 1 << 31 or int(n) >= 1 << 31:
    return jnp.asarray(quantile_ranks(n, resolution), jnp.int32)
  q, r = divmod(int(n), two_k)
  odd = 2 * jax.lax.iota(jnp.int32, int(resolution)) + 1
  return odd * q + (odd * r) // two_k


def _death_ranks_to_edge_ranks(removed, ranks, xp):
  """Positions in the sorted edge list of the given death-set ranks.

  ``removed`` holds the (ascending, distinct) positions of the birth edges in
  the sorted edge list. The r-th surviving position is ``r`` plus the number
  of removed positions preceded by at most ``r`` survivors.
  """
  survivors_before = removed - xp.arange(removed.shape[0])
  return ranks + xp.searchsorted(survivors_before, ranks, side="right")


def _birth_positions(edges_sorted, births_sorted, xp, first_in_edges=None):
  """Distinct positions of the birth multiset inside the sorted edge list.

  Equal values are interchangeable, so the j-th copy of a value among the
  births takes the j-th slot of that value among the edges.
  ``first_in_edges`` (each birth's left ``searchsorted`` position among
  the edges) may be given when the edges are not one sorted array.
  """
  if first_in_edges is None:
    first_in_edges = xp.searchsorted(edges_sorted, births_sorted, side="left")
  first_in_births = xp.searchsorted(births_sorted, births_sorted, side="left")
  return first_in_edges + (xp.arange(births_sorted.shape[0]) - first_in_births)


# ----------------------------------------------------------------------------
# Exact birth/death sets on the host (the plain reference path).


def host_matrix(m) -> np.ndarray:
  """A connectome as a float32 NumPy ``[P, P]`` matrix (no copy if it is one).

  Args:
    m: array-like ``[P, P]``.

  Returns:
    float32 NumPy array.

  Raises:
    ValueError: if ``m`` is not square.
  """
  m = np.asarray(m, dtype=np.float32)
  if m.ndim != 2 or m.shape[0] != m.shape[1]:
    raise ValueError(f"connectome must be a square [P, P] matrix, got {m.shape}.")
  return m


@functools.lru_cache(maxsize=8)
def _upper_mask(num_nodes: int) -> np.ndarray:
  """Read-only boolean mask of the strict upper triangle (cached per P)."""
  # Boolean-mask gathering beats np.triu_indices fancy indexing, which also
  # rebuilds two index arrays on every call.
  mask = np.triu(np.ones((num_nodes, num_nodes), bool), k=1)
  mask.flags.writeable = False
  return mask


def _upper_edges(m: np.ndarray) -> np.ndarray:
  """Edge weights ``M[i, j]``, ``i < j``, in row-major (condensed) order."""
  return m[_upper_mask(m.shape[0])]


def max_spanning_tree_weights(m) -> np.ndarray:
  """Weights of a maximum spanning tree of the complete graph ``M`` (host).

  Reads the upper triangle only. A maximum spanning tree of ``M`` is a
  minimum spanning tree of ``-M``, which is what single-linkage clustering
  computes; its merge heights are the tree's (negated) edge weights, so every
  weight comes back bit for bit. (``1 - M`` would lose weights below ~1e-8 to
  float64 rounding.)

  Args:
    m: ``[P, P]`` connectome.

  Returns:
    float32 array of ``P - 1`` weights, sorted ascending.
  """
  m = host_matrix(m)
  if m.shape[0] < 2:
    return np.zeros((0,), np.float32)
  return _tree_weights_from_edges(_upper_edges(m))


def _tree_weights_from_edges(edges: np.ndarray) -> np.ndarray:
  """Sorted maximum-spanning-tree weights from the condensed edge weights."""
  from scipy.cluster import hierarchy  # pylint: disable=import-outside-toplevel

  heights = hierarchy.linkage(np.negative(edges, dtype=np.float64),
                              method="single")[:, 2]
  return np.sort(np.negative(heights).astype(np.float32))


def birth_death_sets(m) -> tuple[np.ndarray, np.ndarray]:
  """Exact sorted birth set ``B(M)`` and death set ``D(M)`` (host).

  Args:
    m: ``[P, P]`` connectome (the upper triangle is read).

  Returns:
    ``(births, deaths)``: float32 arrays of ``n_b`` and ``n_d`` values
    (:func:`set_sizes`), each sorted ascending.
  """
  m = host_matrix(m)
  if m.shape[0] < 2:
    return np.zeros((0,), np.float32), np.zeros((0,), np.float32)
  edges = _upper_edges(m)
  births = _tree_weights_from_edges(edges)
  return births, _multiset_difference(np.sort(edges), births)


def _multiset_difference(values_sorted: np.ndarray,
                         removed_sorted: np.ndarray) -> np.ndarray:
  """Sorted ``values`` with one copy of each ``removed`` value taken out."""
  keep = np.ones(values_sorted.shape[0], dtype=bool)
  keep[_birth_positions(values_sorted, removed_sorted, np)] = False
  return values_sorted[keep]


def top_distance(m1, m2) -> float:
  """Exact TOP distance between two connectomes with the same node count.

  ``sum_i (b_i - b'_i)^2 + sum_j (d_j - d'_j)^2`` over the sorted birth and
  death sets (Songdechakraiwut et al., ICLR 2022).

  Args:
    m1: ``[P, P]`` connectome.
    m2: ``[P, P]`` connectome.

  Returns:
    The distance as a Python float (accumulated in float64).

  Example:
    >>> import numpy as np
    >>> from cgalr_jax import top_distance
    >>> m = np.array([[0, .9, .1], [.9, 0, .5], [.1, .5, 0]], np.float32)
    >>> round(top_distance(m, m), 6)
    0.0
  """
  m1, m2 = host_matrix(m1), host_matrix(m2)
  if m1.shape != m2.shape:
    raise ValueError(
        f"top_distance needs equal node counts, got {m1.shape} and {m2.shape}.")
  b1, d1 = birth_death_sets(m1)
  b2, d2 = birth_death_sets(m2)
  return float(np.sum((b1.astype(np.float64) - b2) ** 2)
               + np.sum((d1.astype(np.float64) - d2) ** 2))


# ----------------------------------------------------------------------------
# Fast exact host summary.

# The spanning tree starts from the heaviest ~8 P edges. Enough that they
# usually connect every node of a real connectome, few enough that SciPy's
# sparse spanning tree on them costs little next to the O(P^2) passes.
_HEAVY_EDGES_PER_NODE = 8
# Below this many edges (P < 725) SciPy's dense single-linkage tree is as
# fast: the sparse route has a fixed cost of about a millisecond.
_SPARSE_TREE_MIN_EDGES = 1 << 18
# Threshold sample size: the threshold only steers speed, never the result.
_THRESHOLD_SAMPLE = 1 << 14
# From this many edges (P >= 725) the host sorts the two halves of the edge
# list on two threads (NumPy's sort releases the GIL) while the spanning
# tree is computed, and reads the quantiles off the two sorted halves.
_SPLIT_SORT_MIN_EDGES = 1 << 18
_SORT_THREADS: dict[int, concurrent.futures.ThreadPoolExecutor] = {}
_SORT_THREADS_LOCK = threading.Lock()


def _forget_sort_threads() -> None:
  """In a forked child: no threads came along, and the lock may be held."""
  global _SORT_THREADS_LOCK  # pylint: disable=global-statement
  _SORT_THREADS_LOCK = threading.Lock()
  _SORT_THREADS.clear()


if hasattr(os, "register_at_fork"):
  os.register_at_fork(after_in_child=_forget_sort_threads)


def _sort_threads() -> concurrent.futures.ThreadPoolExecutor:
  """Two worker threads for the host's sorts, started on first use in each
  process (a forked child does not inherit its parent's threads)."""
  with _SORT_THREADS_LOCK:
    pid = os.getpid()
    if pid not in _SORT_THREADS:
      _SORT_THREADS.clear()
      _SORT_THREADS[pid] = concurrent.futures.ThreadPoolExecutor(
          max_workers=2, thread_name_prefix="cgalr_jax-sort")
    return _SORT_THREADS[pid]


def _sorted_halves_later(edges: np.ndarray):
  """Starts sorting the two halves of ``edges``; returns a function that
  waits for them. Sorts on this thread when no worker can take them (the
  interpreter is shutting down its thread pools)."""
  half = edges.shape[0] // 2
  parts = (edges[:half], edges[half:])
  try:
    pool = _sort_threads()
    futures = [pool.submit(np.sort, part) for part in parts]
  except RuntimeError:
    return lambda: tuple(np.sort(part) for part in parts)
  return lambda: tuple(f.result() for f in futures)


def _rank_in_two(a: np.ndarray, b: np.ndarray, values: np.ndarray,
                 side: str) -> np.ndarray:
  """``searchsorted`` of ``values`` in the merge of sorted ``a`` and ``b``."""
  return (np.searchsorted(a, values, side=side)
          + np.searchsorted(b, values, side=side))


def _select_from_two(a: np.ndarray, b: np.ndarray,
                     ranks: np.ndarray) -> np.ndarray:
  """``merge(a, b)[ranks]`` for sorted ``a`` and ``b``, without merging.

  For each rank r, bisects the number i of the r + 1 smallest values that
  come from ``a``: the smallest i with ``a[i] >= b[r - i]`` (or i at its
  upper bound); the value is then the larger of ``a[i - 1]`` and
  ``b[r - i]``. Equal values are interchangeable, as in a sort: where
  ``-0.0`` meets ``+0.0`` either may come back (a connectome holds no
  ``-0.0``).
  """
  ranks = np.asarray(ranks, np.int64)
  na, nb = a.shape[0], b.shape[0]
  lo = np.maximum(ranks + 1 - nb, 0)
  hi = np.minimum(ranks + 1, na)
  while True:
    open_ = lo < hi
    if not open_.any():
      break
    mid = (lo + hi) // 2  # < hi <= min(r + 1, na); r - mid in [0, nb)
    more = open_ & (a[np.minimum(mid, na - 1)]
                    < b[np.clip(ranks - mid, 0, nb - 1)])
    lo = np.where(more, mid + 1, lo)
    hi = np.where(open_ & ~more, mid, hi)
  from_b = ranks + 1 - lo  # how many come from b
  top_a = a[np.maximum(lo - 1, 0)] if na else np.zeros_like(ranks, a.dtype)
  top_b = b[np.maximum(from_b - 1, 0)] if nb else np.zeros_like(ranks, b.dtype)
  return np.where(lo == 0, top_b,
                  np.where(from_b == 0, top_a, np.maximum(top_a, top_b)))


@functools.lru_cache(maxsize=8)
def _row_starts(num_nodes: int) -> np.ndarray:
  """Condensed index of edge ``(i, i + 1)`` for every row i (cached per P)."""
  i = np.arange(num_nodes, dtype=np.int64)
  starts = i * num_nodes - i * (i + 1) // 2
  starts.flags.writeable = False
  return starts


def _condensed_pairs(positions: np.ndarray,
                     num_nodes: int) -> tuple[np.ndarray, np.ndarray]:
  """``(i, j)``, ``i < j``, of condensed (row-major upper) edge positions."""
  starts = _row_starts(num_nodes)
  rows = np.searchsorted(starts, positions, side="right") - 1
  return rows, positions - starts[rows] + rows + 1


def _heavy_threshold(edges: np.ndarray, count: int) -> np.float32:
  """A weight with roughly ``count`` edges at or above it (from a sample)."""
  stride = max(1, edges.shape[0] // _THRESHOLD_SAMPLE)
  sample = edges[::stride]
  keep = min(sample.shape[0], max(1, -(-sample.shape[0] * count
                                      // edges.shape[0])))
  return np.partition(sample, sample.shape[0] - keep)[sample.shape[0] - keep]


def _condensed_rows(edges: np.ndarray, num_nodes: int,
                    nodes: np.ndarray) -> np.ndarray:
  """Rows ``M[nodes]`` of the symmetric matrix with these condensed edges.

  The diagonal entries come back as whatever edge the index lands on (the
  one before row i's first); the caller masks them.
  """
  starts = _row_starts(num_nodes)
  i = nodes[:, None]
  j = np.arange(num_nodes)[None, :]
  lo, hi = np.minimum(i, j), np.maximum(i, j)
  return edges[starts[lo] + hi - lo - 1]


def _nodes_of_condensed(num_edges: int) -> int:
  """P such that ``P (P - 1) / 2 == num_edges``."""
  p = (1 + math.isqrt(1 + 8 * num_edges)) // 2
  if p * (p - 1) // 2 != num_edges:
    raise ValueError(
        f"{num_edges} condensed edge weights are no complete graph's.")
  return max(p, 1)


def _tree_weights_host(edges: np.ndarray, num_nodes: int) -> np.ndarray:
  """Maximum-spanning-tree weights from condensed edge weights (unsorted).

  Exact, by two facts about the unique maximum spanning tree ``T`` under the
  strict order "heavier first, then lower edge index" (edge index = condensed
  position, i.e. ``(i, j)`` lexicographic):

  1. The spanning forest of the edges at or above any threshold, taken in
     that order, is part of ``T`` (Kruskal takes those edges first).
  2. Every component's best outgoing edge in that order is in ``T`` (cut
     property), so Boruvka rounds complete the forest to ``T``.

  The weight multiset of ``T`` is that of every maximum spanning tree.

  Args:
    edges: float32 condensed upper-triangle weights of a P-node graph,
      finite.
    num_nodes: P >= 2.

  Returns:
    float32 ``[P - 1]`` tree weights in no particular order.
  """
  from scipy import sparse  # pylint: disable=import-outside-toplevel
  from scipy.sparse import csgraph  # pylint: disable=import-outside-toplevel

  p = num_nodes
  if edges.shape[0] < _SPARSE_TREE_MIN_EDGES:
    return _tree_weights_from_edges(edges)
  target = _HEAVY_EDGES_PER_NODE * p
  heavy = np.flatnonzero(edges >= _heavy_threshold(edges, target))
  if heavy.shape[0] > 4 * target:
    # Ties at the threshold (quantised or mostly-dead connectomes): the dense
    # tree has a fixed O(P^2) cost, the sparse one would not.
    return _tree_weights_from_edges(edges)
  weights = edges[heavy]
  # Kruskal's order, heavier first and ties by edge index, from one int64
  # sort of (descending-weight key, index into ``heavy``); ``heavy`` is
  # ascending, so the index orders ties like the edge index does.
  bits = np.negative(weights).view(np.int32)
  keys = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).astype(np.int64) << 32
  keys |= np.arange(heavy.shape[0], dtype=np.int64)
  keys.sort()
  kruskal = (keys & 0xFFFFFFFF).astype(np.intp)  # heavy indices in order
  rank = np.empty(heavy.shape[0], np.float64)
  rank[kruskal] = np.arange(1, heavy.shape[0] + 1)
  # SciPy's spanning tree then sees distinct weights (the ranks), so its
  # forest is exactly the one of fact 1 whatever algorithm it runs.
  # ``heavy`` is row-major, so the CSR arrays come without a COO sort.
  rows, cols = _condensed_pairs(heavy, p)
  graph = sparse.csr_matrix(
      (rank, cols, np.searchsorted(rows, np.arange(p + 1))), shape=(p, p))
  forest = csgraph.minimum_spanning_tree(graph)
  chosen = [weights[kruskal[forest.data.astype(np.intp) - 1]]]
  if forest.nnz < p - 1:
    num_comp, labels = csgraph.connected_components(forest, directed=False)
    chosen.append(_boruvka_completion(edges, p, labels, num_comp))
  return np.concatenate(chosen).astype(np.float32, copy=False)


def _boruvka_completion(edges: np.ndarray, num_nodes: int, labels: np.ndarray,
                        num_comp: int) -> np.ndarray:
  """Weights of the tree edges that join the components of a partial tree.

  Each round, every component except the largest takes its best outgoing
  edge (heavier first, then lower ``(i, j)``); every component merges at
  least once per round, and the rows read per round are those outside the
  largest component.

  Args:
    edges: condensed edge weights.
    num_nodes: P.
    labels: component of every node in a forest that is part of the tree.
    num_comp: number of components (> 1).

  Returns:
    float32 weights of the ``num_comp - 1`` joining edges.
  """
  from scipy import sparse  # pylint: disable=import-outside-toplevel
  from scipy.sparse import csgraph  # pylint: disable=import-outside-toplevel

  p = num_nodes
  joined = []
  while num_comp > 1:
    largest = np.argmax(np.bincount(labels, minlength=num_comp))
    nodes = np.flatnonzero(labels != largest)
    comp = labels[nodes]
    rows = _condensed_rows(edges, p, nodes)
    rows[comp[:, None] == labels[None, :]] = -np.inf  # own component
    # Row argmax takes the first maximum, the lowest j: for a fixed i that
    # is the lowest (min(i, j), max(i, j)), the order of fact 2.
    other = np.argmax(rows, axis=1)
    weight = rows[np.arange(nodes.shape[0]), other]
    edge = np.minimum(nodes, other) * p + np.maximum(nodes, other)
    order = np.lexsort((edge, np.negative(weight), comp))
    first = order[np.r_[True, comp[order][1:] != comp[order][:-1]]]
    # Two components may pick the same edge; it joins them once.
    _, once = np.unique(edge[first], return_index=True)
    pick = first[once]
    joined.append(weight[pick])
    links = sparse.csr_matrix(
        (np.ones(pick.shape[0]), (comp[pick], labels[other[pick]])),
        shape=(num_comp, num_comp))
    before = num_comp
    num_comp, merged = csgraph.connected_components(links, directed=False)
    if num_comp == before:
      # Only non-finite weights can stall a round (a row of -inf picks an
      # own-component column); stop rather than loop.
      raise ValueError("connectome has non-finite edge weights.")
    labels = merged[labels]
  return np.concatenate(joined)


def top_summary_host(m, resolution: int) -> np.ndarray:
  """K-point quantile summary of the birth and death sets (host, exact).

  Reads the upper triangle only.

  Args:
    m: ``[P, P]`` connectome, or its condensed upper triangle
      (``M[i, j]``, ``i < j``, row-major; what :func:`top_summary_via_host`
      sends, half the bytes).
    resolution: K.

  Returns:
    float32 ``[2, K]``: row 0 the birth quantiles, row 1 the death
    quantiles (zeros where a set is empty).

  Raises:
    ValueError: if ``m`` is neither form or has a non-finite edge weight.
  """
  x = np.asarray(m, dtype=np.float32)
  owned = x.ndim != 1  # a fresh gather may be sorted in place
  if owned:
    x = host_matrix(x)
    p = x.shape[0]
    edges = _upper_edges(x)
  else:
    p, edges = _nodes_of_condensed(x.shape[0]), x
  n_b, n_d = set_sizes(p)
  out = np.zeros((2, resolution), np.float32)
  if n_b == 0:
    return out
  if edges.shape[0] >= _SPLIT_SORT_MIN_EDGES:
    return _top_summary_split(edges, p, resolution, out)
  if not (np.isfinite(edges.min()) and np.isfinite(edges.max())):
    raise ValueError("connectome has non-finite edge weights.")
  births = np.sort(_tree_weights_host(edges, p))
  out[0] = births[quantile_ranks(n_b, resolution)]
  if n_d:
    if owned:
      edges.sort()
    else:
      edges = np.sort(edges)
    removed = _birth_positions(edges, births, np)
    ranks = _death_ranks_to_edge_ranks(
        removed, quantile_ranks(n_d, resolution), np)
    out[1] = edges[ranks]
  return out


def _top_summary_split(edges: np.ndarray, p: int, resolution: int,
                       out: np.ndarray) -> np.ndarray:
  """:func:`top_summary_host` for large graphs: the two halves of the edge
  list sorted on two threads while this one computes the spanning tree;
  the quantiles are read off the sorted halves (:func:`_select_from_two`).
  The checks for non-finite weights read the sorted halves' ends (a sort
  puts NaN last)."""
  n_b, n_d = set_sizes(p)
  halves = _sorted_halves_later(edges)
  tree, tree_error = None, None
  try:
    # On non-finite input this is wasted work: the check needs the sorts.
    tree = _tree_weights_host(edges, p)
  except ValueError as err:  # non-finite weights can stall the tree
    tree_error = err
  a, b = halves()
  if not all(np.isfinite(x[[0, -1]]).all() for x in (a, b) if x.shape[0]):
    raise ValueError("connectome has non-finite edge weights.")
  if tree_error is not None:
    raise tree_error
  births = np.sort(tree)
  out[0] = births[quantile_ranks(n_b, resolution)]
  if n_d:
    removed = _birth_positions(None, births, np,
                               _rank_in_two(a, b, births, "left"))
    ranks = _death_ranks_to_edge_ranks(
        removed, quantile_ranks(n_d, resolution), np)
    out[1] = _select_from_two(a, b, ranks)
  return out


# ----------------------------------------------------------------------------
# Device backend.

# Below this many edges (P <= 181) a sort is faster than the radix
# selection's fixed cost (tables and prefix sums) on XLA:CPU.
_RADIX_MIN_EDGES = 1 << 14
# Radix digits, most significant first; they must add up to 32 bits. The
# later passes build a (quantiles x 2^bits) table each, so narrow digits
# there: (14, 6, 6, 6) beat (16, 8, 8) by about 0.3 ms at P = 192 and 384
# and tied it at 1024 and 2048 (XLA:CPU, K = 512).
_RADIX_DIGITS = (14, 6, 6, 6)
_INT32_MIN = np.int32(np.iinfo(np.int32).min)


def _float_keys(x: jax.Array) -> jax.Array:
  """int32 keys whose integer order is the float order (``-0.0 < +0.0``).

  Flipping the magnitude bits of negative floats does it, and the map is its
  own inverse (:func:`_keys_to_floats`).
  """
  # Integer compares, reductions and sorts are also cheaper than float ones
  # on XLA:CPU, which must honour NaN semantics.
  bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
  return bits ^ (jax.lax.shift_right_arithmetic(bits, jnp.int32(31))
                 & jnp.int32(0x7FFFFFFF))


def _keys_to_floats(keys: jax.Array) -> jax.Array:
  flip = jax.lax.shift_right_arithmetic(keys, jnp.int32(31)) & jnp.int32(
      0x7FFFFFFF)
  return jax.lax.bitcast_convert_type(keys ^ flip, jnp.float32)


def _tree_keys_device(keys: jax.Array) -> jax.Array:
  """Prim's algorithm on the ``[P, P]`` keys of ``M``: the tree's weight keys.

  O(P^2) work in P - 1 vector steps; on integer keys the per-step argmax is
  a plain integer reduction.

  Args:
    keys: int32 ``[P, P]`` keys (:func:`_float_keys`) of a symmetric
      connectome, P >= 2.

  Returns:
    int32 ``[P - 1]`` keys of the tree's weights, in the order Prim adds
    them.
  """
  p = keys.shape[0]
  nodes = jnp.arange(p)
  in_tree = nodes == 0
  best = jnp.where(in_tree, _INT32_MIN, keys[0])

  def step(i, carry):
    in_tree, best, births = carry
    j = jnp.argmax(best)
    # Slice updates and masks, not scatters (see cgalr_jax._sums).
    births = jax.lax.dynamic_update_slice(births, best[j][None], (i,))
    in_tree = in_tree | (nodes == j)
    best = jnp.where(in_tree, _INT32_MIN, jnp.maximum(best, keys[j]))
    return in_tree, best, births

  _, _, births = jax.lax.fori_loop(
      0, p - 1, step, (in_tree, best, jnp.zeros((p - 1,), jnp.int32)))
  return births


def max_spanning_tree_weights_device(m: jax.Array) -> jax.Array:
  """Maximum-spanning-tree weights with Prim's algorithm in JAX (unsorted).

  O(P^2) work in P - 1 vector steps; stays on the device under ``jit``.

  Args:
    m: ``[P, P]`` symmetric connectome, P >= 2.

  Returns:
    float32 ``[P - 1]`` tree weights in the order Prim adds them.
  """
  return _keys_to_floats(_tree_keys_device(_float_keys(jnp.asarray(m))))


def _radix_digit(keys: jax.Array, shift: int, bits: int) -> jax.Array:
  """Digit of the unsigned key order (sign bit flipped), as int32."""
  unsigned = jax.lax.bitcast_convert_type(keys ^ _INT32_MIN, jnp.uint32)
  return ((unsigned >> shift) & ((1 << bits) - 1)).astype(jnp.int32)


def _count(index: jax.Array, removed_index: jax.Array, size: int) -> jax.Array:
  """Histogram of ``index`` minus that of ``removed_index``.

  Indices past ``size`` are dropped (the rows no rank needs).
  """
  counts = jnp.zeros((size,), jnp.int32).at[index].add(1, mode="drop")
  return counts.at[removed_index].add(-1, mode="drop")


def _slot_ids(bucket: jax.Array) -> jax.Array:
  """Dense ids 0, 1, ... of the distinct values of a non-decreasing array."""
  change = (bucket[1:] != bucket[:-1]).astype(jnp.int32)
  return _sums.count_cumsum(
      jnp.concatenate([jnp.zeros((1,), jnp.int32), change]), bucket.shape[0])


def _select_keys_device(keys: jax.Array, removed: jax.Array,
                        ranks: np.ndarray) -> jax.Array:
  """Order statistics of a multiset difference, by radix selection (exact).

  Finds, for every rank r, the key of rank r of ``keys`` minus the multiset
  ``removed`` (a sub-multiset of ``keys``), without sorting: one counting
  pass per digit. The first pass counts the leading digit of every key; the
  later passes count the next digit only inside the buckets the ranks fell
  in, one row per distinct bucket (at most K), so the state stays
  ``K x 2^bits`` whatever the data. Ties need no care: a bucket of the last
  digit holds one key value.

  Args:
    keys: int32 keys (:func:`_float_keys`) ``[n]``.
    removed: int32 keys ``[m]`` to take out, one copy each.
    ranks: ascending ranks ``[K]`` (any sequence or int array), each
      below ``n - m``.

  Returns:
    int32 keys ``[K]``.
  """
  rank = jnp.asarray(ranks, jnp.int32)
  num = rank.shape[0]
  shift = 32 - _RADIX_DIGITS[0]
  digit, removed_digit = (_radix_digit(k, shift, _RADIX_DIGITS[0])
                          for k in (keys, removed))
  counts = _count(digit, removed_digit, 1 << _RADIX_DIGITS[0])
  cumulative = _sums.count_cumsum(counts, keys.shape[0])
  bucket = jnp.searchsorted(cumulative, rank, side="right",
                            method="scan_unrolled").astype(jnp.int32)
  rank = rank - (cumulative[bucket] - counts[bucket])
  prefix = bucket  # the key's leading digits found so far
  slot = _slot_ids(bucket)
  table = jnp.full((1 << _RADIX_DIGITS[0],), -1, jnp.int32).at[bucket].set(
      slot)
  key_slot = table[digit]
  removed_slot = table[removed_digit]
  for level, bits in enumerate(_RADIX_DIGITS[1:], start=1):
    shift -= bits
    width = 1 << bits
    digit, removed_digit = (_radix_digit(k, shift, bits)
                            for k in (keys, removed))
    outside = num * width  # index past the table: dropped by the count
    counts = _count(jnp.where(key_slot >= 0, key_slot * width + digit, outside),
                    jnp.where(removed_slot >= 0,
                              removed_slot * width + removed_digit, outside),
                    num * width).reshape(num, width)
    cumulative = _sums.count_cumsum(counts[slot], keys.shape[0], axis=1)
    # A row count as a product (exact: at most 2^bits ones; see _sums).
    bucket = _sums.matvec(cumulative <= rank[:, None],
                          jnp.ones((width,))).astype(jnp.int32)
    below = jnp.take_along_axis(
        cumulative, jnp.maximum(bucket - 1, 0)[:, None], axis=1)[:, 0]
    rank = rank - jnp.where(bucket > 0, below, 0)
    prefix = prefix * width + bucket
    if level < len(_RADIX_DIGITS) - 1:
      key = slot * width + bucket
      next_slot = _slot_ids(key)
      table = jnp.full((num * width,), -1, jnp.int32).at[key].set(next_slot)
      key_slot = jnp.where(key_slot >= 0,
                           table[jnp.maximum(key_slot, 0) * width + digit], -1)
      removed_slot = jnp.where(
          removed_slot >= 0,
          table[jnp.maximum(removed_slot, 0) * width + removed_digit], -1)
      slot = next_slot
  unsigned = prefix.astype(jnp.uint32)
  return jax.lax.bitcast_convert_type(unsigned, jnp.int32) ^ _INT32_MIN


def top_summary_device(m: jax.Array, resolution: int) -> jax.Array:
  """K-point quantile summary of the birth and death sets (pure JAX, exact).

  Args:
    m: ``[P, P]`` symmetric connectome.
    resolution: K.

  Returns:
    float32 ``[2, K]``: row 0 the birth quantiles, row 1 the death
    quantiles (zeros where a set is empty). Bit-identical to
    :func:`top_summary_host` when ``m`` holds no -0.0 (a connectome's
    zeros are +0.0); where it holds both zeros, the two may return
    different ones, equal as numbers.
  """
  return _top_summary_device(m, resolution, radix=None)


def _top_summary_device(m, resolution: int, radix: bool | None) -> jax.Array:
  """:func:`top_summary_device`; ``radix`` None picks the selection by size."""
  m = jnp.asarray(m, jnp.float32)
  p = m.shape[0]
  n_b, n_d = set_sizes(p)
  if n_b == 0:
    return jnp.zeros((2, resolution), jnp.float32)
  # One key matrix for both steps: Prim's loop needs it in memory anyway,
  # and gathering the edges from it keeps XLA from fusing the connectome's
  # last elementwise step (with its transposed reads) into the gather a
  # second time.
  keys = _float_keys(m)
  births = jax.lax.sort(_tree_keys_device(keys))
  birth_q = _keys_to_floats(births[_quantile_ranks_device(n_b, resolution)])
  if n_d == 0:
    return jnp.stack([birth_q, jnp.zeros_like(birth_q)])
  flat = upper_indices(p)
  edges = keys.reshape(-1)[flat]
  death_ranks = _quantile_ranks_device(n_d, resolution)
  if radix is None:
    radix = edges.shape[0] >= _RADIX_MIN_EDGES
  if radix:
    death_q = _select_keys_device(edges, births, death_ranks)
  else:
    edges = jax.lax.sort(edges)
    removed = _birth_positions(edges, births, jnp)
    death_q = edges[_death_ranks_to_edge_ranks(removed, death_ranks, jnp)]
  return jnp.stack([birth_q, _keys_to_floats(death_q)])


def top_summary_distance(ref: jax.Array, cur: jax.Array,
                         num_nodes: int, xp: Any = jnp) -> jax.Array:
  """``TOP_K`` between two summaries of P-node connectomes.

  Args:
    ref: ``[..., 2, K]`` summary.
    cur: ``[..., 2, K]`` summary.
    num_nodes: P (static).

  Returns:
    ``(n_b / K) sum (qb - qb')^2 + (n_d / K) sum (qd - qd')^2``.
  """
  n_b, n_d = set_sizes(num_nodes)
  k = ref.shape[-1]
  if xp is jnp:  # a product, not a reduction: see cgalr_jax._sums
    sq = _sums.matvec(jnp.square(ref - cur), jnp.ones((k,), jnp.float32))
  else:
    sq = xp.sum(xp.square(ref - cur), axis=-1)
  return (n_b / k) * sq[..., 0] + (n_d / k) * sq[..., 1]


# ----------------------------------------------------------------------------
# Leaving jit for the host.


def host_callback(fn, result_shape, *args):
  """``jax.pure_callback`` that turns any host exception into ``ok=False``.

  Args:
    fn: host function of NumPy arrays returning a tuple matching
      ``result_shape`` minus the trailing flag.
    result_shape: tuple of ``jax.ShapeDtypeStruct``, the last one a scalar
      bool (the flag).
    *args: arrays passed to ``fn``.

  Returns:
    ``fn``'s outputs followed by ``ok``; zeros and False when ``fn`` raised
    or returned a non-finite float.
  """

  def guarded(*host_args):
    try:
      out = fn(*(np.asarray(a) for a in host_args))
      out = tuple(np.asarray(o, s.dtype).reshape(s.shape)
                  for o, s in zip(out, result_shape[:-1]))
      finite = all(np.all(np.isfinite(o)) for o in out
                   if np.issubdtype(o.dtype, np.floating))
      return out + (np.asarray(finite),)
    except Exception:  # pylint: disable=broad-except
      # A failed persistence step is a skipped measurement (DESIGN.md 2).
      return tuple(np.zeros(s.shape, s.dtype) for s in result_shape[:-1]) + (
          np.asarray(False),)

  return jax.pure_callback(guarded, result_shape, *args,
                           vmap_method="sequential")


def top_summary_via_host(m: jax.Array, resolution: int):
  """Host TOP summary from inside ``jit``.

  Only the upper triangle crosses to the host (half of ``M``): pass it
  condensed (``M[i, j]``, ``i < j``, row-major, as
  :func:`cgalr_jax.connectome.condensed_from_stats` computes it without
  forming ``M``), or pass ``M`` and it is gathered on the device.

  Args:
    m: ``[P, P]`` connectome or its ``[P (P - 1) / 2]`` upper triangle
      (traced).
    resolution: K.

  Returns:
    ``(summary, ok)``: the ``[2, K]`` summary of :func:`top_summary_host`
    and whether the host step succeeded (zeros when not).
  """
  m = jnp.asarray(m, jnp.float32)
  if m.ndim == 1:
    _nodes_of_condensed(m.shape[0])  # a complete graph's, or ValueError
    edges = m
  elif m.ndim == 2 and m.shape[0] == m.shape[1]:
    edges = condensed(m)
  else:
    raise ValueError(
        "connectome must be a square [P, P] matrix or its condensed upper "
        f"triangle, got {m.shape}.")
  shape = (jax.ShapeDtypeStruct((2, resolution), jnp.float32),
           jax.ShapeDtypeStruct((), jnp.bool_))
  # ``top_summary_host`` is looked up at call time, so tests can count or
  # fail host calls by patching it.
  summary, ok = host_callback(
      lambda x: (top_summary_host(x, resolution),), shape, edges)
  return summary, ok


def condensed(m: jax.Array) -> jax.Array:
  """The upper triangle of a traced ``[P, P]`` matrix, row-major (``i < j``):
  what a host summary reads, half the bytes of ``M``."""
  return m.reshape(-1)[upper_indices(m.shape[0])]


# ----------------------------------------------------------------------------
# WD names, re-exported from cgalr_jax.wd for code written before the split.
# They are properties of this module's class: read on use (wd imports this
# module, so it cannot be imported here first), and setting one here sets it
# in wd, so code and tests that patch the old location still reach the WD
# pipeline.

_WD_NAMES = ("persistence_diagrams", "diagram_distance", "wd_distance",
             "wd_summary_host", "wd_measure_via_host")


def _wd_property(name: str) -> property:

  def get(_):
    from cgalr_jax import wd  # pylint: disable=import-outside-toplevel
    return getattr(wd, name)

  def put(_, value):
    from cgalr_jax import wd  # pylint: disable=import-outside-toplevel
    setattr(wd, name, value)

  return property(get, put, doc=f"``cgalr_jax.wd.{name}`` (re-exported).")


sys.modules[__name__].__class__ = type(
    "TopologyModule", (types.ModuleType,),
    {name: _wd_property(name) for name in _WD_NAMES})

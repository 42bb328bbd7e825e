"""Persistent-homology summaries of a connectome and the distances between them.

DESIGN.md section 2, "Birth/death sets and TOP", "Fixed-size summaries" and
"WD".

* TOP: the graph filtration of the complete graph weighted by ``M``. Its
  birth set is the multiset of maximum-spanning-tree weights (P - 1 values),
  its death set every other edge weight. The optimizer keeps a K-point
  quantile summary of each sorted set; two backends compute it: ``device``
  (pure JAX, stays on the accelerator) and ``host`` (NumPy/SciPy through
  ``jax.pure_callback``).
* WD: Vietoris-Rips persistence of ``D = sqrt(1 - M)`` with ripser (H0 without
  its infinite bar, and H1), compared with the 1-Wasserstein distance of
  persistence diagrams (Euclidean ground metric, diagonal matching). Host only.

Exact ``top_distance`` and ``wd_distance`` are public for analysis and tests.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

# ----------------------------------------------------------------------------
# Set sizes and quantile ranks (static, shared by both backends).


def set_sizes(num_nodes: int) -> tuple[int, int]:
  """``(n_b, n_d)``: sizes of the birth and death sets of a P-node graph."""
  p = int(num_nodes)
  if p < 2:
    return 0, 0
  n_b = p - 1
  return n_b, p * (p - 1) // 2 - n_b


def quantile_ranks(n: int, resolution: int) -> np.ndarray:
  """Ranks ``floor((k + 1/2) n / K)`` of the K-point summary of n sorted values."""
  k = np.arange(resolution, dtype=np.int64)
  return ((2 * k + 1) * int(n)) // (2 * resolution)


def _death_ranks_to_edge_ranks(removed: np.ndarray | jax.Array, ranks, xp):
  """Positions in the sorted edge list of the given death-set ranks.

  ``removed`` holds the (ascending, distinct) positions of the birth edges in
  the sorted edge list. The r-th surviving position is ``r`` plus the number
  of removed positions preceded by at most ``r`` survivors.
  """
  survivors_before = removed - xp.arange(removed.shape[0])
  return ranks + xp.searchsorted(survivors_before, ranks, side="right")


def _birth_positions(edges_sorted, births_sorted, xp):
  """Distinct positions of the birth multiset inside the sorted edge list.

  Equal values are interchangeable, so the j-th copy of a value among the
  births takes the j-th slot of that value among the edges.
  """
  first_in_edges = xp.searchsorted(edges_sorted, births_sorted, side="left")
  first_in_births = xp.searchsorted(births_sorted, births_sorted, side="left")
  return first_in_edges + (xp.arange(births_sorted.shape[0]) - first_in_births)


# ----------------------------------------------------------------------------
# Exact birth/death sets on the host.


def _as_host_matrix(m) -> np.ndarray:
  m = np.asarray(m, dtype=np.float32)
  if m.ndim != 2 or m.shape[0] != m.shape[1]:
    raise ValueError(f"connectome must be a square [P, P] matrix, got {m.shape}.")
  return m


@functools.lru_cache(maxsize=8)
def _upper_mask(num_nodes: int) -> np.ndarray:
  """Read-only boolean mask of the strict upper triangle (cached per P).

  Boolean-mask gathering is several times faster than ``np.triu_indices``
  fancy indexing, which also rebuilds two index arrays on every call.
  """
  mask = np.triu(np.ones((num_nodes, num_nodes), bool), k=1)
  mask.flags.writeable = False
  return mask


def _upper_edges(m: np.ndarray) -> np.ndarray:
  """Edge weights ``M[i, j]``, ``i < j``, in row-major (condensed) order."""
  return m[_upper_mask(m.shape[0])]


def max_spanning_tree_weights(m) -> np.ndarray:
  """Weights of a maximum spanning tree of the complete graph ``M`` (host).

  A maximum spanning tree of ``M`` is a minimum spanning tree of ``-M``,
  which is what single-linkage clustering computes; its merge heights are the
  tree's (negated) edge weights, so every weight comes back bit for bit.
  (``1 - M`` would lose weights below ~1e-8 to float64 rounding.) scipy's
  single linkage is an O(P^2) Prim in C, the fastest exact spanning tree
  measured on the host (README, Performance).

  Returns:
    float32 array of ``P - 1`` weights, sorted ascending.
  """
  m = _as_host_matrix(m)
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
  """Exact sorted birth set ``B(M)`` and death set ``D(M)`` (host, float32)."""
  m = _as_host_matrix(m)
  if m.shape[0] < 2:
    return np.zeros((0,), np.float32), np.zeros((0,), np.float32)
  edges = _upper_edges(m)
  births = _tree_weights_from_edges(edges)
  return births, _multiset_difference(np.sort(edges), births)


def top_distance(m1, m2) -> float:
  """Exact TOP distance between two connectomes with the same node count.

  ``sum_i (b_i - b'_i)^2 + sum_j (d_j - d'_j)^2`` over the sorted birth and
  death sets (Songdechakraiwut et al., ICLR 2022).

  Example:
    >>> import numpy as np
    >>> from cgalr_jax import top_distance
    >>> m = np.array([[0, .9, .1], [.9, 0, .5], [.1, .5, 0]], np.float32)
    >>> round(top_distance(m, m), 6)
    0.0
  """
  m1, m2 = _as_host_matrix(m1), _as_host_matrix(m2)
  if m1.shape != m2.shape:
    raise ValueError(
        f"top_distance needs equal node counts, got {m1.shape} and {m2.shape}.")
  b1, d1 = birth_death_sets(m1)
  b2, d2 = birth_death_sets(m2)
  return float(np.sum((b1.astype(np.float64) - b2) ** 2)
               + np.sum((d1.astype(np.float64) - d2) ** 2))


# ----------------------------------------------------------------------------
# K-point TOP summaries: host and device backends.


def top_summary_host(m, resolution: int) -> np.ndarray:
  """``[2, K]`` float32 quantile summary (births, deaths) computed with NumPy."""
  m = _as_host_matrix(m)
  n_b, n_d = set_sizes(m.shape[0])
  out = np.zeros((2, resolution), np.float32)
  if n_b == 0:
    return out
  edges = _upper_edges(m)
  births = _tree_weights_from_edges(edges)
  out[0] = births[quantile_ranks(n_b, resolution)]
  if n_d:
    # A full sort of the edges: NumPy's vectorised sort (~10 ns per edge
    # here) beat every exact order-statistics scheme measured (bucket
    # counting with bincount, np.partition at the K ranks), see README.
    edges.sort()  # in place: ``edges`` is a fresh gather
    removed = _birth_positions(edges, births, np)
    ranks = _death_ranks_to_edge_ranks(
        removed, quantile_ranks(n_d, resolution), np)
    out[1] = edges[ranks]
  return out


def _multiset_difference(values_sorted: np.ndarray,
                         removed_sorted: np.ndarray) -> np.ndarray:
  """Sorted ``values`` with one copy of each ``removed`` value taken out."""
  keep = np.ones(values_sorted.shape[0], dtype=bool)
  keep[_birth_positions(values_sorted, removed_sorted, np)] = False
  return values_sorted[keep]


def max_spanning_tree_weights_device(m: jax.Array) -> jax.Array:
  """Maximum-spanning-tree weights with Prim's algorithm in JAX (unsorted).

  O(P^2) work in P - 1 vector steps; stays on the device under ``jit``.
  """
  m = jnp.asarray(m)  # a NumPy matrix cannot be indexed by a traced argmax
  p = m.shape[0]
  neg = jnp.asarray(-jnp.inf, m.dtype)
  in_tree = jnp.zeros((p,), bool).at[0].set(True)
  best = jnp.where(in_tree, neg, m[0])
  births = jnp.zeros((p - 1,), m.dtype)

  def step(i, carry):
    in_tree, best, births = carry
    j = jnp.argmax(best)
    births = births.at[i].set(best[j])
    in_tree = in_tree.at[j].set(True)
    best = jnp.where(in_tree, neg, jnp.maximum(best, m[j]))
    return in_tree, best, births

  _, _, births = jax.lax.fori_loop(0, p - 1, step, (in_tree, best, births))
  return births


def _sort_floats(x: jax.Array) -> jax.Array:
  """Ascending sort of float32 values through their integer bit patterns.

  Flipping the magnitude bits of negative floats makes int32 order equal to
  float order (``-0.0`` just below ``+0.0``), so the sort is exact. XLA:CPU
  sorts int32 about 5x faster than float32, whose comparator must handle
  NaN; on GPU both are radix sorts and the two bit flips are free.
  """
  bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
  flip = jax.lax.shift_right_arithmetic(bits, jnp.int32(31)) & jnp.int32(
      0x7FFFFFFF)
  keys = jax.lax.sort(bits ^ flip)
  flip = jax.lax.shift_right_arithmetic(keys, jnp.int32(31)) & jnp.int32(
      0x7FFFFFFF)
  return jax.lax.bitcast_convert_type(keys ^ flip, jnp.float32)


def top_summary_device(m: jax.Array, resolution: int) -> jax.Array:
  """``[2, K]`` float32 quantile summary (births, deaths), pure JAX."""
  m = jnp.asarray(m, jnp.float32)
  p = m.shape[0]
  n_b, n_d = set_sizes(p)
  if n_b == 0:
    return jnp.zeros((2, resolution), jnp.float32)
  births = _sort_floats(max_spanning_tree_weights_device(m))
  birth_q = births[quantile_ranks(n_b, resolution)]
  if n_d == 0:
    return jnp.stack([birth_q, jnp.zeros_like(birth_q)])
  flat = np.flatnonzero(_upper_mask(p)).astype(np.int32)
  edges = _sort_floats(m.reshape(-1)[flat])
  removed = _birth_positions(edges, births, jnp)
  ranks = _death_ranks_to_edge_ranks(
      removed, jnp.asarray(quantile_ranks(n_d, resolution)), jnp)
  return jnp.stack([birth_q, edges[ranks]])


def top_summary_distance(ref: jax.Array, cur: jax.Array,
                         num_nodes: int) -> jax.Array:
  """``TOP_K`` between two ``[2, K]`` summaries of P-node connectomes."""
  n_b, n_d = set_sizes(num_nodes)
  k = ref.shape[-1]
  sq = jnp.sum(jnp.square(ref - cur), axis=-1)
  return (n_b / k) * sq[..., 0] + (n_d / k) * sq[..., 1]


def _host_callback(fn, result_shape, *args):
  """``jax.pure_callback`` that turns any host exception into ``ok=False``.

  ``fn`` returns a tuple matching ``result_shape`` minus the trailing flag.
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
  """Host TOP summary from inside ``jit``: returns ``(summary, ok)``."""
  shape = (jax.ShapeDtypeStruct((2, resolution), jnp.float32),
           jax.ShapeDtypeStruct((), jnp.bool_))
  summary, ok = _host_callback(
      functools.partial(lambda x, k: (top_summary_host(x, k),), k=resolution),
      shape, m)
  return summary, ok


# ----------------------------------------------------------------------------
# WD: Vietoris-Rips diagrams and their Wasserstein distance.


def persistence_diagrams(m) -> tuple[np.ndarray, np.ndarray]:
  """Vietoris-Rips H0 (finite bars only) and H1 diagrams of ``sqrt(1 - M)``."""
  import ripser  # pylint: disable=import-outside-toplevel

  m = _as_host_matrix(m).astype(np.float64)
  dist = np.sqrt(np.clip(1.0 - m, 0.0, 1.0))
  np.fill_diagonal(dist, 0.0)
  dgms = ripser.ripser(dist, maxdim=1, distance_matrix=True)["dgms"]
  h0 = dgms[0][np.isfinite(dgms[0][:, 1])]
  h1 = dgms[1][np.isfinite(dgms[1][:, 1])]
  return h0, h1


def diagram_distance(dgm1, dgm2, *, p: float = 1) -> float:
  """p-Wasserstein distance between two persistence diagrams.

  Euclidean ground metric; a point may instead be matched to the diagonal at
  its Euclidean distance ``(death - birth) / sqrt(2)``. For ``p = 1`` this is
  the convention of ``persim.wasserstein``. Points with zero persistence
  (padding) cost nothing and are dropped first.
  """
  from scipy.optimize import linear_sum_assignment  # pylint: disable=import-outside-toplevel

  def clean(d):
    d = np.asarray(d, np.float64).reshape(-1, 2)
    return d[np.isfinite(d).all(axis=1) & (d[:, 1] > d[:, 0])]

  a, b = clean(dgm1), clean(dgm2)
  na, nb = a.shape[0], b.shape[0]
  if na + nb == 0:
    return 0.0
  diag_a = ((a[:, 1] - a[:, 0]) / np.sqrt(2.0)) ** p
  diag_b = ((b[:, 1] - b[:, 0]) / np.sqrt(2.0)) ** p
  if na == 0 or nb == 0:
    return float((np.sum(diag_a) + np.sum(diag_b)) ** (1.0 / p))
  # An na x nb assignment instead of the textbook (na + nb)^2 one with
  # diagonal slots (same optimum, several times faster): pairing a_i with
  # b_j costs at most sending both to the diagonal, min(|a_i - b_j|^p,
  # diag_i + diag_j), and a pair taken at the diagonal price is two
  # diagonal matches. Every point of the larger diagram left unpaired goes
  # to the diagonal.
  # Euclidean ground distance, as ``np.linalg.norm(..., axis=-1)`` computes
  # it but without its generic reduction (10x faster for 2-vectors).
  gap_birth = a[:, None, 0] - b[None, :, 0]
  gap_death = a[:, None, 1] - b[None, :, 1]
  pair = np.sqrt(gap_birth * gap_birth + gap_death * gap_death) ** p
  both_to_diagonal = diag_a[:, None] + diag_b[None, :]
  rows, cols = linear_sum_assignment(np.minimum(pair, both_to_diagonal)
                                     - both_to_diagonal)
  unpaired_a = np.ones(na, bool)
  unpaired_a[rows] = False
  unpaired_b = np.ones(nb, bool)
  unpaired_b[cols] = False
  total = (np.sum(np.minimum(pair[rows, cols], both_to_diagonal[rows, cols]))
           + np.sum(diag_a[unpaired_a]) + np.sum(diag_b[unpaired_b]))
  return float(total ** (1.0 / p))


def wd_distance(m1, m2, *, p: float = 1) -> float:
  """Wasserstein distance between the Vietoris-Rips diagrams of two connectomes.

  ``W_p(H0, H0') + W_p(H1, H1')`` on ``D = sqrt(1 - M)`` (DESIGN.md 2, WD).
  Cost grows like O(P^3) or worse: use a node budget for large P.

  Example:
    >>> import numpy as np
    >>> from cgalr_jax import wd_distance
    >>> m = np.array([[0, .9, .1], [.9, 0, .5], [.1, .5, 0]], np.float32)
    >>> wd_distance(m, m)
    0.0
  """
  if p < 1:
    raise ValueError(f"wd_distance: p must be >= 1, got {p}.")
  h0a, h1a = persistence_diagrams(m1)
  h0b, h1b = persistence_diagrams(m2)
  return diagram_distance(h0a, h0b, p=p) + diagram_distance(h1a, h1b, p=p)


def wd_summary_host(m, resolution: int) -> np.ndarray:
  """``[2, K, 2]`` diagrams: the K most persistent H0 and H1 points.

  Missing points are padded with diagonal points ``(0, 0)``, which have zero
  persistence and so contribute nothing to any distance.
  """
  out = np.zeros((2, resolution, 2), np.float32)
  for dim, dgm in enumerate(persistence_diagrams(m)):
    if dgm.shape[0]:
      order = np.argsort(dgm[:, 0] - dgm[:, 1], kind="stable")[:resolution]
      out[dim, : order.shape[0]] = dgm[order]
  return out


def _wd_measure_host(m, ref, resolution):
  cur = wd_summary_host(m, resolution)
  dist = diagram_distance(ref[0], cur[0]) + diagram_distance(ref[1], cur[1])
  return cur, np.float32(dist)


def wd_measure_via_host(m: jax.Array, ref: jax.Array, resolution: int):
  """Host WD step from inside ``jit``: ``(diagrams, distance_to_ref, ok)``."""
  shape = (jax.ShapeDtypeStruct((2, resolution, 2), jnp.float32),
           jax.ShapeDtypeStruct((), jnp.float32),
           jax.ShapeDtypeStruct((), jnp.bool_))
  return _host_callback(
      functools.partial(_wd_measure_host, resolution=resolution), shape, m, ref)

"""WD: Vietoris-Rips persistence diagrams of a connectome and their distance.

DESIGN.md section 2, "WD". The distance matrix is ``D = sqrt(1 - M)`` off
the diagonal and 0 on it; ripser computes its Vietoris-Rips persistence up to
H1; H0 (without its infinite bar) and H1 are compared with the
1-Wasserstein distance (Euclidean ground metric, diagonal matching, the
convention of ``persim.wasserstein``). Host only: the step leaves a ``jit``
through :func:`cgalr_jax.topology.host_callback`.

The optimizer state keeps a fixed-size summary: the K most persistent points
per dimension, padded with diagonal points, which have zero persistence and
so add nothing to any distance.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from cgalr_jax.topology import host_callback, host_matrix


def persistence_diagrams(m) -> tuple[np.ndarray, np.ndarray]:
  """Vietoris-Rips diagrams of ``sqrt(1 - M)`` (host).

  Args:
    m: ``[P, P]`` connectome with weights in [0, 1].

  Returns:
    ``(h0, h1)``: float64 arrays of ``(birth, death)`` rows; H0 without its
    infinite bar.

  Raises:
    ValueError: if ``m`` is not square or has a non-finite weight (ripser
      would return diagrams of it).
  """
  import ripser  # pylint: disable=import-outside-toplevel

  m = host_matrix(m).astype(np.float64)
  if not np.all(np.isfinite(m)):
    raise ValueError("connectome has non-finite weights.")
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

  Args:
    dgm1: ``[n1, 2]`` array of ``(birth, death)`` points.
    dgm2: ``[n2, 2]`` array of ``(birth, death)`` points.
    p: order of the distance, ``>= 1``.

  Returns:
    The distance as a Python float.
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

  Args:
    m1: ``[P1, P1]`` connectome.
    m2: ``[P2, P2]`` connectome (the node counts may differ).
    p: order of the distance, ``>= 1``.

  Returns:
    The distance as a Python float.

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
  """The K most persistent H0 and H1 points of a connectome (host).

  Args:
    m: ``[P, P]`` connectome.
    resolution: K, the number of points kept per dimension.

  Returns:
    float32 ``[2, K, 2]``: ``(birth, death)`` points of H0 and H1, most
    persistent first, padded with diagonal points ``(0, 0)``.
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
  """The host WD step from inside ``jit``.

  Args:
    m: ``[P, P]`` connectome (traced).
    ref: ``[2, K, 2]`` reference summary from an earlier measurement.
    resolution: K.

  Returns:
    ``(diagrams, distance_to_ref, ok)``; ``ok`` is False (and the other two
    are zeros) when the host step failed.
  """
  shape = (jax.ShapeDtypeStruct((2, resolution, 2), jnp.float32),
           jax.ShapeDtypeStruct((), jnp.float32),
           jax.ShapeDtypeStruct((), jnp.bool_))
  return host_callback(
      functools.partial(_wd_measure_host, resolution=resolution), shape, m, ref)

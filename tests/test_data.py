"""Tests for experiments/data.py. Nothing here downloads anything."""

from __future__ import annotations

import collections
import codecs
import functools
import hashlib
import io
import os
import pickle
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from hypothesis import HealthCheck, given, settings, strategies as st
import numpy as np
import pytest
import scipy.sparse as sp

from experiments import data

REPO = Path(__file__).resolve().parents[1]
REAL_PLANETOID = REPO.parent / "shared" / "data" / "planetoid"
needs_real = pytest.mark.skipif(not REAL_PLANETOID.is_dir(),
                                reason=f"{REAL_PLANETOID} not present")


@pytest.fixture(autouse=True)
def _no_network_no_user_state(monkeypatch, tmp_path):
  """Any urlopen fails the test; env vars and cache dir point to tmp_path."""

  def _fail(*args, **kwargs):
    pytest.fail(f"network access attempted: urlopen{args}")

  monkeypatch.setattr(urllib.request, "urlopen", _fail)
  monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg_cache"))


# ----------------------------------------------------------------------------
# Image / vector datasets.
# ----------------------------------------------------------------------------


def _rows_with_labels(ds: data.Dataset, split: str) -> np.ndarray:
  x = getattr(ds, f"x_{split}")
  y = getattr(ds, f"y_{split}")
  return np.concatenate([x, y[:, None].astype(np.float32)], axis=1)


def _lexsorted(a: np.ndarray) -> np.ndarray:
  return a[np.lexsort(a.T[::-1])]


def _check_common(ds: data.Dataset, n_features: int, sizes: tuple[int, ...]):
  assert not ds.is_graph
  assert ds.adj is None and ds.x is None and ds.train_idx is None
  assert ds.num_classes == 10
  assert ds.num_features == n_features
  for split, n in zip(("train", "val", "test"), sizes):
    x, y = getattr(ds, f"x_{split}"), getattr(ds, f"y_{split}")
    assert x.shape == (n, n_features), split
    assert y.shape == (n,), split
    assert x.dtype == np.float32 and y.dtype == np.int32, split
    assert isinstance(x, np.ndarray) and type(x) is np.ndarray
    assert np.all(np.isfinite(x))
    # Every class in every split, in roughly equal shares (stratified).
    counts = np.bincount(y, minlength=10)
    assert counts.shape == (10,) and counts.min() > 0, (split, counts)
    assert counts.max() - counts.min() <= 0.2 * n / 10 + 30, (split, counts)


def test_digits_shapes_range_and_partition():
  ds = data.load("digits", seed=0)
  assert ds.name == "digits"
  _check_common(ds, 64, (1078, 359, 360))
  for split in ("train", "val", "test"):
    x = getattr(ds, f"x_{split}")
    assert x.min() >= 0.0 and x.max() <= 1.0
  assert ds.x_train.max() == 1.0  # scaled by 16, not by something larger
  # The three splits together are exactly the raw data (as a multiset of
  # rows with labels): nothing lost, nothing duplicated across splits.
  from sklearn.datasets import load_digits
  raw = load_digits()
  raw_rows = np.concatenate(
      [raw.data.astype(np.float32) / 16.0,
       raw.target[:, None].astype(np.float32)], axis=1)
  split_rows = np.concatenate(
      [_rows_with_labels(ds, s) for s in ("train", "val", "test")])
  np.testing.assert_array_equal(_lexsorted(split_rows), _lexsorted(raw_rows))


def test_split_indices_disjoint_and_cover():
  y = data.load("digits").y_train  # any label vector will do
  parts = data._stratified_perm_split(y, (0.6, 0.2, 0.2), seed=3)
  allidx = np.concatenate(parts)
  assert len(allidx) == len(y)
  np.testing.assert_array_equal(np.sort(allidx), np.arange(len(y)))
  for a, b in ((0, 1), (0, 2), (1, 2)):
    assert not np.intersect1d(parts[a], parts[b]).size


def test_digits_split_deterministic_per_seed():
  a = data.load("digits", seed=1)
  b = data.load("digits", seed=1)
  c = data.load("digits", seed=2)
  for split in ("train", "val", "test"):
    np.testing.assert_array_equal(getattr(a, f"x_{split}"),
                                  getattr(b, f"x_{split}"))
    np.testing.assert_array_equal(getattr(a, f"y_{split}"),
                                  getattr(b, f"y_{split}"))
  assert not np.array_equal(a.x_test, c.x_test)


def test_loaders_do_not_share_mutable_arrays():
  a = data.load("digits", seed=0)
  a.x_train[:] = -7.0
  b = data.load("digits", seed=0)
  assert b.x_train.min() >= 0.0


def test_mnist5k():
  ds = data.load("mnist5k", seed=0)
  _check_common(ds, 784, (3000, 1000, 1000))
  assert ds.x_train.min() == 0.0 and ds.x_train.max() == 1.0
  assert np.all(np.bincount(ds.y_test) == 100)
  assert ds.x_train.reshape(-1, 28, 28).shape == (3000, 28, 28)


@pytest.fixture(scope="module")
def mnist1d_pair():
  """Two seeds' splits plus whether generation left numpy's global RNG alone.

  Generation takes a few seconds, so it runs once here (the loader caches
  it); ``make_dataset`` reseeds the global RNG, which the loader must undo.
  """
  data._mnist1d_raw.cache_clear()
  np.random.seed(123)
  expected = np.random.rand(3)
  np.random.seed(123)
  first = data.load("mnist1d", seed=0)
  rng_untouched = np.array_equal(np.random.rand(3), expected)
  return first, data.load("mnist1d", seed=1), rng_untouched


def test_mnist1d(mnist1d_pair):
  ds, other, _ = mnist1d_pair
  _check_common(ds, 40, (3200, 800, 1000))
  # The generator standardises the whole set; values are O(1), not [0, 1].
  allx = np.concatenate([ds.x_train, ds.x_val, ds.x_test])
  assert abs(float(allx.mean())) < 1e-3
  assert abs(float(allx.std()) - 1.0) < 1e-3
  # The test set is fixed; only the train/val carve depends on the seed.
  np.testing.assert_array_equal(ds.x_test, other.x_test)
  np.testing.assert_array_equal(ds.y_test, other.y_test)
  assert not np.array_equal(ds.y_val, other.y_val)
  trainval = lambda d: _lexsorted(np.concatenate(
      [_rows_with_labels(d, "train"), _rows_with_labels(d, "val")]))
  np.testing.assert_array_equal(trainval(ds), trainval(other))


def test_mnist1d_leaves_global_rng_alone(mnist1d_pair):
  assert mnist1d_pair[2]


def test_unknown_name():
  with pytest.raises(ValueError, match="Unknown dataset"):
    data.load("imagenet")


# ----------------------------------------------------------------------------
# A tiny hand-made Planetoid set.
# ----------------------------------------------------------------------------

# 504 "allx" nodes (2 labelled train nodes, 500 validation nodes, 2 nodes in
# no split), then test ids 504..509 of which 505 and 508 are missing from the
# test index (isolated nodes, as in CiteSeer): N = 510.
N_ALL = 504
TEST_ORDER = [507, 504, 509, 506]  # order of the tx/ty rows in the file
N_NODES = 510
EDGES = {(0, 1), (1, 2), (3, 507)}  # after dedup, symmetrising, no self loops


def _onehot(labels, c=2):
  out = np.zeros((len(labels), c), np.int32)
  out[np.arange(len(labels)), labels] = 1
  return out


def _tiny_objects():
  allx_dense = np.zeros((N_ALL, 3), np.float32)
  allx_dense[:, 0] = np.arange(N_ALL) + 1
  allx_dense[:, 1] = 1.0
  tx_dense = np.array([[0.0, 2.0, k] for k in TEST_ORDER], np.float32)
  graph = collections.defaultdict(list)
  for i in range(N_NODES):
    graph[i] = []
  graph[0] = [1, 1, 0]  # duplicate neighbour and a self loop
  graph[1] = [0, 2]
  graph[2] = [1]
  graph[3] = [507]  # listed in one direction only
  return {
      "x": sp.csr_matrix(allx_dense[:2]),
      "y": _onehot(np.arange(2) % 2),
      "allx": sp.csr_matrix(allx_dense),
      "ally": _onehot(np.arange(N_ALL) % 2),
      "tx": sp.csr_matrix(tx_dense),
      "ty": _onehot(np.array(TEST_ORDER) % 2),
      "graph": graph,
  }


def _write_tiny(directory: Path, name: str = "cora") -> Path:
  directory.mkdir(parents=True, exist_ok=True)
  for ext, obj in _tiny_objects().items():
    with open(directory / f"ind.{name}.{ext}", "wb") as f:
      pickle.dump(obj, f, protocol=2)
  (directory / f"ind.{name}.test.index").write_text(
      "".join(f"{k}\n" for k in TEST_ORDER))
  return directory


def _expected_tiny_adj() -> np.ndarray:
  deg = np.ones(N_NODES)  # degree in A + I
  for i, j in EDGES:
    deg[i] += 1
    deg[j] += 1
  assert (deg[0], deg[1], deg[2], deg[3], deg[507]) == (2, 3, 2, 2, 2)
  adj = np.diag(1.0 / deg)
  for i, j in EDGES:
    adj[i, j] = adj[j, i] = 1.0 / np.sqrt(deg[i] * deg[j])
  # Spot values by hand: 1/sqrt(2*3) between nodes 0 and 1, 1/3 on node 1.
  assert np.isclose(adj[0, 1], 1 / np.sqrt(6)) and np.isclose(adj[1, 1], 1 / 3)
  assert adj[5, 5] == 1.0 and adj[3, 507] == 0.5
  return adj


def _check_tiny(ds: data.Dataset):
  assert ds.is_graph and ds.name == "cora" and ds.num_classes == 2
  assert ds.adj.dtype == np.float32 and ds.adj.shape == (N_NODES, N_NODES)
  np.testing.assert_allclose(ds.adj, _expected_tiny_adj(), rtol=1e-6,
                             atol=1e-7)
  np.testing.assert_array_equal(ds.train_idx, [0, 1])
  np.testing.assert_array_equal(ds.val_idx, np.arange(2, 502))
  np.testing.assert_array_equal(ds.test_idx, [504, 506, 507, 509])
  assert ds.train_idx.dtype.kind == "i" and ds.test_idx.dtype.kind == "i"
  # Features: row-normalised; test rows moved to their node ids; the two
  # missing ids are zero rows with label 0.
  assert ds.x.shape == (N_NODES, 3) and ds.x.dtype == np.float32
  i = np.arange(N_ALL)
  np.testing.assert_allclose(ds.x[:N_ALL, 0], (i + 1) / (i + 2), rtol=1e-6)
  np.testing.assert_allclose(ds.x[:N_ALL, 1], 1 / (i + 2), rtol=1e-6)
  for k in TEST_ORDER:
    np.testing.assert_allclose(ds.x[k], [0, 2 / (2 + k), k / (2 + k)],
                               rtol=1e-6)
  for k in (505, 508):
    assert not ds.x[k].any()
    assert ds.y[k] == 0
  labelled = np.setdiff1d(np.arange(N_NODES), [505, 508])
  np.testing.assert_array_equal(ds.y[labelled], labelled % 2)
  assert ds.y.dtype == np.int32
  # Split views are consistent with the full arrays.
  np.testing.assert_array_equal(ds.x_test, ds.x[ds.test_idx])
  np.testing.assert_array_equal(ds.y_val, ds.y[ds.val_idx])
  np.testing.assert_array_equal(ds.y_test, [0, 0, 1, 1])  # ids % 2


def test_tiny_planetoid_via_data_dir(tmp_path):
  ds = data.load("cora", data_dir=_write_tiny(tmp_path / "p"))
  _check_tiny(ds)


def test_tiny_planetoid_via_env_var(tmp_path, monkeypatch):
  monkeypatch.setenv(data.DATA_DIR_ENV, str(_write_tiny(tmp_path / "env")))
  _check_tiny(data.load("cora"))


def test_data_dir_argument_beats_env_var(tmp_path, monkeypatch):
  monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / "empty"))
  _check_tiny(data.load("cora", data_dir=_write_tiny(tmp_path / "p")))


def test_missing_files_with_data_dir_raise_without_network(tmp_path):
  with pytest.raises(FileNotFoundError, match="ind.cora.x"):
    data.load("cora", data_dir=tmp_path)
  d = _write_tiny(tmp_path / "partial")
  (d / "ind.cora.test.index").unlink()
  with pytest.raises(FileNotFoundError) as info:
    data.load("cora", data_dir=d)
  assert str(d / "ind.cora.test.index") in str(info.value)
  assert "ind.cora.graph" not in str(info.value)


def test_missing_files_with_env_var_raise_without_network(tmp_path,
                                                          monkeypatch):
  monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / "nothing_here"))
  with pytest.raises(FileNotFoundError, match="CGALR_DATA_DIR"):
    data.load("citeseer")


def _sha256(blob: bytes) -> str:
  return hashlib.sha256(blob).hexdigest()


def _serve(monkeypatch, files):
  """Fake urlopen: the URL's file name -> bytes (or a response) from ``files``.

  Returns the list of requested URLs.
  """
  requested = []

  def fake_urlopen(url, timeout=None):
    requested.append(url)
    body = files[url.rsplit("/", 1)[1]]
    return io.BytesIO(body) if isinstance(body, bytes) else body

  monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
  return requested


def _tiny_published(tmp_path, monkeypatch):
  """The tiny set as if published: its bytes, and their digests in the table."""
  files = {p.name: p.read_bytes()
           for p in _write_tiny(tmp_path / "source").iterdir()}
  monkeypatch.setattr(data, "PLANETOID_SHA256",
                      {k: _sha256(v) for k, v in files.items()})
  return files


def test_cache_dir_download_path_with_fake_urlopen(tmp_path, monkeypatch):
  requested = _serve(monkeypatch, _tiny_published(tmp_path, monkeypatch))
  cache = tmp_path / "xdg_cache" / "cgalr_jax" / "planetoid"
  assert data.default_cache_dir() == cache
  _check_tiny(data.load("cora"))
  assert sorted(requested) == sorted(
      f"https://github.com/kimiyoung/planetoid/raw/master/data/ind.cora.{e}"
      for e in data.PLANETOID_EXTS)
  assert sorted(p.name for p in cache.iterdir()) == sorted(
      f"ind.cora.{e}" for e in data.PLANETOID_EXTS)
  requested.clear()
  _check_tiny(data.load("cora"))  # now cached: no second download
  assert not requested


def test_cache_dir_offline_gives_clear_error(monkeypatch):

  def offline(url, timeout=None):
    raise urllib.error.URLError("no network")

  monkeypatch.setattr(urllib.request, "urlopen", offline)
  with pytest.raises(RuntimeError, match="CGALR_DATA_DIR"):
    data.load("citeseer")
  assert not any(data.default_cache_dir().glob("*"))  # no partial files


@needs_real
@pytest.mark.parametrize("name", data.PLANETOID_NAMES)
def test_download_matching_published_digests(name, monkeypatch):
  published = {p.name: p.read_bytes()
               for p in REAL_PLANETOID.glob(f"ind.{name}.*")}
  cache = data.default_cache_dir()
  seen_while_streaming = []

  class _Watched(io.BytesIO):

    def read(self, *args):
      seen_while_streaming.append(sorted(p.name for p in cache.iterdir()))
      return super().read(*args)

  files = dict(published)
  files[f"ind.{name}.allx"] = _Watched(published[f"ind.{name}.allx"])
  requested = _serve(monkeypatch, files)
  assert data.resolve_planetoid_dir(name) == cache
  assert len(requested) == 8
  assert {p.name: p.read_bytes() for p in cache.iterdir()} == published
  # allx streamed into a temp file next to it, renamed only at the end.
  assert [n for n in seen_while_streaming[-1] if "allx" in n] == [
      f"ind.{name}.allx.part{os.getpid()}"]


def test_download_with_wrong_digest_is_discarded(monkeypatch):
  _serve(monkeypatch, collections.defaultdict(lambda: b"not the published"))
  cache = data.default_cache_dir()
  with pytest.raises(RuntimeError) as info:
    data.resolve_planetoid_dir("cora")
  message = str(info.value)
  assert str(cache / "ind.cora.x") in message
  assert _sha256(b"not the published") in message
  assert data.PLANETOID_SHA256["ind.cora.x"] in message
  assert not any(cache.iterdir())  # neither the file nor a partial one


def test_download_over_size_cap_stops_and_is_discarded(monkeypatch):

  class _Endless(io.BytesIO):
    served = 0

    def read(self, size=-1):
      assert size > 0, "must stream in chunks, not read everything"
      _Endless.served += size
      return b"\0" * size

  _serve(monkeypatch, collections.defaultdict(_Endless))
  with pytest.raises(RuntimeError, match="larger than"):
    data.resolve_planetoid_dir("cora")
  assert _Endless.served <= data.PLANETOID_MAX_BYTES + (1 << 16)
  assert not any(data.default_cache_dir().iterdir())


def _truncate(blob: bytes) -> bytes:
  return blob[:len(blob) // 2]


def _garbage(blob: bytes) -> bytes:
  return np.random.default_rng(0).bytes(len(blob))


def _empty(blob: bytes) -> bytes:
  del blob
  return b""


@pytest.mark.parametrize("damage", [_truncate, _garbage, _empty])
@pytest.mark.parametrize("ext", ["x", "graph", "test.index"])
def test_bad_cached_file_names_it(tmp_path, monkeypatch, ext, damage):
  files = _tiny_published(tmp_path, monkeypatch)
  cache = data.default_cache_dir()
  cache.mkdir(parents=True)
  for file_name, blob in files.items():
    (cache / file_name).write_bytes(blob)
  bad = cache / f"ind.cora.{ext}"
  bad.write_bytes(damage(bad.read_bytes()))
  with pytest.raises(RuntimeError, match="Delete it to download it") as info:
    data.load("cora")  # the autouse fixture fails any download attempt
  assert str(bad) in str(info.value)


@pytest.mark.parametrize("damage", [_truncate, _garbage, _empty])
@pytest.mark.parametrize("ext,error", [("x", pickle.UnpicklingError),
                                       ("graph", pickle.UnpicklingError),
                                       ("test.index", ValueError)])
def test_bad_file_in_data_dir_names_it(tmp_path, ext, error, damage):
  d = _write_tiny(tmp_path / "p")
  bad = d / f"ind.cora.{ext}"
  bad.write_bytes(damage(bad.read_bytes()))
  with pytest.raises(error, match="delete the damaged file") as info:
    data.load("cora", data_dir=d)
  assert str(bad) in str(info.value)


# ----------------------------------------------------------------------------
# Hostile pickles.
# ----------------------------------------------------------------------------


class _SystemCall:

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


class _EvalCall:

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (eval, (f"open({str(self.marker)!r}, 'w').close()",))


class _CodecCall:

  def __reduce__(self):
    return (codecs.encode, ("secret", "rot13"))


@pytest.mark.parametrize("ext", ["x", "graph"])
@pytest.mark.parametrize("payload,refused", [
    (_SystemCall, "system"),
    (_EvalCall, "eval"),
])
def test_hostile_pickle_is_refused(tmp_path, ext, payload, refused):
  d = _write_tiny(tmp_path / "p")
  marker = tmp_path / "pwned"
  with open(d / f"ind.cora.{ext}", "wb") as f:
    pickle.dump(payload(marker), f, protocol=2)
  with pytest.raises(pickle.UnpicklingError, match=refused):
    data.load("cora", data_dir=d)
  assert not marker.exists()
  # The same bytes through plain pickle would have run the payload.
  with open(d / f"ind.cora.{ext}", "rb") as f:
    blob = f.read()
  assert b"system" in blob or b"eval" in blob


def test_hostile_defaultdict_factory_is_refused(tmp_path):
  marker = tmp_path / "pwned"
  evil = collections.defaultdict(os.system, {0: [1]})
  path = tmp_path / "ind.cora.graph"
  path.write_bytes(pickle.dumps(evil, protocol=2))
  with pytest.raises(pickle.UnpicklingError, match="system"):
    data.restricted_load(path)
  assert not marker.exists()


def test_codecs_encode_only_latin1(tmp_path):
  path = tmp_path / "blob"
  path.write_bytes(pickle.dumps(_CodecCall(), protocol=2))
  with pytest.raises(pickle.UnpicklingError, match="rot13"):
    data.restricted_load(path)
  path.write_bytes(pickle.dumps(b"\x00\xffok", protocol=2))
  assert data.restricted_load(path) == b"\x00\xffok"


class _Reduce:
  """Pickles as ``func(*args)``, then BUILD with ``state`` if given."""

  def __init__(self, func, args, state=None):
    self.func, self.args, self.state = func, args, state

  def __reduce__(self):
    return (self.func, self.args) + (() if self.state is None else
                                     (self.state,))


# numpy's own dtype state, with its flags (``NPY_LIST_PICKLE`` ...) zeroed.
_NO_FLAGS = (3, "|", None, None, None, -1, -1, 0)


def _array_pickle(code, raw, shape=None, dtype_state=_NO_FLAGS):
  """An ndarray pickle as numpy writes it, with any dtype, state and bytes."""
  _reconstruct = np.zeros(0).__reduce__()[0]
  dtype = _Reduce(np.dtype, (code, False, True), dtype_state)
  if shape is None:
    shape = (len(raw) // np.dtype(code).itemsize,)
  return pickle.dumps(_Reduce(_reconstruct, (np.ndarray, (0,), b"b"),
                              (1, shape, dtype, False, raw)), protocol=2)


# An object array whose 16 raw bytes are two forged pointers: numpy only
# treats object bytes as a list of objects if the dtype's flags say so, and
# the pickle sets them to 0. Unrestricted, using it (or freeing it) crashes.
FORGED_POINTERS = _array_pickle("O8", b"\x41" * 16)


def test_forged_object_array_fails_cleanly_in_a_subprocess(tmp_path):
  path = tmp_path / "ind.cora.y"
  path.write_bytes(FORGED_POINTERS)
  script = ("import sys; from experiments import data; "
            "print(repr(data.restricted_load(sys.argv[1])))")
  proc = subprocess.run([sys.executable, "-c", script, str(path)], cwd=REPO,
                        capture_output=True, text=True, timeout=300,
                        check=False)
  # A negative code is a signal (SIGSEGV); 1 is an uncaught Python exception.
  assert proc.returncode == 1, (proc.returncode, proc.stderr)
  assert "pickle.UnpicklingError" in proc.stderr
  assert str(path) in proc.stderr and "dtype('O')" in proc.stderr


@pytest.mark.parametrize("code,dtype_state,raw,ok", [
    ("f4", (3, "<", None, None, None, -1, -1, 0), b"\0" * 8, True),
    ("i4", (3, ">", None, None, None, -1, -1, 0), b"\0\0\0\1", True),
    ("b1", _NO_FLAGS, b"\1\0", True),
    ("u2", (3, "=", None, None, None, -1, -1, 0), b"\7\0", True),
    ("O8", _NO_FLAGS, b"\x41" * 8, False),
    ("O", (3, "|", None, None, None, -1, -1, 63), [1], False),
    ("V8", (3, "|", None, None, None, 8, 1, 0), b"\x41" * 8, False),
    ("f4,O8", _NO_FLAGS, b"\x41" * 12, False),
    ("(2,)O8", _NO_FLAGS, b"\x41" * 16, False),
    ("U2", (3, "<", None, None, None, 8, 4, 8), b"\x41" * 8, False),
    # State of a numeric dtype that claims object flags or fields.
    ("f8", (3, "<", None, None, None, -1, -1, 63), b"\x41" * 8, False),
    ("f8", (3, "<", None, ("a",), {"a": (np.dtype("f8"), 0)}, 8, 8, 0),
     b"\x41" * 8, False),
])
def test_array_dtypes(tmp_path, code, dtype_state, raw, ok):
  path = tmp_path / "blob"
  path.write_bytes(_array_pickle(code, raw, dtype_state=dtype_state))
  if not ok:
    with pytest.raises(pickle.UnpicklingError, match="Refused") as info:
      data.restricted_load(path)
    assert str(path) in str(info.value)
    return
  expected = np.frombuffer(raw, np.dtype(code).newbyteorder(dtype_state[1]))
  got = data.restricted_load(path)
  assert type(got) is np.ndarray  # numpy swaps to native byte order:
  assert got.dtype.newbyteorder("=") == expected.dtype.newbyteorder("=")
  np.testing.assert_array_equal(got, expected)
  assert np.dtype(code).isnative  # numpy's shared dtype was not edited


@functools.cache
def _fuzz_seeds() -> list[bytes]:
  seeds = [pickle.dumps(v, protocol=2) for k, v in _tiny_objects().items()
           if k in ("x", "y")]
  small_graph = collections.defaultdict(list, {0: [1, 2], 1: [0], 2: [0]})
  seeds += [pickle.dumps(small_graph, protocol=2), FORGED_POINTERS]
  if REAL_PLANETOID.is_dir():  # Python 2 pickles: str raw data, BINSTRING
    seeds.append((REAL_PLANETOID / "ind.cora.y").read_bytes()[:1500])
    seeds.append((REAL_PLANETOID / "ind.citeseer.x").read_bytes()[:3000])
  return seeds


_TOKENS = (b"f4", b"i4", b"b1", b"O8", b"V8", b"U2", b"b", b"O", b"\x00",
           b"\xff", b"K?", b"(", b")", b"t", b"R", b"N", b"}", b"q\x01")


@st.composite
def _mutated_pickles(draw):
  blob = bytearray(draw(st.sampled_from(_fuzz_seeds())))
  for _ in range(draw(st.integers(1, 4))):
    i = draw(st.integers(0, len(blob)))
    op = draw(st.sampled_from(("set", "insert", "delete", "truncate",
                               "retype")))
    token = draw(st.sampled_from(_TOKENS))
    if op == "set":
      blob[i:i + len(token)] = token
    elif op == "insert":
      blob[i:i] = token
    elif op == "delete":
      del blob[i:i + draw(st.integers(1, 8))]
    elif op == "truncate":
      del blob[i:]
    else:  # swap one dtype string for another of the same length
      blob = bytearray(bytes(blob).replace(
          draw(st.sampled_from((b"f4", b"i4", b"b1"))),
          draw(st.sampled_from((b"O8", b"V8", b"U2", b"f8", b"u1"))), 1))
  return bytes(blob)


_crafted_arrays = st.builds(
    _array_pickle,
    code=st.sampled_from(("f4", "i4", "b1", "O", "O8", "V8", "f4,O8", "U1",
                          "M8[s]")),
    raw=st.binary(max_size=24),
    shape=st.lists(st.integers(-2, 9), max_size=3).map(tuple),
    dtype_state=st.tuples(
        st.sampled_from((3, 4)), st.sampled_from(("<", ">", "|", "=")),
        st.none(), st.none(), st.none(), st.sampled_from((-1, 0, 8, 1 << 40)),
        st.sampled_from((-1, 1, 8)), st.integers(0, 255)))


def _touch(obj):
  """Reads every array reachable from ``obj``; forged pointers would crash."""
  stack, seen = [obj], set()
  while stack:
    o = stack.pop()
    if id(o) in seen:
      continue
    seen.add(id(o))
    if isinstance(o, np.ndarray):
      assert o.dtype.kind in "biuf" and not o.dtype.hasobject, o.dtype
      o.tolist()
    elif isinstance(o, dict):
      stack += list(o.keys()) + list(o.values())
    elif isinstance(o, (list, tuple)):
      stack += list(o)
    elif isinstance(o, sp.spmatrix):
      stack += list(vars(o).values())


@settings(max_examples=400, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.too_slow])
@given(blob=st.one_of(_mutated_pickles(), _crafted_arrays))
def test_fuzzed_pickles_fail_cleanly(tmp_path, blob):
  path = tmp_path / "ind.cora.x"
  path.write_bytes(blob)
  try:
    obj = data.restricted_load(path)
  except pickle.UnpicklingError as e:
    assert str(path) in str(e)
  else:
    _touch(obj)
    if isinstance(obj, sp.spmatrix):
      obj.tocoo()  # full check passed: the indices are in bounds
  assert np.dtype("f4").isnative and np.dtype("i4").isnative


# ----------------------------------------------------------------------------
# The real Planetoid files.
# ----------------------------------------------------------------------------

def _independent_adj_rows(graph, rows):
  """Rows of D^-1/2 (A + I) D^-1/2 from neighbour sets, no matrices."""
  nbrs = collections.defaultdict(set)
  for i, js in graph.items():
    for j in js:
      if i != j:
        nbrs[i].add(j)
        nbrs[j].add(i)
  deg = lambda i: len(nbrs[i]) + 1
  out = {}
  for i in rows:
    out[i] = {j: 1.0 / np.sqrt(deg(i) * deg(j)) for j in nbrs[i] | {i}}
  return out, nbrs


@needs_real
@pytest.mark.filterwarnings("ignore:Please import `csr_matrix`")  # plain load
@pytest.mark.parametrize("path", sorted(
    p for p in REAL_PLANETOID.glob("ind.*") if p.suffix != ".index"),
                         ids=lambda p: p.name)
def test_real_pickles_load_as_with_plain_pickle(path):
  assert _sha256(path.read_bytes()) == data.PLANETOID_SHA256[path.name]
  with open(path, "rb") as f:  # trusted: the published bytes
    want = pickle.load(f, encoding="latin1")
  got = data.restricted_load(path)
  assert type(got) is type(want)
  if isinstance(want, dict):
    assert got == want
  else:
    if sp.issparse(want):
      got, want = got.toarray(), want.toarray()
    assert got.dtype == want.dtype and got.dtype.kind in "fi"
    np.testing.assert_array_equal(got, want)


@needs_real
@pytest.mark.parametrize(
    "name,nodes,feats,classes,n_train,n_edges",
    [("cora", 2708, 1433, 7, 140, 10556), ("citeseer", 3327, 3703, 6, 120,
                                           9104)])
def test_real_planetoid(name, nodes, feats, classes, n_train, n_edges):
  ds = data.load(name, data_dir=REAL_PLANETOID)
  assert ds.is_graph and ds.num_classes == classes
  assert ds.x.shape == (nodes, feats) and ds.adj.shape == (nodes, nodes)
  assert ds.y.shape == (nodes,) and ds.y.max() == classes - 1
  np.testing.assert_array_equal(ds.train_idx, np.arange(n_train))
  np.testing.assert_array_equal(ds.val_idx, np.arange(n_train, n_train + 500))
  assert len(ds.test_idx) == 1000 and np.all(np.diff(ds.test_idx) > 0)
  index = np.loadtxt(REAL_PLANETOID / f"ind.{name}.test.index", dtype=int)
  np.testing.assert_array_equal(ds.test_idx, np.sort(index))
  # 20 labelled nodes per class in the standard training split.
  np.testing.assert_array_equal(np.bincount(ds.y_train), [20] * classes)
  assert ds.x_train.shape == (n_train, feats) and ds.x_test.shape[0] == 1000
  # Row-normalised features; CiteSeer's 15 filled-in nodes are zero rows.
  rowsum = ds.x.sum(axis=1)
  zero = np.isclose(rowsum, 0.0)
  assert zero.sum() == (15 if name == "citeseer" else 0)
  np.testing.assert_allclose(rowsum[~zero], 1.0, rtol=1e-5)
  assert not np.isin(np.where(zero)[0],
                     np.concatenate([ds.train_idx, ds.val_idx,
                                     ds.test_idx])).any()
  # Adjacency: symmetric, PyG's undirected edge count, and rows equal to an
  # independent computation.
  np.testing.assert_array_equal(ds.adj, ds.adj.T)
  off_diag = np.count_nonzero(ds.adj) - nodes
  assert off_diag == n_edges
  graph = data.restricted_load(REAL_PLANETOID / f"ind.{name}.graph")
  self_loops = [i for i, js in graph.items() if i in js]
  assert len(self_loops) == (124 if name == "citeseer" else 0)
  rows = [0, 1, n_train + 7, int(ds.test_idx[3]), nodes - 1]
  rows.append(int(np.argmax([len(set(graph[i])) for i in range(nodes)])))
  rows += self_loops[:2]
  expected, nbrs = _independent_adj_rows(graph, rows)
  for i in rows:
    want = np.zeros(nodes)
    for j, v in expected[i].items():
      want[j] = v
    np.testing.assert_allclose(ds.adj[i], want, rtol=1e-6, atol=1e-8,
                               err_msg=f"{name} row {i}")
  assert max(len(v) for v in nbrs.values()) > 50  # a hub is among the rows

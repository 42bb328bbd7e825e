"""The one training step and loop of the experiments (DESIGN.md sections 4, 5).

Every benchmark, the gate study, the overhead benchmark and the tests train
through :func:`train_runs`; loops that call one jitted step at a time (the
quickstart, the overhead benchmark's per-step timings) use
:func:`optax_step`. Both update through :func:`apply_optimizer`. Dataset budgets and batch sizes (``CONFIGS``),
:class:`Task` and :func:`make_task` live here, so nothing imports
``benchmark.py``.

One call trains several runs (seeds, or seeds x learning rates when tuning)
of one method in one compiled program: a whole epoch is a ``lax.scan`` over
its steps, epochs are a Python loop (progress bar, results as they come).

* Runs of a method without an in-optimizer measurement are ``jax.vmap``-ed.
* Runs of a CG-ALR method go through ``jax.lax.map`` (one after the other,
  still one program). The transform measures inside a ``lax.cond`` on its
  own update counter; under ``vmap`` that counter is batched, the ``cond``
  becomes a ``select`` and every step would pay for a measurement.
* Convolutional models (``unroll``): each epoch's steps are unrolled and
  every run is its own jitted call, for every method; XLA:CPU runs a
  convolution inside a loop about 8x slower.

Signal sources of CG-ALR (``methods.Method.source``):

* ``probe`` (default): a fixed probe set, drawn once per seed: 512 training
  samples for vector tasks, all nodes for graph tasks, read in inference
  mode with :func:`cgalr_jax.flax.probe` (the model's ``tap()`` outputs,
  after the nonlinearity);
* ``pool`` / ``batch``: the activations of the training forward pass,
  passed to ``update(activations=...)``.

Every CG-ALR run records the library's ``diagnostics`` at every step inside
the scan (eight scalars), from which :func:`measurements` extracts the
per-measurement trace: distance, noise floor, the halves' distances, z,
gate and scale.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental import sparse as jsparse
import numpy as np
import optax
import scipy.sparse as sp

import cgalr_jax
import cgalr_jax.flax as cflax
from cgalr_jax.flax import apply_with_activations
from experiments import data as data_lib
from experiments import methods as methods_lib
from experiments import models as models_lib

PROBE_SIZE = 512  # vector tasks: training samples in the fixed probe set
TRACE_FIELDS = ("scale", "z", "gate", "distance", "noise", "even_distance",
                "odd_distance", "measured", "skipped")


@dataclasses.dataclass(frozen=True)
class Config:
  """Training configuration of one dataset."""

  epochs: int
  batch_size: int | None  # None: full batch (graphs)
  steps_per_epoch: int | None = None  # graphs: full-batch steps per "epoch"
  weight_decay: float = 0.0  # L2 on kernels, added to the loss
  arch: str | None = None
  data: str | None = None  # the data set loaded (None: the config's name)


# Budgets (experiments/README.md, "Budgets"; measured by experiments/budget.py):
# long enough that the strong baselines' validation accuracy is flat over
# the last 20% of training, on the graphs for SGD as well as Adam.
CONFIGS = {
    "digits": Config(epochs=50, batch_size=64),      # 800 updates
    "mnist5k": Config(epochs=50, batch_size=128),    # 1,150 updates
    "mnist1d": Config(epochs=80, batch_size=128),    # 2,000 updates
    "cora": Config(epochs=200, batch_size=None, steps_per_epoch=5,
                   weight_decay=5e-4),               # 1,000 full-batch steps
    "citeseer": Config(epochs=200, batch_size=None, steps_per_epoch=5,
                       weight_decay=5e-4),
    # mnist5k with the small CNN (pooled channels after the nonlinearity).
    "mnist5k_cnn": Config(epochs=20, batch_size=128, arch="cnn",
                          data="mnist5k"),
}


@dataclasses.dataclass
class Task:
  """A dataset, its model and the training loop's static sizes."""

  name: str
  model: nn.Module
  arrays: dict[str, Any]
  is_graph: bool
  epochs: int
  steps_per_epoch: int
  batch_size: int
  weight_decay: float
  n_test: int
  n_train: int = 0

  @property
  def total_steps(self) -> int:
    return self.epochs * self.steps_per_epoch


def make_task(dataset: str, *, epochs: int | None = None,
              arch: str | None = None, data_dir: str | None = None,
              dataset_obj: data_lib.Dataset | None = None) -> Task:
  """Loads ``dataset`` and pairs it with its model and budget."""
  cfg = CONFIGS[dataset]
  ds = dataset_obj if dataset_obj is not None else data_lib.load(
      cfg.data or dataset, data_dir=data_dir)
  model = models_lib.for_dataset(cfg.data or dataset, ds.num_classes,
                                 arch=arch or cfg.arch)
  epochs = int(epochs or cfg.epochs)
  if ds.is_graph:
    arrays = {k: jnp.asarray(getattr(ds, k)) for k in
              ("y", "train_idx", "val_idx", "test_idx")}
    # Same matrices as sparse BCOO: ~1% (features) and ~0.2% (adjacency)
    # dense, so the GCN step is ~20x cheaper on CPU.
    # (Built through scipy: BCOO.fromdense would compile a jitted nonzero.)
    arrays["x"] = jsparse.BCOO.from_scipy_sparse(sp.csr_matrix(ds.x))
    arrays["adj"] = jsparse.BCOO.from_scipy_sparse(sp.csr_matrix(ds.adj))
    return Task(dataset, model, arrays, True, epochs,
                cfg.steps_per_epoch or 1, len(ds.train_idx),
                cfg.weight_decay, len(ds.test_idx), len(ds.train_idx))
  arrays = {k: jnp.asarray(getattr(ds, k)) for k in
            ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")}
  n_train = len(ds.y_train)
  batch = min(cfg.batch_size, n_train)
  return Task(dataset, model, arrays, False, epochs, n_train // batch, batch,
              cfg.weight_decay, len(ds.y_test), n_train)


def probe_indices(task: Task, seed: int, size: int = PROBE_SIZE) -> np.ndarray:
  """The fixed probe set of ``seed``: training-sample indices, drawn once."""
  n = task.n_train
  return np.sort(np.random.default_rng([int(seed), 2]).choice(
      n, min(size, n), replace=False)).astype(np.int32)


def apply_optimizer(optimizer: optax.GradientTransformation, grads: Any,
                    opt_state: Any, params: Any, *, lr: Any = None,
                    **extra_args: Any) -> tuple[Any, Any]:
  """One optimizer update, applied: ``(new params, new optimizer state)``.

  ``params`` always reach ``update`` (CG-ALR's probe reads them);
  ``extra_args`` (``activations=``, ``value=``) are passed through; ``lr``
  multiplies the updates (the experiments' methods are built at rate 1 and
  scaled per run).
  """
  updates, opt_state = optimizer.update(grads, opt_state, params,
                                        **extra_args)
  if lr is not None:
    updates = jax.tree.map(lambda u: jnp.asarray(lr, u.dtype) * u, updates)
  return optax.apply_updates(params, updates), opt_state


def optax_step(model: nn.Module, optimizer: optax.GradientTransformation, *,
               pass_activations: bool = False):
  """The plain supervised step: ``step(params, opt_state, x, y) -> (params,
  opt_state, loss)`` (cross-entropy on integer labels; not jitted).

  Args:
    model: a Linen classifier (``model.apply({"params": p}, x)`` gives
      logits).
    optimizer: any Optax transformation; CG-ALR with a probe needs nothing
      else.
    pass_activations: also pass the forward pass's ``tap()`` activations to
      ``update(activations=...)`` (CG-ALR's pool and batch sources).
  """
  def step(params, opt_state, x, y):
    def loss_fn(p):
      if pass_activations:
        logits, acts = apply_with_activations(model, {"params": p}, x)
      else:
        logits, acts = model.apply({"params": p}, x), None
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return ce, acts

    (loss, acts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    extra = {"activations": acts} if pass_activations else {}
    params, opt_state = apply_optimizer(optimizer, grads, opt_state, params,
                                        **extra)
    return params, opt_state, loss

  return step


def _accuracy(logits, y):
  return jnp.mean(jnp.argmax(logits, -1) == y)


def train_runs(task: Task, method: str, lrs: Sequence[float],
               seeds: Sequence[int], *, progress: Any = None,
               trace: bool = True, gate: Mapping[str, Any] | None = None,
               every: int | None = None, noise: bool = False,
               probe_size: int = PROBE_SIZE,
               z_sequences: np.ndarray | None = None,
               scale_trajectories: np.ndarray | None = None,
               on_epoch: Any = None,
               sequential: bool | None = None,
               unroll: bool | None = None) -> dict[str, np.ndarray]:
  """Trains ``len(seeds)`` runs of ``method`` (run i: ``lrs[i]``, ``seeds[i]``).

  Args:
    task: from :func:`make_task`.
    method: a key of ``methods.METHODS``.
    lrs, seeds: per run.
    progress: a tqdm-like object, ``update(1)`` per epoch.
    trace: record CG-ALR's diagnostics at every step.
    gate: CG-ALR's gate keywords (``score``, ``enter_z``...); None: the
      gate study's choice (``methods.STUDY_GATE``).
    every: CG-ALR's measuring period, updates or ``"epoch"`` (None:
      ``methods.STUDY_EVERY``).
    noise: CG-ALR also measures its noise floor (``noise=True``).
    probe_size: samples in the fixed probe set (vector tasks).
    z_sequences: ``[runs, measurements]`` z values the ``cgalr_shuffled``
      control replays (one per measuring step).
    scale_trajectories: ``[runs, total_steps]`` scales ``cgalr_replay``
      applies open loop.
    on_epoch: ``on_epoch(epoch, metrics)`` after every epoch.
    sequential: run the runs one after the other (``lax.map``) rather than
      ``vmap``-ed; None: methods that measure inside the optimizer, and
      every method when ``unroll`` (timing comparisons set it so both sides
      run the same loop).
    unroll: unroll each epoch's steps instead of looping over them, and
      run sequential runs one jitted call each instead of ``lax.map``; None:
      for convolutional models. XLA:CPU runs a convolution inside a loop
      about 8x slower than the same convolution outside one (a 23-step
      epoch of the CNN: 12.5 s in a ``lax.scan``, 1.2 s unrolled).

  Returns:
    numpy arrays ``val_acc``, ``test_acc``, ``train_loss`` of shape
    ``[runs, epochs]`` (train loss: mean cross-entropy over the epoch), and
    for gated CG-ALR methods (when ``trace``) each of ``TRACE_FIELDS``
    (``[runs, total_steps]``, the value after each step). :func:`measurements` turns them into per-measurement traces.
  """
  spec = methods_lib.METHODS[method]
  model, arr = task.model, task.arrays
  n_runs = len(seeds)
  want_trace = trace and spec.gated
  options = dict(gate=None if gate is None else dict(gate), every=every,
                 noise=noise)
  if task.is_graph:
    # All nodes in inference mode: the same fixed set for every seed.
    graph_probe = cflax.probe(model, (arr["x"], arr["adj"]), train=False)
  if spec.source == "pool":
    options["max_nodes"] = _num_signals(task)

  # Per-run context: what the optimiser closes over that differs per run.
  ctx: dict[str, Any] = {}
  if spec.source == "probe" and not task.is_graph:
    # The probe's inputs themselves, gathered once here: gathered inside the
    # compiled epoch they would be copied again every epoch.
    x_train = np.asarray(arr["x_train"])
    ctx["probe_x"] = np.stack([x_train[probe_indices(task, s, probe_size)]
                               for s in seeds])
  if spec.needs == "z_sequence":
    if z_sequences is None:
      raise ValueError(f"{method} needs z_sequences (one row per run).")
    ctx["z_sequence"] = np.asarray(z_sequences, np.float32)
  if spec.needs == "scale_trajectory":
    if scale_trajectories is None:
      raise ValueError(f"{method} needs scale_trajectories (one per run).")
    ctx["scale_trajectory"] = np.asarray(scale_trajectories, np.float32)
  ctx = {k: jnp.asarray(v) for k, v in ctx.items()}

  def optimizer(run_ctx):
    kwargs = dict(options)
    if spec.source == "probe":
      kwargs["probe"] = graph_probe if task.is_graph else cflax.probe(
          model, run_ctx["probe_x"], train=False)
    for k in ("z_sequence", "scale_trajectory"):
      if k in run_ctx:
        kwargs[k] = run_ctx[k]
    return methods_lib.build(method, 1.0, task.total_steps,
                             task.steps_per_epoch, **kwargs)

  def forward(params, x, *, train, rng=None, adj=None):
    kwargs = {"rngs": {"dropout": rng}} if rng is not None else {}
    args = (x, adj) if task.is_graph else (x,)
    return apply_with_activations(model, {"params": params}, *args,
                                  train=train, **kwargs)

  def init_run(i, seed):
    key = jax.random.key(seed)
    if task.is_graph:
      params = model.init(key, arr["x"], arr["adj"])["params"]
    else:
      params = model.init(key, arr["x_train"][:1])["params"]
    run_ctx = {k: v[i] for k, v in ctx.items()}
    return params, optimizer(run_ctx).init(params)

  def loss_fn(params, arrays, batch_idx, rng):
    if task.is_graph:
      logits, acts = forward(params, arrays["x"], train=True, rng=rng,
                             adj=arrays["adj"])
      logits, y = logits[arrays["train_idx"]], arrays["y"][arrays["train_idx"]]
    else:
      logits, acts = forward(params, arrays["x_train"][batch_idx], train=True)
      y = arrays["y_train"][batch_idx]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    loss = ce
    if task.weight_decay:
      loss = loss + 0.5 * task.weight_decay * models_lib.l2_penalty(params)
    return loss, (ce, acts)

  def train_step(carry, batch, arrays, opt):
    params, opt_state, lr, key = carry
    batch_idx, step = batch
    rng = None
    if task.is_graph:  # dropout
      rng = jax.random.fold_in(jax.random.wrap_key_data(key), step)
    (loss, (ce, acts)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, arrays, batch_idx, rng)
    extra = {}
    if spec.uses_activations:
      extra["activations"] = acts
    if spec.uses_value:
      extra["value"] = loss
    params, opt_state = apply_optimizer(opt, grads, opt_state, params, lr=lr,
                                        **extra)
    out = {"ce": ce}
    if want_trace:
      diag = cgalr_jax.diagnostics(opt_state)
      out.update({k: diag[k].astype(jnp.float32) for k in TRACE_FIELDS})
    return (params, opt_state, lr, key), out

  def evaluate(params, arrays):
    if task.is_graph:
      logits, _ = forward(params, arrays["x"], train=False, adj=arrays["adj"])
      y = arrays["y"]
      return (_accuracy(logits[arrays["val_idx"]], y[arrays["val_idx"]]),
              _accuracy(logits[arrays["test_idx"]], y[arrays["test_idx"]]))
    val_logits, _ = forward(params, arrays["x_val"], train=False)
    test_logits, _ = forward(params, arrays["x_test"], train=False)
    return (_accuracy(val_logits, arrays["y_val"]),
            _accuracy(test_logits, arrays["y_test"]))

  def batch_orders(rngs):
    """``[runs, steps_per_epoch, batch]`` example indices, from each seed."""
    spe, bs = task.steps_per_epoch, task.batch_size
    if task.is_graph:  # full batch: unused
      return np.zeros((len(rngs), spe, 1), np.int32)
    return np.stack([r.permutation(task.n_train)[:spe * bs].reshape(spe, bs)
                     for r in rngs]).astype(np.int32)

  def one_epoch(carry, run_ctx, epoch, batches, arrays):
    spe = task.steps_per_epoch
    steps = epoch * spe + jnp.arange(spe)
    opt = optimizer(run_ctx)
    carry, outs = jax.lax.scan(
        lambda c, b: train_step(c, b, arrays, opt), carry, (batches, steps),
        unroll=bool(unroll))
    val_acc, test_acc = evaluate(carry[0], arrays)
    metrics = {"val_acc": val_acc, "test_acc": test_acc,
               "train_loss": jnp.mean(outs.pop("ce"))}
    return carry, metrics, outs

  if unroll is None:
    unroll = isinstance(model, models_lib.CNN)
  if sequential is None:
    # Unrolled, separate calls per run are also faster than vmap-ed
    # convolutions (CNN, 2 runs: 1.3 s per run-epoch against 3.0 s).
    sequential = unroll or spec.family in methods_lib.MEASURING_FAMILIES
  if sequential and unroll:
    # One jitted call per run: lax.map would put the steps back in a loop.
    epoch_of_one = jax.jit(one_epoch, donate_argnums=0)

    def run_epoch(carry, run_ctx, epoch, batches, arrays):
      pick = lambda tree, i: jax.tree.map(lambda x: x[i], tree)  # noqa: E731
      outs = [epoch_of_one(pick(carry, i), pick(run_ctx, i), epoch,
                           batches[i], arrays) for i in range(n_runs)]
      return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)
  elif sequential:
    def all_runs(carry, run_ctx, epoch, batches, arrays):
      return jax.lax.map(
          lambda xs: one_epoch(xs[0], xs[1], epoch, xs[2], arrays),
          (carry, run_ctx, batches))
    run_epoch = jax.jit(all_runs, donate_argnums=0)
  else:
    run_epoch = jax.jit(jax.vmap(one_epoch, in_axes=(0, 0, None, 0, None)),
                        donate_argnums=0)

  # Initialisation runs eagerly, one seed at a time: jit(vmap(model.init))
  # costs seconds of XLA compile on CPU for a millisecond of work.
  inits = [init_run(i, int(s)) for i, s in enumerate(seeds)]
  params, opt_state = jax.tree.map(lambda *xs: jnp.stack(xs), *inits)
  keys = jnp.stack([jax.random.key_data(jax.random.key(int(s)))
                    for s in seeds])
  carry = (params, opt_state, jnp.asarray(lrs, jnp.float32), keys)
  orders = [np.random.default_rng([int(s), 1]) for s in seeds]
  history: dict[str, list] = {}
  traces: dict[str, list] = {}
  for epoch in range(task.epochs):
    carry, metrics, outs = run_epoch(carry, ctx, jnp.int32(epoch),
                                     batch_orders(orders), arr)
    for k, v in metrics.items():
      history.setdefault(k, []).append(np.asarray(v))
    for k, v in outs.items():
      traces.setdefault(k, []).append(np.asarray(v))
    if on_epoch is not None:
      on_epoch(epoch, {k: v[-1] for k, v in history.items()})
    if progress is not None:
      progress.update(1)
  result = {k: np.stack(v, axis=1) for k, v in history.items()}
  result.update({k: np.concatenate(v, axis=1) for k, v in traces.items()})
  return result


def _num_signals(task: Task) -> int:
  """P: the number of signals the model taps (for the pool's max_nodes)."""
  model, arr = task.model, task.arrays
  if task.is_graph:
    args = (arr["x"], arr["adj"])
  else:
    args = (arr["x_train"][:2],)

  def count(key):
    variables = model.init(key, *args)
    _, acts = apply_with_activations(model, variables, *args)
    return acts

  shapes = jax.eval_shape(count, jax.random.key(0))
  return int(sum(leaf.shape[-1] for leaf in jax.tree.leaves(shapes)))


def measuring_steps(result: Mapping[str, np.ndarray]) -> np.ndarray:
  """``[runs, steps]`` bool: steps at which an accepted measurement landed."""
  measured = np.asarray(result["measured"])
  previous = np.concatenate([np.zeros_like(measured[:, :1]),
                             measured[:, :-1]], axis=1)
  return measured > previous


def measurements(result: Mapping[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
  """Per run, the trace at each measurement that produced a distance.

  The first accepted measurement of a run is the reference (no distance);
  it is left out. Fields: ``step``, ``distance``, ``noise``,
  ``even_distance``, ``odd_distance``, ``z``, ``gate``, ``scale``.
  """
  hits = measuring_steps(result)
  out = []
  for i in range(hits.shape[0]):
    idx = np.nonzero(hits[i])[0][1:]
    row = {"step": idx}
    for k in ("distance", "noise", "even_distance", "odd_distance", "z",
              "gate", "scale"):
      row[k] = np.asarray(result[k][i, idx])
    out.append(row)
  return out


def z_at_measuring_steps(result: Mapping[str, np.ndarray],
                         every: int) -> np.ndarray:
  """``[runs, total_steps // every]``: z after every measuring step (0 while
  the gate is not ready), the sequence the shuffled control permutes."""
  z = np.asarray(result["z"])
  return z[:, every - 1::every]


def shuffle_z(z: np.ndarray, seed: int, start: int) -> np.ndarray:
  """A copy of ``z`` with entries ``start:`` randomly permuted.

  ``start`` = 1 + min_history: the reference and the warm-up measurements
  (z = 0, the gate cannot act) keep their place.
  """
  z = np.array(z, np.float32, copy=True)
  rng = np.random.default_rng([int(seed), 3])
  z[start:] = rng.permutation(z[start:])
  return z

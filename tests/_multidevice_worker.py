"""Data-parallel CG-ALR runs on forced host devices; prints JSON results.

Run by tests/test_multidevice.py in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (the device count must
be fixed before JAX starts, so it cannot share the main test process).

For each setting the same global batches train the same MLP; it records the
scale after every step (per replica where replicas exist):
* ``single``: one device, whole global batch;
* ``shard_map_4`` / ``shard_map_8``: ``jax.shard_map`` over a data axis,
  gradients ``pmean``-ed, CG-ALR with ``axis_name="data"``;
* ``gspmd_8``: ``jax.jit`` over a batch sharded 8 ways, no axis name;
* ``explicit_4``: the same over an Explicit-sharding mesh;
* ``pmap_4``: ``jax.pmap`` with ``axis_name="data"``;
* ``shard_map_vma_4``: ``shard_map`` with ``check_vma=True`` and per-replica
  parameters and optimizer state.
``errors`` holds the messages of the runs that must refuse to start:
``shard_map`` and ``pmap`` without ``axis_name``.
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import cgalr_jax

STEPS = 30
GLOBAL_BATCH = 64
BACKEND = sys.argv[1] if len(sys.argv) > 1 else "host"


def make_optimizer(axis_name=None):
  return cgalr_jax.cgalr(0.05, every=1, backend=BACKEND, min_history=3, window=8,
                         axis_name=axis_name)


def init_params():
  k1, k2 = jax.random.split(jax.random.key(0))
  return {"w1": jax.random.normal(k1, (12, 16)) * 0.5,
          "w2": jax.random.normal(k2, (16, 3)) * 0.5}


def batches():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(STEPS, GLOBAL_BATCH, 12)).astype(np.float32)
  y = rng.integers(0, 3, size=(STEPS, GLOBAL_BATCH)).astype(np.int32)
  return x, y


def loss_fn(params, x, y):
  hidden = jnp.tanh(x @ params["w1"])
  logits = hidden @ params["w2"]
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return loss, hidden


def local_step(optimizer, params, opt_state, x, y, axis_name=None):
  (_, hidden), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x, y)
  if axis_name is not None:
    grads = jax.lax.pmean(grads, axis_name)
  updates, opt_state = optimizer.update(grads, opt_state, params,
                                        activations=hidden)
  return optax.apply_updates(params, updates), opt_state


def run_shard_map(devices, axis_name="data"):
  mesh = Mesh(np.array(jax.devices()[:devices]), ("data",))
  optimizer = make_optimizer(axis_name)
  params = init_params()
  opt_state = optimizer.init(params)

  def per_replica(p, s, x, y):
    p, s = local_step(optimizer, p, s, x, y, axis_name="data")
    # Each replica reports its own scale, so agreement can be checked.
    return p, s, s[1].scale[None]

  step = jax.jit(jax.shard_map(
      per_replica, mesh=mesh, in_specs=(P(), P(), P("data"), P("data")),
      out_specs=(P(), P(), P("data")), check_vma=False))
  scales = []
  for x, y in zip(*batches()):
    params, opt_state, replica_scales = step(params, opt_state, x, y)
    scales.append([float(v) for v in np.asarray(replica_scales)])
  return scales


def run_shard_map_per_replica_state(devices):
  """``check_vma=True``: every replica carries its own params and state."""
  mesh = Mesh(np.array(jax.devices()[:devices]), ("data",))
  optimizer = make_optimizer("data")
  stack = lambda t: jax.tree.map(lambda v: jnp.stack([v] * devices), t)
  params = stack(init_params())
  opt_state = stack(optimizer.init(init_params()))
  first = lambda t: jax.tree.map(lambda v: v[0], t)
  again = lambda t: jax.tree.map(lambda v: v[None], t)

  def per_replica(p, s, x, y):
    p, s = local_step(optimizer, first(p), first(s), x, y, axis_name="data")
    return again(p), again(s)

  step = jax.jit(jax.shard_map(
      per_replica, mesh=mesh, in_specs=(P("data"),) * 4,
      out_specs=(P("data"), P("data")), check_vma=True))
  scales = []
  for x, y in zip(*batches()):
    params, opt_state = step(params, opt_state, x, y)
    scales.append([float(v) for v in np.asarray(opt_state[1].scale)])
  return scales


def error_of(run, *args):
  try:
    run(*args)
  except ValueError as err:
    return str(err)
  return "no error"


def run_jit(devices=None, explicit=False):
  """Plain ``jax.jit``; with ``devices``, the batch is sharded over them."""
  batch_sharding = None
  if devices is not None:
    if explicit:
      mesh = jax.make_mesh((devices,), ("data",), axis_types=(
          jax.sharding.AxisType.Explicit,), devices=jax.devices()[:devices])
      with jax.sharding.set_mesh(mesh):
        return run_jit_on(NamedSharding(mesh, P("data")))
    mesh = Mesh(np.array(jax.devices()[:devices]), ("data",))
    batch_sharding = NamedSharding(mesh, P("data"))
  return run_jit_on(batch_sharding)


def run_jit_on(batch_sharding):
  optimizer = make_optimizer()
  params = init_params()
  opt_state = optimizer.init(params)
  step = jax.jit(lambda p, s, x, y: local_step(optimizer, p, s, x, y))
  scales = []
  for x, y in zip(*batches()):
    if batch_sharding is not None:
      x = jax.device_put(x, batch_sharding)
      y = jax.device_put(y, batch_sharding)
    params, opt_state = step(params, opt_state, x, y)
    scales.append([float(opt_state[1].scale)])
  return scales


def run_pmap(devices, axis_name="data"):
  optimizer = make_optimizer(axis_name)
  params = init_params()
  opt_state = optimizer.init(params)
  replicate = lambda t: jax.tree.map(lambda v: jnp.stack([v] * devices), t)
  params, opt_state = replicate(params), replicate(opt_state)
  step = jax.pmap(
      lambda p, s, x, y: local_step(optimizer, p, s, x, y, axis_name="data"),
      axis_name="data")
  scales = []
  for x, y in zip(*batches()):
    shard = lambda v: v.reshape(devices, -1, *v.shape[1:])
    params, opt_state = step(params, opt_state, shard(x), shard(y))
    scales.append([float(v) for v in np.asarray(opt_state[1].scale)])
  return scales


def main():
  assert jax.device_count() >= 8, jax.devices()
  results = {
      "single": run_jit(),
      "shard_map_4": run_shard_map(4),
      "shard_map_8": run_shard_map(8),
      "gspmd_8": run_jit(8),
      "pmap_4": run_pmap(4),
      "explicit_4": run_jit(4, explicit=True),
      "shard_map_vma_4": run_shard_map_per_replica_state(4),
      "errors": {"shard_map": error_of(run_shard_map, 4, None),
                 "pmap": error_of(run_pmap, 4, None)},
  }
  print(json.dumps(results))


if __name__ == "__main__":
  main()

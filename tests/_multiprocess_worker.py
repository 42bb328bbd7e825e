"""One process of a two-process CG-ALR run on CPU; prints JSON results.

Run by tests/test_multiprocess.py: two of these start with
``jax.distributed.initialize`` (CPU collectives over gloo), each holding half
of every global batch. ``jax.jit`` over a mesh spanning both processes makes
the connectome's sufficient statistics global, so both processes must end
with the same statistics, distance and scale as one process that sees the
concatenated batches (``single`` mode).
"""

from __future__ import annotations

import json
import sys

import jax

MODE = sys.argv[1]  # "single" or the process id
if MODE != "single":
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=sys.argv[2],
                             num_processes=2, process_id=int(MODE))

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import cgalr_jax  # noqa: E402
from cgalr_jax import measure  # noqa: E402
from cgalr_jax.connectome import correlation_from_stats  # noqa: E402

STEPS, GLOBAL_BATCH, SIGNALS = 12, 32, 10


def batches():
  rng = np.random.default_rng(0)
  latent = rng.normal(size=(STEPS, GLOBAL_BATCH, 2))
  mixing = rng.normal(size=(STEPS, 2, SIGNALS)) * np.exp(
      rng.normal(size=(STEPS, 1, 1)))
  noise = rng.normal(size=(STEPS, GLOBAL_BATCH, SIGNALS))
  return (latent @ mixing + noise).astype(np.float32)


def main():
  opt = cgalr_jax.scale_by_connectome(every=1, window=4, min_history=2,
                                      enter_z=0.5, exit_z=0.1,
                                      score="trailing", backend="host")
  params = {"w": jnp.ones(3)}
  state = opt.init(params)
  step = jax.jit(lambda s, a: opt.update(params, s, params, activations=a)[1])
  connectome = jax.jit(lambda a: correlation_from_stats(
      measure.merge_parts(measure.split_stats(a))))
  data = batches()
  if MODE == "single":
    shard = lambda a: a  # noqa: E731
  else:
    mesh = jax.make_mesh((2,), ("data",), devices=jax.devices())
    sharding = NamedSharding(mesh, P("data"))
    half = GLOBAL_BATCH // 2
    lo = int(MODE) * half

    def shard(a):
      return jax.make_array_from_process_local_data(
          sharding, a[lo:lo + half], a.shape)

  trace = []
  for a in data:
    state = step(state, shard(a))
    trace.append({k: float(v) for k, v in
                  cgalr_jax.diagnostics(state).items()})
  m = connectome(shard(data[-1]))
  m = np.asarray(jax.experimental.multihost_utils.process_allgather(
      m, tiled=True)) if MODE != "single" else np.asarray(m)
  print(json.dumps({"trace": trace, "last_connectome": m.tolist(),
                    "processes": jax.process_count()}))


if __name__ == "__main__":
  import jax.experimental.multihost_utils  # noqa: F401  pylint: disable=unused-import
  main()

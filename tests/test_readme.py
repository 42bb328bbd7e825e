"""The documentation runs: README.md code blocks and docstring examples."""

from __future__ import annotations

import ast
import contextlib
import doctest
import importlib
import inspect
import io
import math
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
import pytest

import cgalr_jax

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_readme_has_the_expected_blocks():
  assert README.lstrip().startswith("# cgalr_jax")
  first_block = re.search(r"```(\w+)\n(.*?)```", README, flags=re.S)
  assert first_block.group(1) == "bash"
  assert "make demo" in first_block.group(2)
  assert "make test" in first_block.group(2)
  makefile = (ROOT / "Makefile").read_text()
  for target in ("demo", "test", "install"):
    assert re.search(rf"^{target}:", makefile, flags=re.M), target
  assert len(PYTHON_BLOCKS) >= 2


def test_one_line_block_builds_a_working_optimizer():
  namespace = {"__name__": "readme_fragment"}
  exec(compile(PYTHON_BLOCKS[0], "README.md[python 0]", "exec"), namespace)  # pylint: disable=exec-used
  optimizer = namespace["optimizer"]
  assert isinstance(optimizer, optax.GradientTransformationExtraArgs)
  params = {"w1": jnp.full((12, 16), 0.1)}
  state = optimizer.init(params)
  assert float(cgalr_jax.diagnostics(state)["scale"]) == 1.0
  step = jax.jit(optimizer.update)
  for _ in range(200):  # no activations passed: the probe is the source
    _, state = step(params, state, params)
  assert int(cgalr_jax.diagnostics(state)["measured"]) == 2  # every 100th


def test_flax_training_loop_block_runs_as_written():
  namespace = {"__name__": "readme_loop"}
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    exec(compile(PYTHON_BLOCKS[1], "README.md[python 1]", "exec"), namespace)  # pylint: disable=exec-used
  rows = [line.split() for line in out.getvalue().splitlines()]
  assert [int(r[0]) for r in rows] == list(range(49, 300, 50))
  losses = [float(r[1]) for r in rows]
  assert all(math.isfinite(l) for l in losses)
  assert losses[-1] < losses[0] / 2  # it trains
  gate = cgalr_jax.GateConfig()
  for row in rows:
    assert gate.min_scale <= float(row[2]) <= gate.max_scale
    assert int(row[3]) in (-1, 0, 1)
  # An unmodified TrainState loop: the probe measured every 10th update.
  diag = cgalr_jax.diagnostics(namespace["state"].opt_state)
  assert int(diag["measured"]) == 30 and int(diag["skipped"]) == 0


@pytest.mark.parametrize("index", range(2, len(PYTHON_BLOCKS)))
def test_other_python_blocks_run_as_written(index):
  # Later sections (multi-device, per-layer gates) are complete snippets too.
  namespace = {"__name__": f"readme_block_{index}"}
  with contextlib.redirect_stdout(io.StringIO()):
    exec(compile(PYTHON_BLOCKS[index], f"README.md[python {index}]", "exec"),  # pylint: disable=exec-used
         namespace)
  if "opt_state" in namespace:
    diag = cgalr_jax.diagnostics(namespace["opt_state"])
    assert int(diag["measured"]) > 0 and int(diag["skipped"]) == 0


def test_api_table_matches_the_code():
  rows = re.findall(r"^\| `(\w+)\((.*?)\)` \|", README, flags=re.M)
  names = {name for name, _ in rows}
  assert {"scale_by_connectome", "cgalr", "robbins_monro", "connectome",
          "top_distance", "wd_distance", "diagnostics", "GateConfig"} <= names
  for name, args in rows:
    fn = getattr(cgalr_jax, name)
    params = inspect.signature(fn).parameters
    for arg in args.split(","):
      arg = arg.strip()
      if "=" in arg:
        key, value = arg.split("=", 1)
        assert params[key].default == ast.literal_eval(value), (name, key)
      elif arg not in ("*", "**kwargs", "") and not arg.startswith("**"):
        assert arg in params, (name, arg)


@pytest.mark.parametrize("module_name", [
    "cgalr_jax.connectome", "cgalr_jax.measure", "cgalr_jax.topology",
    "cgalr_jax.gate", "cgalr_jax.schedules", "cgalr_jax.transform",
    "cgalr_jax.flax"])
def test_docstring_examples(module_name):
  module = importlib.import_module(module_name)
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
  assert result.failed == 0
  if module_name not in ("cgalr_jax.gate", "cgalr_jax.connectome"):
    assert result.attempted > 0  # (those two have no example)

"""Shared pytest helpers for the cgalr_jax tests."""

from __future__ import annotations

import jax
import pytest


@pytest.fixture(params=[False, True], ids=["eager", "jit"])
def maybe_jit(request):
  """``maybe_jit(fn, **jit_kwargs)``: ``jax.jit(fn)`` or ``fn`` itself.

  Like chex variants: a test using it runs its assertions once on the eager
  function and once on the jitted one.
  """
  if request.param:
    return lambda fn, **kwargs: jax.jit(fn, **kwargs)
  return lambda fn, **kwargs: fn

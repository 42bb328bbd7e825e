"""Models of the experiments (DESIGN.md section 5), Flax Linen.

Every model taps the activations CG-ALR reads with :func:`cgalr_jax.flax.tap`,
so ``apply_with_activations`` returns ``(logits, activations)``:

* :class:`MLP`: LeakyReLU hidden layers, each tapped (``[N, P_l]`` dense
  signals). For ``mnist5k`` it is 784-128-64-10 as in DESIGN.md.
* :class:`CNN`: two 3x3 conv blocks; the ``[N, H, W, C]`` conv outputs are
  tapped and the library pools each channel over space (C signals per block).
* :class:`GCN`: Kipf & Welling's two-layer graph convolution with the dense
  normalised adjacency ``D^-1/2 (A + I) D^-1/2``. The hidden node features
  of *all* nodes are tapped (``[num_nodes, hidden]``): training is
  transductive, every node's features are seen by the forward pass anyway,
  and 2,708 (Cora) samples estimate a correlation far better than the 140
  labelled training nodes would. No label is involved in the signals.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cgalr_jax.flax import tap


class MLP(nn.Module):
  """Dense LeakyReLU network; every hidden layer feeds the connectome."""

  hidden: Sequence[int] = (128, 64)
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    del train
    for i, width in enumerate(self.hidden):
      x = tap(self, nn.leaky_relu(nn.Dense(width)(x)), f"hidden{i + 1}")
    return nn.Dense(self.num_classes)(x)


class CNN(nn.Module):
  """Small image CNN: [conv3x3-LeakyReLU-tap-maxpool] x 2, then a dense head.

  Inputs may be flat (``[N, side * side]``); they are reshaped to
  ``[N, side, side, 1]``.
  """

  channels: Sequence[int] = (16, 32)
  num_classes: int = 10
  side: int = 28

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    del train
    if x.ndim == 2:
      x = x.reshape((x.shape[0], self.side, self.side, 1))
    for i, c in enumerate(self.channels):
      x = nn.leaky_relu(nn.Conv(c, (3, 3))(x))
      x = tap(self, x, f"conv{i + 1}")  # [N, H, W, C]: pooled per channel
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    return nn.Dense(self.num_classes)(x)


class _Linear(nn.Module):
  """``x @ kernel + bias`` that also takes a sparse (BCOO) ``x``.

  Same initialisation as ``nn.Dense`` (LeCun normal kernel, zero bias).
  """

  features: int

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (x.shape[-1], self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    return x @ kernel + bias


class GCN(nn.Module):
  """Two-layer GCN, ``A relu(A X W1) W2`` (Kipf & Welling), dropout 0.5.

  ``__call__(x, adj)`` takes all node features ``[num_nodes, d]`` and the
  normalised adjacency ``[num_nodes, num_nodes]``, dense arrays or
  ``jax.experimental.sparse.BCOO`` (the benchmark passes BCOO: the same
  matrices, about 20x less work on CPU), and returns logits of all nodes.
  Dropout (``"dropout"`` rng when ``train=True``) acts on the hidden
  features; Kipf's dropout on the sparse input features is left out.
  """

  hidden: int = 32
  num_classes: int = 7
  dropout: float = 0.5

  @nn.compact
  def __call__(self, x, adj, *, train: bool = False):
    h = adj @ _Linear(self.hidden)(x)
    h = tap(self, nn.relu(h), "hidden")
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    return adj @ _Linear(self.num_classes)(h)


def for_dataset(name: str, num_classes: int, *, arch: str | None = None
                ) -> nn.Module:
  """The model used for a dataset (``arch`` overrides: mlp, cnn, gcn)."""
  arch = arch or ("gcn" if name in ("cora", "citeseer") else "mlp")
  if arch == "mlp":
    return MLP(hidden=(128, 64), num_classes=num_classes)
  if arch == "cnn":
    return CNN(num_classes=num_classes)
  if arch == "gcn":
    return GCN(num_classes=num_classes)
  raise ValueError(f"unknown arch {arch!r}; expected mlp, cnn or gcn.")


def l2_penalty(params) -> jnp.ndarray:
  """Sum of squares of all kernels (biases excluded)."""
  leaves = jax.tree_util.tree_leaves_with_path(params)
  return sum(jnp.sum(v ** 2) for path, v in leaves
             if getattr(path[-1], "key", None) == "kernel")

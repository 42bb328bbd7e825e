"""Connectome-Guided Automatic Learning Rate (CG-ALR) for JAX and Optax.

He & Songdechakraiwut, "Connectome-Guided Automatic Learning Rates for Deep
Networks", arXiv:2510.23781 (2025).
"""

from cgalr_jax.gate import BOOST, BRAKE, HOLD, GateConfig
from cgalr_jax.measure import connectome
from cgalr_jax.schedules import robbins_monro
from cgalr_jax.topology import top_distance
from cgalr_jax.wd import wd_distance
from cgalr_jax.transform import (ScaleByConnectomeState, cgalr, diagnostics,
                                 scale_by_connectome)

__version__ = "0.1.0"

__all__ = [
    "BOOST",
    "BRAKE",
    "GateConfig",
    "HOLD",
    "ScaleByConnectomeState",
    "cgalr",
    "connectome",
    "diagnostics",
    "robbins_monro",
    "scale_by_connectome",
    "top_distance",
    "wd_distance",
]

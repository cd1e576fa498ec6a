"""Lookahead ("k steps forward, 1 step back") as a drop-in optax transformation."""

import importlib
import warnings
from typing import Any

from lookahead_optax import experimental, flax
from lookahead_optax._adaptive import AdaptiveAlpha, AdaptiveAlphaState, adaptive_alpha
from lookahead_optax._compose import check_composition
from lookahead_optax._flax import abstract_opt_state
from lookahead_optax._fused import update_and_apply
from lookahead_optax._hint import fused_path_taken
from lookahead_optax._lookahead import lookahead
from lookahead_optax._resize import replicate, resize_workers
from lookahead_optax._slow import slow_params
from lookahead_optax._state import LookaheadState, SyncStats
from lookahead_optax._static import next_call_syncs

__version__ = "0.4.0"
"""The version of this package (PEP 440), the same string as its distribution metadata."""

__all__ = [
    "LookaheadState",
    "SyncStats",
    "lookahead",
    "slow_params",
    "update_and_apply",
    "fused_path_taken",
    "next_call_syncs",
    "check_composition",
    "replicate",
    "resize_workers",
    "abstract_opt_state",
    "AdaptiveAlpha",
    "AdaptiveAlphaState",
    "adaptive_alpha",
    "experimental",
    "flax",
    "__version__",
]

# Top-level names of 0.3.0 that moved; importable from here, with a warning, until 0.5.0.
_MOVED = {
    "StaticSyncStep": "experimental",
    "default_formulation": "experimental",
    "offload_state": "experimental",
    "onload_state": "experimental",
    "memory_kinds_supported": "experimental",
    "nnx_slow_model": "flax",
    "nnx_update_batch_stats": "flax",
}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        module = _MOVED[name]
        warnings.warn(
            f"lookahead_optax.{name} moved to lookahead_optax.{module}.{name}; the old name "
            "goes in 0.5.0",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(f"lookahead_optax.{module}"), name)
    raise AttributeError(f"module 'lookahead_optax' has no attribute {name!r}")

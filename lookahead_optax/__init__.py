"""Lookahead ("k steps forward, 1 step back") as a drop-in optax transformation."""

from lookahead_optax._adaptive import AdaptiveAlpha, AdaptiveAlphaState, adaptive_alpha
from lookahead_optax._flax import abstract_opt_state, nnx_slow_model, nnx_update_batch_stats
from lookahead_optax._compose import check_composition
from lookahead_optax._fused import (
    StaticSyncStep,
    default_formulation,
    fused_path_taken,
    next_call_syncs,
    update_and_apply,
)
from lookahead_optax._lookahead import lookahead
from lookahead_optax._offload import memory_kinds_supported, offload_state, onload_state
from lookahead_optax._slow import slow_params
from lookahead_optax._state import LookaheadState, SyncStats
from lookahead_optax._workers import replicate, resize_workers

#: The version of this package (PEP 440), the same string as its distribution metadata.
__version__ = "0.3.0"

__all__ = [
    "LookaheadState",
    "SyncStats",
    "lookahead",
    "slow_params",
    "update_and_apply",
    "fused_path_taken",
    "next_call_syncs",
    "default_formulation",
    "StaticSyncStep",
    "offload_state",
    "onload_state",
    "memory_kinds_supported",
    "check_composition",
    "replicate",
    "resize_workers",
    "nnx_slow_model",
    "nnx_update_batch_stats",
    "abstract_opt_state",
    "AdaptiveAlpha",
    "AdaptiveAlphaState",
    "adaptive_alpha",
    "__version__",
]

"""Experimental: ways to run the sync that no accelerator has measured yet.

They work and are tested on the CPU, but whether they pay off depends on hardware they were
built for and never ran on (GPU conditionals, pinned host memory); they may change or go
once ``benchmarks/device.py`` has measured them there.

- :class:`StaticSyncStep`: two executables (sync and no sync) chosen from Python, with a
  Python-owned counter checked on the device; no conditional in either.
- :func:`offload_state` / :func:`onload_state` / :func:`memory_kinds_supported`: slow weights
  and outer state kept in pinned host memory between syncs.
- :func:`default_formulation`: the formulation ``update_and_apply`` uses per backend.
"""

from lookahead_optax._fused import default_formulation
from lookahead_optax._offload import memory_kinds_supported, offload_state, onload_state
from lookahead_optax._static import StaticSyncStep

__all__ = [
    "StaticSyncStep",
    "default_formulation",
    "memory_kinds_supported",
    "offload_state",
    "onload_state",
]

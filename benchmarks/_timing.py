"""Timing helpers for the benchmarks: interleaved rounds, per-round ratios, machine info.

Other processes share the CPU, so absolute times drift. Every contender is timed once
per round, in turn (A, B, C, A, B, C, ...), and each round gives one ratio against the
baseline timed in the same round; the median of those ratios is robust to the drift.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np


def machine_info() -> dict[str, Any]:
    """Versions and hardware, stored with every result file."""
    import optax

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    devices = jax.devices()
    return {
        "jax": jax.__version__,
        "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else None,
        "optax": optax.__version__,
        "python": platform.python_version(),
        "platform": jax.default_backend(),
        "device": devices[0].device_kind,
        "device_count": len(devices),
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "os": platform.platform(),
    }


def block(tree: Any) -> None:
    jax.tree.map(lambda x: x.block_until_ready() if hasattr(x, "block_until_ready") else x, tree)


def interleaved_rounds(
    runners: dict[str, Callable[[], float]],
    rounds: int,
    progress: Any = None,
) -> dict[str, list[float]]:
    """Calls each runner once per round, in turn; returns the seconds of each call.

    A runner times its own block of steps and returns the seconds per step. The
    order of runners rotates every round so no contender always runs first.
    """
    names = list(runners)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            seconds[name].append(runners[name]())
            if progress is not None:
                progress.update(1)
    return seconds


def ratio_summary(numerator: Sequence[float], denominator: Sequence[float]) -> dict[str, float]:
    """Median and range of per-round ratios numerator[i] / denominator[i]."""
    ratios = [n / d for n, d in zip(numerator, denominator, strict=True)]
    return {
        "median": statistics.median(ratios),
        "min": min(ratios),
        "max": max(ratios),
        "rounds": len(ratios),
    }


def time_summary(seconds: Sequence[float]) -> dict[str, float]:
    return {"median_s": statistics.median(seconds), "min_s": min(seconds)}


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    block(out)
    return out, time.perf_counter() - start


def tree_bytes(tree: Any) -> int:
    return int(sum(np.dtype(x.dtype).itemsize * x.size for x in jax.tree.leaves(tree)))

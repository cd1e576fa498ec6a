"""Argument checks: each mistake gets an error that names the argument and what is allowed."""

from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lookahead_optax._adaptive import AdaptiveAlpha
from lookahead_optax._comm import is_quantized

INNER_STATE_POLICIES = ("keep", "reset", "pullback")


MAX_K = 2**31 - 1  # the counters are int32


def is_traced(value: Any) -> bool:
    return isinstance(value, jax.core.Tracer)


def _is_int(value: Any) -> bool:
    """A Python or NumPy integer, not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def check_inner(inner: Any, name: str = "inner", example: str = "optax.adam(1e-3)") -> None:
    """Anything with ``init`` and ``update`` methods, as ``optax.chain`` accepts:
    GradientTransformations, ``optax.MultiSteps`` and other classes of that shape."""
    if isinstance(inner, optax.GradientTransformation):
        return
    if callable(getattr(inner, "init", None)) and callable(getattr(inner, "update", None)):
        return
    if callable(inner) and not hasattr(inner, "update"):
        hint = f": call it, e.g. {getattr(inner, '__name__', 'it')}(...)"
    else:
        hint = ""
    raise TypeError(
        f"{name} must be an optax GradientTransformation (e.g. {example}) or another object "
        f"with init and update methods (as optax.MultiSteps), got {inner!r}{hint}"
    )


def check_outer(outer: Any, alpha: Any, policy: str) -> None:
    check_inner(outer, "outer", "optax.sgd(0.7, momentum=0.9, nesterov=True)")
    if alpha is not None:
        raise ValueError(
            "outer replaces alpha (alpha=a is outer=optax.sgd(a)): pass one of them, got "
            f"outer={outer!r} and alpha={alpha!r}"
        )
    if policy == "pullback":
        raise ValueError(
            'inner_state="pullback" interpolates the inner state with alpha, which an outer '
            'optimizer does not have: with outer=..., use inner_state="keep" or "reset"'
        )


def check_k(k: Any) -> None:
    if is_traced(k):
        if not jnp.issubdtype(k.dtype, jnp.integer) or k.ndim != 0:
            raise ValueError(f"k must be a positive int, got a traced {k.dtype}{list(k.shape)}")
        return
    is_int_array = (
        isinstance(k, (np.ndarray, jax.Array, np.integer))
        and np.ndim(k) == 0
        and jnp.issubdtype(np.asarray(k).dtype, jnp.integer)
    )
    is_int = _is_int(k)
    if not (is_int or is_int_array) or not 1 <= int(k) <= MAX_K:
        raise ValueError(f"k must be a positive int (1, 2, ..., 2**31 - 1), got {k!r}")


def _is_real_scalar(value: Any) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return False
    if isinstance(value, numbers.Real):
        return True
    return (
        isinstance(value, (np.ndarray, jax.Array, np.generic))
        and np.ndim(value) == 0
        and (
            jnp.issubdtype(np.asarray(value).dtype, jnp.floating)
            or jnp.issubdtype(np.asarray(value).dtype, jnp.integer)
        )
    )


def check_alpha(alpha: Any) -> None:
    """A number in (0, 1], a schedule of the sync index into (0, 1], or adaptive_alpha."""
    if isinstance(alpha, AdaptiveAlpha) or is_traced(alpha):
        return
    allowed = (
        "alpha must be a float in (0, 1], a schedule (a callable of the sync index j = 0, 1, "
        "... returning a float in (0, 1]) or lookahead_optax.adaptive_alpha(...)"
    )
    if callable(alpha):
        # A schedule is cheap to evaluate: check its first two values now rather than
        # failing (or silently overshooting) at the first sync.
        for j in (0, 1):
            try:
                value = alpha(jnp.asarray(j, jnp.int32))
            # Any failure means "not a schedule".
            except Exception as error:  # noqa: BLE001
                raise ValueError(f"{allowed}; alpha({j}) raised {error!r}") from error
            if is_traced(value):
                return
            if not _is_real_scalar(value) or not 0.0 < float(value) <= 1.0:
                raise ValueError(f"{allowed}; alpha({j}) returned {value!r}")
        return
    if not _is_real_scalar(alpha) or not 0.0 < float(alpha) <= 1.0:
        raise ValueError(f"{allowed}, got {alpha!r}")


def check_inner_state_policy(policy: Any) -> None:
    if policy not in INNER_STATE_POLICIES:
        raise ValueError(f"inner_state must be one of {INNER_STATE_POLICIES}, got {policy!r}")


def check_slow_dtype(slow_dtype: Any, name: str = "slow_dtype") -> None:
    if slow_dtype is None:
        return
    if isinstance(slow_dtype, (jax.Array, np.ndarray, np.generic)) or is_traced(slow_dtype):
        raise ValueError(
            f"{name} must be a floating dtype (e.g. jnp.float32) or None, got the array "
            f"{slow_dtype!r}; under optax.inject_hyperparams pass "
            f"static_args=('{name}',) (a dtype is callable, so inject_hyperparams "
            "otherwise treats it as a schedule)"
        )
    try:
        floating = jnp.issubdtype(slow_dtype, jnp.inexact)
    except TypeError:
        floating = False
    if not floating:
        raise ValueError(
            f"{name} must be a floating dtype (e.g. jnp.float32) or None, got {slow_dtype!r}"
        )


def check_worker_count(workers: Any, name: str = "workers", allowed: str = "") -> int:
    """A number of workers: a positive Python or NumPy integer (not a bool, a float or an
    array), the same rule for lookahead(workers=...), replicate and resize_workers. Returns
    it as a Python int."""
    _check_static(name, workers)
    is_int = _is_int(workers)
    if not is_int or int(workers) < 1:
        raise ValueError(
            f"{name} must be a positive int (1, 2, ...; NumPy integers too){allowed}, "
            f"got {workers!r}"
        )
    return int(workers)


def check_workers(workers: Any, axis_name: Any, communication_dtype: Any, alpha: Any) -> None:
    if workers is not None:
        check_worker_count(workers, "workers", " or None")
        if axis_name is not None:
            raise ValueError(
                "workers and axis_name are two ways to say where the workers are: workers=N for "
                "a leading axis of size N on params, axis_name inside your own shard_map, pmap "
                f"or vmap; got workers={workers!r} and axis_name={axis_name!r}"
            )
    if (workers is not None or axis_name is not None) and isinstance(alpha, AdaptiveAlpha):
        raise ValueError("adaptive_alpha does not support workers or axis_name; pass a number")
    if communication_dtype is not None:
        if not is_quantized(communication_dtype):  # int8 / fp8: the quantized exchange
            check_slow_dtype(communication_dtype, "communication_dtype")
        if workers is None and axis_name is None:
            raise ValueError("communication_dtype needs workers=N or axis_name")


def _check_static(name: str, value: Any) -> None:
    if is_traced(value) or isinstance(value, jax.Array):
        raise ValueError(
            f"{name} must be a Python int, got the array {value!r}: under "
            f"optax.inject_hyperparams pass static_args=('{name}',)"
        )


def check_fragments(fragments: Any, k: Any, alpha: Any, policy: str) -> None:
    if fragments is None:
        return
    _check_static("fragments", fragments)
    is_int = _is_int(fragments)
    if not is_int or int(fragments) < 1:
        raise ValueError(f"fragments must be a positive int, got {fragments!r}")
    if fragments == 1:
        return
    if not is_traced(k) and int(k) % int(fragments) != 0:
        raise ValueError(
            f"k must be a multiple of fragments (fragment j syncs at step (j + 1) k / fragments "
            f"of each cycle): got k={k!r}, fragments={fragments!r}"
        )
    if policy != "keep" or isinstance(alpha, AdaptiveAlpha):
        raise ValueError(
            'fragments > 1 supports inner_state="keep" and a fixed alpha or an outer optimizer'
        )


def check_overlap(
    overlap: Any, mixing: Any, k: Any, fragments: int | None, alpha: Any = None
) -> None:
    """``overlap`` (tau) in [0, k / fragments) and ``mixing`` (a) in [0, 1], both static;
    no overlap with adaptive_alpha (its line search needs this step's pseudo-gradient)."""
    parts = 1 if fragments is None else int(fragments)
    if overlap is not None:
        _check_static("overlap", overlap)
        is_int = _is_int(overlap)
        if not is_int or int(overlap) < 0:
            raise ValueError(
                f"overlap must be an int in [0, k / fragments) (the steps a fragment's "
                f"average travels), got {overlap!r}"
            )
        if int(overlap) > 0:
            if isinstance(alpha, AdaptiveAlpha):
                raise ValueError(
                    "overlap > 0 does not support alpha=adaptive_alpha(...): its line search "
                    "needs the pseudo-gradient of the sync step; pass a number or outer="
                )
            if is_traced(k) or isinstance(k, jax.Array):
                raise ValueError(
                    "overlap > 0 needs k to be a Python int (the step at which a fragment's "
                    "pseudo-gradient is sent is fixed); under optax.inject_hyperparams pass "
                    "static_args=('k',)"
                )
            if int(overlap) >= int(k) // parts:
                raise ValueError(
                    f"overlap must be in [0, k / fragments) = [0, {int(k) // parts}): a "
                    f"fragment's average must land before its next pseudo-gradient is taken; "
                    f"got overlap={overlap!r} with k={k!r}, fragments={parts}"
                )
    if mixing is not None:
        _check_static("mixing", mixing)
        if not _is_real_scalar(mixing) or not 0.0 <= float(mixing) <= 1.0:
            raise ValueError(
                f"mixing must be a number in [0, 1] (theta <- phi + mixing (theta_local - phi) "
                f"at a sync; 0 lands on the slow weights), got {mixing!r}"
            )


def check_quantized(
    communication_dtype: Any,
    block: Any,
    error_feedback: Any,
    workers: Any,
    axis_name: Any,
) -> None:
    """int8/fp8 exchange: needs workers or axis_name; ``communication_block`` a positive int;
    ``error_feedback`` a bool, only with a quantized ``communication_dtype``."""
    quantized = is_quantized(communication_dtype)
    if block is not None:
        _check_static("communication_block", block)
        is_int = _is_int(block)
        if not is_int or int(block) < 1:
            raise ValueError(
                f"communication_block must be a positive int (values per scale in the "
                f"quantized exchange), got {block!r}"
            )
        if not quantized:
            raise ValueError(
                "communication_block is the block size of a quantized exchange: it needs "
                f"communication_dtype=jnp.int8 or a float8 dtype, got {communication_dtype!r}"
            )
    if error_feedback is not None and not isinstance(error_feedback, (bool, np.bool_)):
        raise ValueError(f"error_feedback must be True or False, got {error_feedback!r}")
    if error_feedback and not quantized:
        raise ValueError(
            "error_feedback=True keeps the quantization residual of a quantized exchange: it "
            "needs communication_dtype=jnp.int8 or a float8 dtype (jnp.float8_e4m3fn, "
            f"jnp.float8_e5m2), got communication_dtype={communication_dtype!r}"
        )
    if quantized and workers is None and axis_name is None:
        raise ValueError("a quantized communication_dtype needs workers=N or axis_name")


def check_arguments(
    inner, k, alpha, outer, policy, slow_dtype, workers, axis_name, communication_dtype,
    fragments, overlap, mixing, block, error_feedback, sync_stats,
) -> Any:  # fmt: skip
    """Every check of ``lookahead``'s arguments, in the order a user reads them; returns
    ``alpha`` with its default (0.5 unless ``outer`` is given)."""
    check_inner(inner)
    check_k(k)
    check_inner_state_policy(policy)
    check_slow_dtype(slow_dtype)
    if outer is None:
        alpha = 0.5 if alpha is None else alpha
        check_alpha(alpha)
    else:
        check_outer(outer, alpha, policy)
    check_workers(workers, axis_name, communication_dtype, alpha)
    if not isinstance(sync_stats, bool):
        raise ValueError(f"sync_stats must be True or False, got {sync_stats!r}")
    check_fragments(fragments, k, alpha, policy)
    check_overlap(overlap, mixing, k, fragments, alpha)
    check_quantized(communication_dtype, block, error_feedback, workers, axis_name)
    return alpha

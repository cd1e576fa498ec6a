"""Argument checks: each mistake gets an error that names the argument and what is allowed."""

from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lookahead_optax._adaptive import AdaptiveAlpha
from lookahead_optax._state import LookaheadState
from lookahead_optax._tree import is_inexact, is_masked

INNER_STATE_POLICIES = ("keep", "reset", "pullback")
MAX_K = 2**31 - 1  # the counters are int32


def is_traced(value: Any) -> bool:
    return isinstance(value, jax.core.Tracer)


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
    is_int = isinstance(k, numbers.Integral) and not isinstance(k, (bool, np.bool_))
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


def check_state(state: Any, config: Any = None) -> None:
    """The state ``update`` received must be one this lookahead's ``init`` made.

    Raises a ValueError naming what differs: not a LookaheadState; slow weights offloaded
    to host memory (:func:`lookahead_optax.experimental.offload_state`); or, given ``config``
    (the lookahead's options: anything with ``outer``, ``alpha``, ``policy``, ``fragments`` and
    ``where.workers``/``where.axis_name``), a state made by a lookahead built with other
    options (``outer=`` added to a run that used ``alpha``, ``workers`` added or removed,
    another ``inner_state`` policy, ``adaptive_alpha``, another outer optimizer or number
    of fragments).
    """
    if not isinstance(state, LookaheadState):
        raise ValueError(
            "opt_state must be the LookaheadState that this lookahead's init returned, got "
            f"{type(state).__name__}: pass the state of the same transformation"
        )
    check_on_device(state)
    if config is None:
        return
    mismatch = _option_mismatch(state, config)
    if mismatch:
        raise ValueError(
            f"opt_state was made by a lookahead built with other options: {mismatch}. Pass "
            "the state this transformation's init made, or build the transformation with the "
            "options the state was made with (to change options mid-run, start a new state "
            "with tx.init(lo.slow_params(opt_state, params)))"
        )


def _host_space() -> Any:
    space = getattr(getattr(jax, "memory", None), "Space", None)
    return getattr(space, "Host", None)


def check_on_device(state: LookaheadState) -> None:
    """The slow weights and outer state must be in device memory for ``tx.update``."""
    host = _host_space()
    if host is None:
        return
    for field in ("slow", "outer_state"):
        for x in jax.tree.leaves(getattr(state, field)):
            if isinstance(x, jax.Array) and getattr(jax.typeof(x), "memory_space", None) == host:
                raise ValueError(
                    f"opt_state holds the lookahead's {field} in host memory (offload_state): "
                    "tx.update and update_and_apply need them on the device. Bring them back "
                    "with lookahead_optax.experimental.onload_state(opt_state), or train "
                    "with lookahead_optax.experimental.StaticSyncStep(..., offload=True), "
                    "which moves them itself at the sync"
                )


def _workers_of(state: LookaheadState) -> str:
    stats = state.sync_stats
    if stats is None:
        return "neither workers nor axis_name"
    shape = np.shape(stats.worker_drift)
    return f"workers={shape[0]}" if shape else "axis_name"


def _option_mismatch(state: LookaheadState, config: Any) -> str:
    """What differs between the options ``state`` was made with and ``config``; "" if none."""
    where = config.where
    expected = (
        f"workers={where.workers}"
        if where.workers is not None
        else "axis_name"
        if where.axis_name is not None
        else "neither workers nor axis_name"
    )
    made = _workers_of(state)
    if made != expected:
        return f"the state was made with {made}, this lookahead has {expected}"
    pullback = config.policy == "pullback"
    if (state.cycle_start is not None) != pullback:
        made = "pullback" if state.cycle_start is not None else "keep or reset"
        return (
            f'the state was made with inner_state="{made}" (cycle_start is '
            f"{'set' if state.cycle_start is not None else 'None'}), this lookahead has "
            f"inner_state={config.policy!r}"
        )
    adaptive = isinstance(config.alpha, AdaptiveAlpha)
    if (state.adaptive is not None) != adaptive:
        return (
            "the state was made with alpha=adaptive_alpha(...), this lookahead has another alpha"
            if state.adaptive is not None
            else "this lookahead has alpha=adaptive_alpha(...), the state was made without it"
        )
    made_fragments = int(getattr(state, "fragments", 1))
    if made_fragments != int(config.fragments):
        return (
            f"the state was made with fragments={made_fragments}, this lookahead has "
            f"fragments={int(config.fragments)}"
        )
    overlap = int(getattr(config, "overlap", 0))
    if (getattr(state, "in_flight", None) is not None) != (overlap > 0):
        return f"this lookahead has overlap={overlap}, the state was made " + (
            "with overlap > 0 (it holds in_flight)" if overlap == 0 else "without overlap"
        )
    feedback = bool(getattr(config, "error_feedback", False))
    if (getattr(state, "residual", None) is not None) != feedback:
        return f"this lookahead has error_feedback={feedback}, the state was made " + (
            "with error_feedback=True (it holds residual)" if not feedback else "without it"
        )
    if config.outer is None:
        if state.outer_state is not None:
            return "the state was made with outer=..., this lookahead has alpha (no outer)"
        return ""
    if state.outer_state is None:
        return (
            "this lookahead has outer=..., the state was made with alpha (no outer state; "
            "0.2.0's and alpha's states have none)"
        )
    want = _outer_state_structure(config.outer, int(config.fragments), state.slow)
    if want is not None and jax.tree.structure(state.outer_state) != want:
        return (
            f"its outer_state does not have the structure that this lookahead's outer "
            f"optimizer makes with fragments={int(config.fragments)}: the state was made with "
            "another outer= or another number of fragments"
        )
    return ""


_OUTER_STRUCTURES: dict[tuple, tuple[Any, Any]] = {}


def _outer_state_structure(outer: Any, fragments: int, slow: Any) -> Any:
    """The tree structure of the outer state ``init`` makes for these slow weights (as the
    core makes it: one state per fragment, a tuple of them with several), or None if it
    cannot be computed. Cached: ``update`` may run eagerly, once per call."""
    from lookahead_optax._tree import fragment_trees

    leaves, treedef = jax.tree.flatten(slow, is_leaf=is_masked)
    key = (
        id(outer),
        fragments,
        treedef,
        tuple((np.shape(x), str(getattr(x, "dtype", type(x)))) for x in leaves),
    )
    cached = _OUTER_STRUCTURES.get(key)
    if cached is not None and cached[0] is outer:
        return cached[1]
    try:
        abstract = jax.tree.map(
            lambda x: x if is_masked(x) else jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x)),
            slow,
            is_leaf=is_masked,
        )
        states = jax.eval_shape(
            lambda: [outer.init(part) for part in fragment_trees(abstract, fragments)]
        )
    except Exception:  # noqa: BLE001 - no verdict rather than a wrong one
        return None
    structure = jax.tree.structure(states[0] if fragments == 1 else tuple(states))
    if len(_OUTER_STRUCTURES) > 64:
        _OUTER_STRUCTURES.clear()
    _OUTER_STRUCTURES[key] = (outer, structure)
    return structure


def _shapes(tree: Any) -> list[tuple]:
    return [np.shape(leaf) for leaf in jax.tree.leaves(tree)]


def check_worker_count(workers: Any, name: str = "workers", allowed: str = "") -> int:
    """A number of workers: a positive Python or NumPy integer (not a bool, a float or an
    array), the same rule for lookahead(workers=...), replicate and resize_workers. Returns
    it as a Python int."""
    _check_static(name, workers)
    is_int = isinstance(workers, numbers.Integral) and not isinstance(workers, (bool, np.bool_))
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
    is_int = isinstance(fragments, numbers.Integral) and not isinstance(fragments, (bool, np.bool_))
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


def _worker_axis_error(workers: int, name: str, path: str, shape: tuple, count: int) -> str:
    return (
        f"with workers={workers}, every leaf of {name} needs a leading worker axis of size "
        f"{workers}: {name}{path} has shape {shape} ({count} leaf/leaves lack it). Make the "
        f"params with lookahead_optax.replicate(params, {workers}) before tx.init (every "
        "worker starts from the same weights), and give grads the same axis (e.g. "
        "jax.vmap(jax.grad(loss))); or drop workers= for one set of params"
    )


def check_worker_axis(leaf: Any, workers: int, name: str = "params", path: str = "") -> None:
    shape = np.shape(leaf)
    if not shape or shape[0] != workers:
        raise ValueError(_worker_axis_error(workers, name, path, shape, 1))


def check_worker_axes(tree: Any, workers: int | None, name: str = "params") -> None:
    """With ``workers=N``, every leaf of ``tree`` must have a leading axis of size N (the
    error names ``workers`` and ``replicate``); nothing to check without workers."""
    if workers is None:
        return
    missing = [
        (jax.tree_util.keystr(path), np.shape(leaf))
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
        # Only arrays and numbers: optax.tree_map_params initialises with placeholders.
        if (hasattr(leaf, "shape") or isinstance(leaf, numbers.Number))
        and (not np.shape(leaf) or np.shape(leaf)[0] != workers)
    ]
    if missing:
        path, shape = missing[0]
        raise ValueError(_worker_axis_error(workers, name, path, shape, len(missing)))


def check_trees(updates: Any, params: Any, slow: Any, workers: int | None = None) -> None:
    """params and grads must have the structure and leaf shapes the state was made for."""
    if params is None:
        raise ValueError(
            "lookahead's update needs params: call tx.update(grads, opt_state, params)"
        )
    expected: Any = jax.tree.structure(slow, is_leaf=is_masked)  # PyTreeDef: no stubs
    for name, tree in (("params", params), ("grads (updates)", updates)):
        structure = jax.tree.structure(tree, is_leaf=is_masked)
        if structure != expected:
            raise ValueError(
                f"{name} must have the structure the state was initialised with: "
                f"expected {expected}, got {structure}"
            )
        check_worker_axes(tree, workers, name)
        lead = () if workers is None else (workers,)
        mismatched = [
            (jax.tree_util.keystr(path), np.shape(leaf), lead + np.shape(ref))
            for (path, leaf), ref in zip(
                jax.tree_util.tree_leaves_with_path(tree), jax.tree.leaves(slow)
            )
            if np.shape(leaf) != lead + np.shape(ref)
        ]
        if mismatched:
            path, got, want = mismatched[0]
            raise ValueError(
                f"{name} must have the leaf shapes the state was initialised with: "
                f"{name}{path} has shape {got}, expected {want} "
                f"({len(mismatched)} leaf/leaves differ)"
            )


QUANTIZED_DTYPES = ("int8", "int4", "int2", "float8_e4m3fn", "float8_e5m2")


def is_quantized(dtype: Any) -> bool:
    """int8 or fp8: exchanged as quantized blocks with scales (``_comm``), not by a mean."""
    if dtype is None or isinstance(dtype, (jax.Array, np.ndarray)) or is_traced(dtype):
        return False
    try:
        return jnp.dtype(dtype).name in QUANTIZED_DTYPES
    except TypeError:
        return False


def check_overlap(
    overlap: Any, mixing: Any, k: Any, fragments: int | None, alpha: Any = None
) -> None:
    """``overlap`` (tau) in [0, k / fragments) and ``mixing`` (a) in [0, 1], both static;
    no overlap with adaptive_alpha (its line search needs this step's pseudo-gradient)."""
    parts = 1 if fragments is None else int(fragments)
    if overlap is not None:
        _check_static("overlap", overlap)
        is_int = isinstance(overlap, numbers.Integral) and not isinstance(overlap, (bool, np.bool_))
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
        is_int = isinstance(block, numbers.Integral) and not isinstance(block, (bool, np.bool_))
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


def check_quantized_params(params: Any, communication_dtype: Any) -> None:
    """A quantized exchange averages floating params only: integer leaves (not synced) are
    fine, but every leaf being an integer one leaves nothing to quantize; complex leaves
    are refused (no complex int8/fp8)."""
    if not is_quantized(communication_dtype):
        return
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        if hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.complexfloating):
            raise ValueError(
                f"communication_dtype={jnp.dtype(communication_dtype).name} quantizes real "
                f"pseudo-gradients: params{jax.tree_util.keystr(path)} is complex "
                f"({leaf.dtype}); use a floating communication_dtype"
            )
    if not any(is_inexact(leaf) for leaf in jax.tree.leaves(params)):
        raise ValueError(
            f"communication_dtype={jnp.dtype(communication_dtype).name} quantizes floating "
            "pseudo-gradients, and params has no floating leaf (integer params never sync)"
        )

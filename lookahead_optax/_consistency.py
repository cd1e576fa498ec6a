"""Runtime checks: the state and trees that ``init``/``update`` receive fit this lookahead.

``_checks.py`` checks the arguments of ``lookahead(...)`` once; this module checks, on each
call, what those calls are given (a state made by another lookahead, offloaded slow weights,
params without the worker axis, trees of another structure). Each error names what differs.
"""

from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lookahead_optax._adaptive import AdaptiveAlpha
from lookahead_optax._comm import is_quantized
from lookahead_optax._state import LookaheadState
from lookahead_optax._tree import fragment_trees, is_inexact, is_masked


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

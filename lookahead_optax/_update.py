"""One lookahead's ``init`` and ``update``, given what it was built with (``Config``).

``update`` reads top to bottom as one step: decide which fragments sync (traced from the
counters, or decided by ``update_and_apply``), take the inner step, sync the fragments whose
turn it is (``_steps``: how XLA sees it; ``_sync``: the algorithm), land the params on the
new slow weights, apply the inner-state policy and advance the counters.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lookahead_optax import _comm, _consistency, _policies, _steps, _sync, _workers
from lookahead_optax._adaptive import AdaptiveAlpha
from lookahead_optax._state import LookaheadState
from lookahead_optax._tree import (
    floats_only,
    fragment_trees,
    is_inexact,
    is_masked,
    slow_dtype_for,
)


class Config(NamedTuple):
    """What ``lookahead`` was built with, checked and normalised."""

    inner: optax.GradientTransformationExtraArgs
    stepper: optax.GradientTransformationExtraArgs  # inner, per worker with ``workers``
    k: int | jax.Array
    alpha: Any  # None with an outer optimizer
    outer: optax.GradientTransformationExtraArgs | None
    policy: str
    slow_dtype: Any
    where: _sync.Where
    fragments: int
    overlap: int = 0  # tau: steps a fragment's average travels (_steps.run_overlapped)
    mixing: float = 0.0  # a: a sync lands on phi + a (theta - phi)
    error_feedback: bool = False  # quantization residuals in the state (_comm)


def init(config: Config, params: optax.Params) -> LookaheadState:
    where = config.where
    _consistency.check_worker_axes(params, where.workers)  # before vmap's own rank error
    _consistency.check_quantized_params(params, where.communication_dtype)

    def copy(p):
        # A real copy (not an alias of params), so params and state can both be donated.
        p = jnp.asarray(p)
        if where.workers is not None:  # the shared slow weights start at worker 0's params
            _consistency.check_worker_axis(p, where.workers)
            p = _workers.first_worker(p)
        dtype = slow_dtype_for(p, config.slow_dtype) if is_inexact(p) else None
        return jnp.array(p, dtype=dtype, copy=True)

    inner_init = config.stepper.init(params)
    slow = jax.tree.map(copy, params)
    if config.policy != "keep":
        _policies.params_mask(config.inner, inner_init, config.policy)  # fail now
    outer_states = (
        [None] * config.fragments
        if config.outer is None
        else [config.outer.init(part) for part in fragment_trees(slow, config.fragments)]
    )
    return LookaheadState(
        inner_state=inner_init,
        slow=slow,
        count=jnp.zeros([], jnp.int32),
        syncs=jnp.zeros([], jnp.int32),
        period=jnp.asarray(config.k, jnp.int32),
        # A separate copy: aliasing inner_state would break donating the state.
        cycle_start=(
            jax.tree.map(lambda x: jnp.array(x, copy=True), inner_init)
            if config.policy == "pullback"
            else None
        ),
        adaptive=(
            config.alpha.init(params, inner_init)
            if isinstance(config.alpha, AdaptiveAlpha)
            else None
        ),
        outer_state=_pack(outer_states, config),
        sync_stats=_workers.initial_stats(params, where),
        in_flight=(
            jax.tree.map(
                lambda s: s if is_masked(s) else jnp.zeros_like(s),
                floats_only(slow),
                is_leaf=is_masked,
            )
            if config.overlap
            else None
        ),
        residual=_comm.residual_init(params, slow) if config.error_feedback else None,
        fragments=config.fragments,
        mixing=config.mixing,
    )


def _pack(outer_states: list[Any], config: Config) -> Any:
    """The state's ``outer_state``: one fragment's as it is, several as a tuple; None for alpha."""
    if config.outer is None:
        return None
    return outer_states[0] if config.fragments == 1 else tuple(outer_states)


def _unpack(outer_state: Any, config: Config) -> list[Any]:
    if config.outer is None:
        return [None] * config.fragments
    return [outer_state] if config.fragments == 1 else list(outer_state)


def update(config, updates, state, params, sync: bool | None, extra_args):
    """One step: ``sync`` decided in Python (True/False), or None: traced from the state."""
    params = jax.tree.map(jnp.asarray, params)  # Python-float leaves, as optax allows
    count = state.count + 1
    syncs: list[Any]  # per fragment: a Python bool (decided) or traced
    if sync is None:
        wrap = count >= state.period
        syncs = _steps.fragment_syncs(count, state.period, config.fragments)
    else:
        wrap, syncs = sync, [sync]

    def inner_step(inner_state):
        return config.stepper.update(updates, inner_state, params, **extra_args)

    adaptive = isinstance(config.alpha, AdaptiveAlpha)
    first = (
        sync is not None or adaptive or _steps.has_effects(lambda: inner_step(state.inner_state))
    )
    inner_result = inner_step(state.inner_state) if first else None  # notes 4 and 5
    step_alpha, adaptive_state = _step_alpha(config, state, wrap, updates, params, inner_result)
    outer_step = (
        _sync.alpha_step(step_alpha) if config.outer is None else _sync.optax_step(config.outer)
    )
    parts = fragment_trees(state.slow, config.fragments)
    outer_in = _unpack(state.outer_state, config)
    in_flight = state.in_flight
    if config.overlap:
        new_parts, outer_states, stats, in_flight, residual = _steps.overlapped(
            config, state, parts, outer_in, params, outer_step, syncs
        )
        inner_updates, new_inner_state = (
            inner_step(state.inner_state) if inner_result is None else inner_result
        )
    else:
        new_parts, outer_states, stats, residual, (inner_updates, new_inner_state) = (
            _steps.synced(
                config, state, parts, outer_in, params, outer_step, syncs, inner_step,
                inner_result,
            )
        )  # fmt: skip
    new_slow, new_updates = _sync.land(
        state.slow, new_parts, syncs, params, inner_updates, config.mixing
    )
    new_inner_state, cycle_start = _policies.at_sync(
        config.policy, config.inner, config.stepper.init, wrap, new_inner_state,
        state.cycle_start, new_slow, params, step_alpha,
    )  # fmt: skip
    return new_updates, LookaheadState(
        inner_state=new_inner_state,
        slow=new_slow,
        count=jnp.where(wrap, 0, count).astype(jnp.int32),
        syncs=jnp.where(wrap, optax.safe_increment(state.syncs), state.syncs),
        period=jnp.where(wrap, jnp.asarray(config.k).astype(jnp.int32), state.period),
        cycle_start=cycle_start,
        adaptive=adaptive_state,
        outer_state=_pack(outer_states, config),
        sync_stats=stats,
        in_flight=in_flight,
        residual=residual,
        fragments=config.fragments,
        mixing=config.mixing,
    )


def _step_alpha(config, state, wrap, updates, params, inner_result):
    """This call's alpha (None with an outer optimizer) and the adaptive state."""
    if config.outer is not None:
        return None, state.adaptive
    if isinstance(config.alpha, AdaptiveAlpha):
        inner_updates, new_inner_state = inner_result
        return config.alpha.step(
            jnp.asarray(wrap), updates, inner_updates, params, state.slow, new_inner_state,
            state.adaptive,
        )  # fmt: skip
    alpha = config.alpha(state.syncs) if callable(config.alpha) else config.alpha
    return jnp.asarray(alpha), state.adaptive

"""How one update is arranged for XLA: the sync decided in Python, or traced.

Measured on CPU with benchmarks/speed.py: simpler forms cost 2.5-4x the inner step and a
params-sized temporary buffer. The notes, referred to by number elsewhere:

1. The sync's ``lax.cond`` touches only the step's inputs. Its sync branch recomputes the
   inner update from (grads, inner state, params) instead of taking it as an operand: an
   inner update that flows into a cond is written to memory on every step. The non-sync
   branch passes the slow weights (an input) through, free when donated.
2. The returned update is one elementwise select in which the inner update appears once,
   so XLA fuses it with the inner optimizer's arithmetic and the caller's
   ``apply_updates``: it is never written to memory (``_sync.update_onto_slow``).
3. The cond also returns a scalar True that gates the inner state read by the inner step
   (``where(True, s, 0)`` is ``s`` exactly and fuses into its one consumer). The data
   dependence runs the inner step after the cond; without it XLA cannot tell that the
   cond reads the old inner state before the inner step overwrites it in place
   (donation), and copies every params-sized inner state leaf on every step.
4. Recomputing (note 1) would run the inner optimizer's effects (``jax.debug.callback``)
   twice on sync steps. When the inner update has effects, or its result is needed before
   the sync (adaptive alpha), it is computed once, before the cond, and passed in: the
   price is one params-sized write per step.
5. With the sync decided in Python (``update_and_apply``, whose ``lax.cond`` is around the
   whole step) there is no cond here: the non-sync step is the inner step and never reads
   the slow weights; the sync step computes the inner update once, fused with the slow
   step and the caller's apply.

Streaming (``fragments``) is the same arrangement once per fragment: one cond each.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from lookahead_optax import _sync
from lookahead_optax._tree import fragment_of, gated, is_empty, merged

InnerStep = Callable[[Any], tuple[Any, Any]]  # inner state -> (updates, new inner state)
SyncPart = Callable[[int, Any, Any, Any], tuple[Any, Any, Any]]  # j, u, outer, stats -> ...


def has_effects(fn: Callable[[], Any]) -> bool:
    """Whether tracing ``fn`` records side effects (callbacks, prints, ordered IO)."""
    return bool(jax.make_jaxpr(fn)().effects)


def fragment_syncs(count: jax.Array, period: jax.Array, fragments: int) -> list[jax.Array]:
    """Whether each fragment syncs on the call that makes ``count`` steps of the cycle.

    Fragment j syncs at step ``max(1, (j + 1) period // fragments)``; the last one at the
    end of the cycle. A live ``period`` below ``fragments`` syncs several fragments on one
    call rather than none.
    """
    last = [count >= period]
    firsts = [count == jnp.maximum(1, (j + 1) * period // fragments) for j in range(fragments - 1)]
    return firsts + last


def run(
    syncs: Sequence[bool | jax.Array],
    parts: Sequence[Any],
    outer_states: Sequence[Any],
    stats: Any,
    sync_part: SyncPart,
    inner_step: InnerStep,
    inner_state: Any,
    inner_result: tuple[Any, Any] | None,
) -> tuple[list[Any], list[Any], Any, tuple[Any, Any]]:
    """The syncs of every fragment and the inner step, arranged per the notes above.

    ``syncs`` are Python bools (note 5: ``inner_result`` given) or traced; ``inner_result``
    is the inner step's result when it must run first (note 4), else None (notes 1 and 3).
    Returns the new fragments, outer states, stats and the inner step's result.
    """
    new_parts, new_outer, gates = list(parts), list(outer_states), []
    for j, (synced, part) in enumerate(zip(syncs, parts)):
        if is_empty(part) or synced is False:
            continue

        def sync_branch(j=j, stats=stats):
            updates = inner_step(inner_state)[0] if inner_result is None else inner_result[0]
            return *sync_part(j, updates, outer_states[j], stats), jnp.array(True)

        if synced is True:
            new_parts[j], new_outer[j], stats, _ = sync_branch()
            continue
        unchanged = (parts[j], outer_states[j], stats, jnp.array(True))
        new_parts[j], new_outer[j], stats, gate = jax.lax.cond(
            synced, sync_branch, lambda unchanged=unchanged: unchanged
        )
        gates.append(gate)
    if inner_result is None:  # notes 1 and 3
        # One gate is used as it is: reducing a stack of one moved one fusion in XLA:CPU's
        # schedule, and the runtime lost its overlap of independent kernels on two cores
        # (1.5x per step at 64K params in 4 leaves, benchmarks/before_after.py).
        gate = gates[0] if len(gates) == 1 else jnp.all(jnp.stack([True, *gates]))
        inner_result = inner_step(jax.tree.map(lambda s: gated(s, gate), inner_state))
    return new_parts, new_outer, stats, inner_result


def fragment_sends(count: jax.Array, period: jax.Array, fragments: int, overlap: int) -> list:
    """With ``overlap`` (tau > 0): whether each fragment's pseudo-gradient is sent on this call.

    ``count`` is the state's (steps taken this cycle). Fragment j syncs at step
    ``s_j = max(1, (j + 1) period // fragments)``; its pseudo-gradient is that of the fast
    weights after step ``s_j - overlap``, which are the params this call receives when
    ``count == s_j - overlap``. Taking them from the params (not from this call's inner
    update) means the send reads only the call's inputs: nothing of the call's own inner
    step waits for it, and the collective can run beside the caller's forward and backward
    passes (``overlap == 1``) or the steps in between.
    """
    syncs_at = [jnp.maximum(1, (j + 1) * period // fragments) for j in range(fragments - 1)]
    return [count == at - overlap for at in [*syncs_at, period]]


def run_overlapped(
    sends: Sequence[jax.Array],
    syncs: Sequence[jax.Array],
    parts: Sequence[Any],
    in_flight: list[Any],
    outer_states: Sequence[Any],
    stats: Any,
    residuals: list[Any],
    send_part: Callable[..., tuple[Any, Any, Any]],
    apply_part: Callable[..., tuple[Any, Any]],
    sends_first: bool = True,
) -> tuple[list[Any], list[Any], list[Any], Any, list[Any]]:
    """The sends and syncs of an overlapped lookahead (``overlap > 0``), one cond each.

    A send (``send_part(j, stats, residual) -> (average, stats, residual)``) reads the
    params and slow weights only; a sync (``apply_part(j, average, outer_state) -> (slow
    part, outer_state)``) reads the average in flight and the outer state only. Neither
    recomputes nor gates the inner step (notes 1 and 3 do not apply): the inner step runs
    once, outside, and no cond's result feeds it. With ``overlap == 1`` a fragment is sent
    and synced on the same call, so the sends come first (``sends_first``); with ``overlap
    >= 2`` no call syncs what it sends, the syncs come first and read the averages of the
    state: nothing of the sending call reads its collective's result but the new state.
    Returns the new parts, outer states, averages in flight, stats and residuals.
    """
    new_parts, new_outer = list(parts), list(outer_states)
    in_flight, residuals = list(in_flight), list(residuals)

    def send_all(stats: Any) -> Any:
        for j, part in enumerate(parts):
            if is_empty(part):
                continue
            kept = (in_flight[j], stats, residuals[j])
            in_flight[j], stats, residuals[j] = jax.lax.cond(
                sends[j],
                lambda j=j, stats=stats: send_part(j, stats, residuals[j]),
                lambda kept=kept: kept,
            )
        return stats

    def apply_all() -> None:
        for j, part in enumerate(parts):
            if is_empty(part):
                continue
            new_parts[j], new_outer[j] = jax.lax.cond(
                syncs[j],
                lambda j=j: apply_part(j, in_flight[j], outer_states[j]),
                lambda j=j: (parts[j], outer_states[j]),
            )

    if sends_first:
        stats = send_all(stats)
        apply_all()
    else:
        apply_all()
        stats = send_all(stats)
    return new_parts, new_outer, in_flight, stats, residuals


def synced(config, state, parts, outer_in, params, outer_step, syncs, inner_step, inner_result):
    """The syncs without overlap (:func:`run`) of the lookahead built as ``config``: the new
    fragments, outer states, stats, residual and the inner step's result. With error
    feedback each fragment's residual travels through the cond beside its outer state."""
    where, feedback = config.where, config.error_feedback
    if feedback:
        outer_in = [(o, fragment_of(part, state.residual)) for o, part in zip(outer_in, parts)]

    def sync_part(j, inner_updates, outer_state, stats):
        if not feedback:
            return _sync.sync(
                parts[j], outer_state, stats, params, inner_updates, outer_step, where
            )
        outer_state, res = outer_state
        delta, stats, res = _sync.average(parts[j], stats, params, inner_updates, where, res)
        new_part, outer_state = _sync.apply_outer(parts[j], delta, outer_state, outer_step)
        return new_part, (outer_state, res), stats

    new_parts, outer_out, stats, inner = run(
        syncs, parts, outer_in, state.sync_stats, sync_part, inner_step, state.inner_state,
        inner_result,
    )  # fmt: skip
    residual = state.residual
    if feedback:
        residual = merged(residual, [res for _, res in outer_out])
        outer_out = [o for o, _ in outer_out]
    return new_parts, outer_out, stats, residual, inner


def overlapped(config, state, parts, outer_in, params, outer_step, syncs):
    """The sends and syncs of ``overlap > 0`` (:func:`run_overlapped`): the new fragments,
    outer states, stats, averages in flight and residual."""
    sends = fragment_sends(state.count, state.period, config.fragments, config.overlap)
    where, feedback = config.where, config.error_feedback
    zeros = jax.tree.map(jnp.zeros_like, params)  # Delta = phi - p: the params are theta

    def send_part(j, stats, res):
        return _sync.average(parts[j], stats, params, zeros, where, res)

    def apply_part(j, average, outer_state):
        return _sync.apply_outer(parts[j], average, outer_state, outer_step)

    flights = [fragment_of(part, state.in_flight) for part in parts]
    residuals = [fragment_of(part, state.residual) if feedback else None for part in parts]
    new_parts, outer_out, flights, stats, residuals = run_overlapped(
        sends, syncs, parts, flights, outer_in, state.sync_stats, residuals, send_part,
        apply_part, sends_first=config.overlap == 1,
    )  # fmt: skip
    residual = merged(state.residual, residuals) if feedback else state.residual
    return new_parts, outer_out, stats, merged(state.in_flight, flights), residual

r"""The algorithm: one sync of the slow weights.

With :math:`\phi` the slow weights, :math:`\theta_w = p_w + u_w` worker w's fast weights
after this call's inner update (one worker unless ``workers``/``axis_name``) and N workers:

.. math::
    \Delta = \phi - \tfrac1N \textstyle\sum_w \theta_w, \qquad
    (v, s) = \mathrm{outer}(\Delta, s, \phi), \qquad
    \phi \leftarrow \phi + v, \qquad \theta_w \leftarrow \phi.

Lookahead (Zhang et al. 2019, Algorithm 1) is ``outer = -alpha * Delta``
(:math:`\phi \leftarrow \phi + \alpha(\theta - \phi)`); SNOO and DiLoCo take
``optax.sgd(lr, momentum, nesterov=True)``. A sync acts on one fragment of the leaves at a
time (all of them unless ``fragments``); each fragment has its own outer state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lookahead_optax import _comm, _workers
from lookahead_optax._state import SyncStats
from lookahead_optax._tree import is_inexact, is_masked, match_types, merged, promote, widened

OuterStep = Callable[[Any, Any, Any], tuple[Any, Any]]  # (Delta, outer state, phi) -> (v, state)


class Where(NamedTuple):
    """Where the workers are: ``workers`` (a leading axis) or ``axis_name`` (a collective)."""

    workers: int | None
    axis_name: Any
    communication_dtype: Any
    stats: bool = False  # compute SyncStats at each sync (lookahead's sync_stats)
    block: int = 256  # values per scale of a quantized (int8/fp8) exchange (_comm)


def alpha_step(alpha: jax.Array) -> OuterStep:
    """Lookahead's slow step as an outer step: ``v = -alpha Delta`` (``optax.sgd(alpha)``)."""

    def step(delta: Any, outer_state: Any, slow: Any) -> tuple[Any, Any]:
        return jax.tree.map(lambda d: d * -alpha.astype(d.dtype), delta), outer_state

    return step


def optax_step(outer: optax.GradientTransformationExtraArgs) -> OuterStep:
    """Any optax transformation of the pseudo-gradient, with the slow weights as its params."""

    def step(delta: Any, outer_state: Any, slow: Any) -> tuple[Any, Any]:
        updates, new_state = outer.update(delta, outer_state, slow)
        return updates, match_types(new_state, outer_state)

    return step


def _pseudo_gradient(s: Any, p: Any, u: Any) -> Any:
    return s - (p.astype(s.dtype) + jnp.asarray(u).astype(s.dtype))


def pseudo_gradient(slow: Any, params: Any, inner_updates: Any) -> Any:
    """``phi - (p + u)`` per worker, in the slow dtype; masked where ``slow`` is."""

    def one(s: Any, p: Any, u: Any) -> Any:
        return s if is_masked(s) else _pseudo_gradient(s, p, u)

    return jax.tree.map(one, slow, params, inner_updates, is_leaf=is_masked)


def _per_worker(slow: Any, params: Any, inner_updates: Any, where: Where) -> Any:
    """Each leaf's pseudo-gradients, as the worker mean takes them.

    Where the worker axis lies whole on each device (one device, or a mesh that does not
    shard it), a list with one entry per worker, each computed from that worker's slice:
    the mean is then a sum of slices, one elementwise pass that XLA fuses with the inner
    update's arithmetic and writes straight into the slow weights (pseudo-gradients
    computed for all workers at once and then sliced read the slow weights through a
    broadcast, which XLA does not update in place: a copy of every leaf). Elsewhere the
    stacked pseudo-gradients, whose mean over the axis is the one all-reduce.
    """

    def one(s: Any, p: Any, u: Any) -> Any:
        if is_masked(s):
            return s
        if where.workers is None or not _workers.worker_axis_is_local(p):
            return _pseudo_gradient(s, p, u)
        u = jnp.asarray(u)
        return [_pseudo_gradient(s, p[w], u[w]) for w in range(where.workers)]

    return jax.tree.map(one, slow, params, inner_updates, is_leaf=is_masked)


def sync(
    slow: Any,
    outer_state: Any,
    stats: SyncStats | None,
    params: Any,
    inner_updates: Any,
    outer_step: OuterStep,
    where: Where,
) -> tuple[Any, Any, SyncStats | None]:
    """One sync of the (fragment's) slow weights ``slow``: new slow, outer state and stats."""
    delta, stats, _ = average(slow, stats, params, inner_updates, where)
    new_slow, outer_state = apply_outer(slow, delta, outer_state, outer_step)
    return new_slow, outer_state, stats


def average(
    slow: Any,
    stats: SyncStats | None,
    params: Any,
    inner_updates: Any,
    where: Where,
    residual: Any = None,
) -> tuple[Any, SyncStats | None, Any]:
    """The workers' averaged pseudo-gradient of the fragment ``slow``: the communication.

    A quantized ``communication_dtype`` (int8, fp8) takes ``_comm.quantized_mean``; with
    ``residual`` (error feedback: one entry per leaf of ``slow``, per worker) it is added
    to each worker's pseudo-gradient first and the new residual returned (else None).
    """
    per_worker = _per_worker(slow, params, inner_updates, where)
    treedef: Any = jax.tree.structure(slow, is_leaf=is_masked)  # PyTreeDef: no stubs
    flat_per_worker = treedef.flatten_up_to(per_worker)
    if _comm.is_quantized(where.communication_dtype):
        flat_residual = None if residual is None else treedef.flatten_up_to(residual)
        flat_delta, flat_residual = _comm.quantized_mean(flat_per_worker, where, flat_residual)
        delta = treedef.unflatten(flat_delta)
        residual = None if flat_residual is None else treedef.unflatten(flat_residual)
    else:
        delta = treedef.unflatten([_workers.mean(w, where) for w in flat_per_worker])
    if stats is not None and where.stats:
        stats = _workers.sync_stats(flat_per_worker, treedef.flatten_up_to(delta), stats, where)
    return delta, stats, residual


def apply_outer(slow: Any, delta: Any, outer_state: Any, outer_step: OuterStep) -> tuple[Any, Any]:
    """The outer step on an averaged pseudo-gradient: the new slow weights and outer state."""
    moves, outer_state = outer_step(delta, outer_state, slow)
    new_slow = jax.tree.map(
        lambda s, v: s if is_masked(s) else s + v.astype(s.dtype), slow, moves, is_leaf=is_masked
    )
    return new_slow, outer_state


def update_onto_slow(slow: Any, p: Any, u: Any, synced: bool | jax.Array) -> Any:
    """The returned update: ``slow - p`` where ``synced``, else the inner update ``u``.

    ``synced`` is a Python bool (no select) or traced (one select that XLA fuses with the
    inner optimizer's arithmetic and the caller's ``apply_updates``: the inner update is
    never written to memory). The dtype is the wider of ``u``'s and ``p``'s: f32 params
    with bf16 grads land on f32 slow weights. ``p + (slow - p)`` is ``slow`` (in the params'
    dtype) exactly when ``slow / 2 <= p <= 2 slow`` (Sterbenz); otherwise it is within half
    an ulp of ``|slow - p|`` (``update_and_apply`` lands exactly: it sets the params itself).
    """
    if is_masked(slow) or not is_inexact(p):
        return u
    u = jnp.asarray(u)
    out_dtype = promote(u.dtype, p.dtype)
    if synced is False:
        return u.astype(out_dtype)
    # Aim at phi as the params can hold it: with bf16 params and f32 slow weights, the
    # difference of two bf16 numbers is exact (Sterbenz) where a rounded f32 one is not.
    wide = promote(slow.dtype, p.dtype)
    target = widened(widened(slow, p.dtype), wide)
    to_slow = (target - p.astype(wide)).astype(out_dtype)
    return to_slow if synced is True else jnp.where(synced, to_slow, u.astype(out_dtype))


def update_onto_mix(slow: Any, p: Any, u: Any, synced: bool | jax.Array, mixing: float) -> Any:
    """As :func:`update_onto_slow`, but a sync lands on ``phi + mixing (p + u - phi)``.

    torchft's ``fragment_update_alpha`` (``p.lerp_(local, a)``): each worker keeps a
    fraction ``mixing`` of its own progress past the new slow weights. ``mixing=0`` is
    :func:`update_onto_slow` (it is called instead, bit for bit); ``mixing=1`` keeps the
    fast weights (the sync moves only the slow weights).
    """
    if is_masked(slow) or not is_inexact(p) or mixing == 0:
        return update_onto_slow(slow, p, u, synced)
    u = jnp.asarray(u)
    out_dtype = promote(u.dtype, p.dtype)
    if synced is False:
        return u.astype(out_dtype)
    wide = promote(slow.dtype, p.dtype)
    local = p.astype(wide) + u.astype(wide)
    phi = slow.astype(wide)
    target = phi + jnp.asarray(mixing, wide) * (local - phi)
    to_mix = (target.astype(p.dtype).astype(wide) - p.astype(wide)).astype(out_dtype)
    return to_mix if synced is True else jnp.where(synced, to_mix, u.astype(out_dtype))


def land(
    slow: Any,
    new_parts: list[Any],
    syncs: list[Any],
    params: Any,
    inner_updates: Any,
    mixing: float = 0.0,
) -> tuple[Any, Any]:
    """The new slow weights (each leaf from its fragment) and the returned updates: onto
    the slow weights of the leaves whose fragment synced, the inner update elsewhere."""
    new_slow = merged(slow, new_parts)
    no_sync = jax.tree.map(lambda s: s if is_masked(s) else False, slow, is_leaf=is_masked)
    flags = merged(no_sync, [
        jax.tree.map(lambda s, j=j: s if is_masked(s) else syncs[j], part, is_leaf=is_masked)
        for j, part in enumerate(new_parts)
    ])  # fmt: skip
    onto = update_onto_mix if mixing else update_onto_slow
    extra = (mixing,) if mixing else ()
    new_updates = jax.tree.map(
        lambda s, p, u, flag: onto(s, p, u, flag, *extra),
        new_slow, params, inner_updates, flags, is_leaf=is_masked,
    )  # fmt: skip
    return new_slow, new_updates

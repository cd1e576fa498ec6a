"""Many workers (DiLoCo): params with a leading worker axis."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lookahead_optax._state import SyncStats
from lookahead_optax._tree import match_types


def replicate(params: optax.Params, workers: int) -> optax.Params:
    """``params`` copied onto a new leading worker axis of size ``workers``.

    The starting point of ``lookahead(..., workers=N)``: every worker starts
    from the same weights (the shared slow weights start as worker 0's). Real
    copies, so the result can be donated to a jitted step.

    Args:
      params: One worker's params.
      workers: The number of workers N.

    Returns:
      A pytree like ``params`` whose leaves have shape ``(N, *leaf.shape)``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import lookahead_optax as lo
      >>> lo.replicate({"w": jnp.array([1.0, -2.0])}, 3)["w"].shape
      (3, 2)
    """
    return jax.tree.map(lambda p: jnp.repeat(jnp.asarray(p)[None], workers, axis=0), params)


def resize_workers(
    opt_state: optax.OptState, params: optax.Params, workers: int
) -> tuple[optax.Params, optax.OptState]:
    """Params and state of a ``workers=N`` run, for ``workers`` workers (a machine lost or added).

    What is kept and what is new:

    - The shared slow weights, the outer optimizer's state (its momentum), the
      counters and the sync statistics' norm are kept as they are: the run
      continues the same outer trajectory, and the cycle under way ends at the
      same step.
    - Workers 0 .. min(N, workers) - 1 keep their fast weights and inner
      states (a lost worker's progress since the last sync is dropped).
    - A new worker starts at the slow weights with a copy of worker 0's inner
      state (its moments and counters), so every worker's state has the same
      dtypes and step counts.

    Build the transformation again with ``workers=workers`` and continue with
    the returned ``(params, opt_state)``. Restore a checkpoint first with the
    shapes it was saved with (``lo.abstract_opt_state`` of the old ``tx``).

    Args:
      opt_state: A state holding a ``LookaheadState`` of a ``workers=N`` run.
      params: Its params, with a leading worker axis of size N.
      workers: The new number of workers.

    Returns:
      ``(params, opt_state)`` with a leading worker axis of size ``workers``.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> import lookahead_optax as lo
      >>> tx = lo.lookahead(optax.adam(0.1), k=3, workers=4)
      >>> params = lo.replicate({"w": jnp.array([1.0, -2.0])}, 4)
      >>> opt_state = tx.init(params)
      >>> params, opt_state = lo.resize_workers(opt_state, params, 2)
      >>> params["w"].shape, opt_state.inner_state[0].mu["w"].shape
      ((2, 2), (2, 2))
    """
    from lookahead_optax._state import replace_states, the_state

    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ValueError(f"workers must be a positive int, got {workers!r}")
    state = the_state(opt_state, "resize_workers' opt_state")
    old = jax.tree.leaves(params)[0].shape[0]

    def resize(x, fill):
        x = jnp.asarray(x)
        if workers <= old:
            return x[:workers]
        extra = jnp.broadcast_to(jnp.asarray(fill, x.dtype), (workers - old, *x.shape[1:]))
        return jnp.concatenate([x, extra])

    new_params = jax.tree.map(resize, params, jax.tree.map(jnp.asarray, state.slow))
    first_inner = jax.tree.map(lambda x: jnp.asarray(x)[0], state.inner_state)
    new_inner = jax.tree.map(resize, state.inner_state, first_inner)
    cycle_start = state.cycle_start
    if cycle_start is not None:
        first = jax.tree.map(lambda x: jnp.asarray(x)[0], cycle_start)
        cycle_start = jax.tree.map(resize, cycle_start, first)
    stats = state.sync_stats
    if stats is not None:
        stats = stats._replace(worker_drift=resize(stats.worker_drift, 0.0))
    new_state = state._replace(inner_state=new_inner, cycle_start=cycle_start, sync_stats=stats)
    new_opt_state = replace_states(lambda _: new_state, opt_state)
    return new_params, new_opt_state


# --- The worker machinery of lookahead(workers=N / axis_name=...) -----------------------------


def per_worker(
    inner: optax.GradientTransformationExtraArgs, workers: int
) -> optax.GradientTransformationExtraArgs:
    """``inner`` on every worker: vmapped over the leading axis of params, grads and state.

    An extra argument of ``update`` whose leaves all carry the worker axis (a per-worker
    ``value`` of shape ``(N,)``, a per-worker ``grad``) is split over the workers; any
    other reaches every worker whole. A state leaf that lost its worker axis (e.g. a
    learning rate set with ``optax.tree.set``) is broadcast to every worker. A global-norm
    clip or ``apply_if_finite`` inside sees only its own worker.
    """

    def init(params: optax.Params) -> optax.OptState:
        leaves = jax.tree.leaves(params)
        if not leaves or not all(isinstance(p, (jax.Array, np.ndarray)) for p in leaves):
            return inner.init(params)  # a placeholder (optax.tree_map_params): structure only
        return shard_worker_axis_like(jax.vmap(inner.init)(params), params)

    def update(updates, state, params=None, **extra_args):
        one = jax.tree.map(lambda p: jax.ShapeDtypeStruct(np.shape(p)[1:], p.dtype), params)
        expected = jax.eval_shape(inner.init, one)
        state = jax.tree.map(lambda x, e: _broadcast_worker_axis(x, e, workers), state, expected)
        state = shard_worker_axis_like(state, params)
        axes = {name: _worker_axes(value, workers) for name, value in extra_args.items()}
        return jax.vmap(
            lambda u, s, p, extra: inner.update(u, s, p, **extra), in_axes=(0, 0, 0, axes)
        )(updates, state, params, extra_args)

    return optax.GradientTransformationExtraArgs(init, update)


def _broadcast_worker_axis(x: Any, expected: Any, workers: int) -> Any:
    if np.shape(x) == (workers, *expected.shape):
        return x
    return jnp.broadcast_to(jnp.asarray(x, expected.dtype), (workers, *expected.shape))


def _worker_axes(value: Any, workers: int) -> Any:
    """0 (split over the workers) where every leaf of ``value`` has the worker axis, else None."""
    leaves = jax.tree.leaves(value)
    split = bool(leaves) and all(np.ndim(x) >= 1 and np.shape(x)[0] == workers for x in leaves)
    return 0 if split else None


def shard_worker_axis_like(tree: Any, params: Any) -> Any:
    """On an Explicit mesh, ``tree``'s worker axis sharded as params' is (vmap requires it).

    ``vmap(inner.init)`` makes per-worker counters whose worker axis is not sharded;
    moving them onto the params' worker sharding is a local slice, no communication.
    Nothing to do on Auto meshes and single devices.
    """
    leaves = jax.tree.leaves(params)
    if not leaves:
        return tree
    sharding = getattr(jax.typeof(leaves[0]), "sharding", None)
    spec = getattr(sharding, "spec", None)
    if not spec or spec[0] is None:
        return tree
    target = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(spec[0]))

    def move(x):
        if not hasattr(x, "ndim") or x.ndim == 0:
            return x
        if jax.typeof(x).sharding.spec[:1] == (spec[0],):
            return x
        return jax.sharding.reshard(x, target)

    return jax.tree.map(move, tree)


def first_worker(p: jax.Array) -> jax.Array:
    """``p[0]`` exactly, written as a reduction over the worker axis: slicing an axis that an
    Explicit mesh shards is not allowed, a reduction is (one all-reduce, at init only)."""
    if jnp.issubdtype(p.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(first_worker(jax.random.key_data(p)), impl=p.dtype._impl)
    first = jnp.arange(p.shape[0]).reshape((-1,) + (1,) * (p.ndim - 1)) == 0
    if p.dtype == jnp.bool_:
        return jnp.any(first & p, axis=0)
    return jnp.sum(jnp.where(first, p, jnp.zeros([], p.dtype)), axis=0, dtype=p.dtype)


def mean(delta: Any, where: Any) -> Any:
    """The mean over the workers of the pseudo-gradients: the sync's only communication.

    Each worker's value is rounded to ``communication_dtype`` (the exchanged values), the
    sum accumulates in at least float32 and the mean is rounded once back to it: no fp16
    overflow from summing before dividing, no bf16 accumulation error. A complex
    pseudo-gradient with a real ``communication_dtype`` travels as its real and imaginary
    parts.
    """
    if where.workers is None and where.axis_name is None:
        return delta
    if optax.MaskedNode is type(delta):
        return delta
    comm = where.communication_dtype or delta.dtype
    if jnp.issubdtype(delta.dtype, jnp.complexfloating) and not jnp.issubdtype(
        comm, jnp.complexfloating
    ):
        re = mean(jnp.real(delta), where)
        im = mean(jnp.imag(delta), where)
        return jax.lax.complex(re, im).astype(delta.dtype)
    sent = delta.astype(comm)
    with jax.numpy_dtype_promotion("standard"):
        acc = jnp.result_type(comm, jnp.float32)
    if where.workers is not None:  # explicit axis 0; sharded over a mesh, an all-reduce
        total = jnp.sum(sent.astype(acc), axis=0, dtype=acc)
        averaged = total / jnp.asarray(where.workers, acc)
    else:  # inside the user's shard_map / pmap / vmap over axis_name
        averaged = jax.lax.pmean(sent.astype(acc), where.axis_name)
    return averaged.astype(comm).astype(delta.dtype)


def initial_stats(params: Any, where: Any) -> SyncStats | None:
    """Zero :class:`SyncStats` (before the first sync), or None without workers."""
    if where.workers is None and where.axis_name is None:
        return None
    drift = jnp.zeros(() if where.workers is None else (where.workers,), jnp.float32)
    if where.workers is not None:
        drift = shard_worker_axis_like(drift, params)
    return SyncStats(jnp.zeros([], jnp.float32), drift)


def _squares(x: jax.Array, axes: Any) -> jax.Array:
    x = x.astype(jnp.complex64 if jnp.iscomplexobj(x) else jnp.float32)
    return jnp.sum(jnp.real(x * jnp.conj(x)) if jnp.iscomplexobj(x) else jnp.square(x), axis=axes)


def sync_stats(per_worker: Any, delta: Any, like: SyncStats, where: Any) -> SyncStats:
    """The norm of Delta and each worker's distance to the mean (complex parts included)."""
    pairs = [
        (w, d) for w, d in zip(jax.tree.leaves(per_worker), jax.tree.leaves(delta)) if np.size(d)
    ]
    norm = jnp.sqrt(sum((_squares(d, None) for _, d in pairs), jnp.zeros([], jnp.float32)))
    if where.workers is not None:  # per worker: a local reduction over its own axes
        zero = jnp.zeros(like.worker_drift.shape, jnp.float32)
        drift = sum((_squares(w - d, tuple(range(1, w.ndim))) for w, d in pairs), zero)
    else:  # the mean over workers: one scalar all-reduce, and the same on every worker
        drift = sum((_squares(w - d, None) for w, d in pairs), jnp.zeros([], jnp.float32))
        drift = jax.lax.pmean(drift, where.axis_name)
    return match_types(SyncStats(norm, jnp.sqrt(drift)), like)

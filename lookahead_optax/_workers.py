"""Many workers (DiLoCo): the per-worker inner optimizer, the worker mean and the sync
statistics. Making and resizing the worker axis (``replicate``, ``resize_workers``) is
``_resize.py``."""

from __future__ import annotations

import functools
import operator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lookahead_optax._state import SyncStats
from lookahead_optax._tree import match_types

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
    if sharding is None or not spec or spec[0] is None:
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
        return jax.random.wrap_key_data(
            first_worker(jax.random.key_data(p)), impl=jax.random.key_impl(p)
        )
    first = jnp.arange(p.shape[0]).reshape((-1,) + (1,) * (p.ndim - 1)) == 0
    if p.dtype == jnp.bool_:
        return jnp.any(first & p, axis=0)
    return jnp.sum(jnp.where(first, p, jnp.zeros([], p.dtype)), axis=0, dtype=p.dtype)


def worker_axis_is_local(x: jax.Array) -> bool:
    """Whether the leading (worker) axis of ``x`` lies whole on every device that holds it.

    True on one device and where an Explicit mesh leaves the axis unsharded: slicing it is
    then local. False on any other mesh (an Auto mesh does not say how it shards the axis
    while tracing; slicing a sharded axis is an error on Explicit meshes and collective
    permutes on Auto ones), where the worker reduction must stay a reduction: one all-reduce.
    """
    sharding = getattr(jax.typeof(x), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or mesh.empty:
        return True
    explicit = all(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types)
    if explicit:
        # Even on a one-device Explicit mesh a spec naming the worker axis is part of the
        # type: the reduction keeps it (stacked slices would lose it, and a cond's branches
        # would differ: float32[4] against float32[4@workers]).
        spec = getattr(sharding, "spec", None)
        return not spec or spec[0] is None
    return mesh.size == 1


def mean(delta: Any, where: Any) -> Any:
    """The mean over the workers of the pseudo-gradients: the sync's only communication.

    ``delta`` is one leaf's pseudo-gradients: stacked on a leading worker axis (``workers``;
    on a mesh that shards the axis the sum is the all-reduce), one worker's (``axis_name``:
    ``lax.pmean``), or a list with one entry per worker (the axis lies whole on the device:
    the sum of the entries, one elementwise pass; ``jnp.sum(axis=0)`` is handed by XLA:CPU
    to a library kernel that neither fuses with the pseudo-gradient's arithmetic nor runs
    near memory speed).

    Each worker's value is rounded to ``communication_dtype`` (the exchanged values), the
    sum accumulates in at least float32 and the mean is rounded once back to it: no fp16
    overflow from summing before dividing, no bf16 accumulation error. A complex
    pseudo-gradient with a real ``communication_dtype`` travels as its real and imaginary
    parts.
    """
    if isinstance(delta, list):
        first = delta[0]
    elif where.workers is None and where.axis_name is None:
        return delta
    else:
        first = delta
    if optax.MaskedNode is type(first):
        return first
    comm = where.communication_dtype or first.dtype
    if jnp.issubdtype(first.dtype, jnp.complexfloating) and not jnp.issubdtype(
        comm, jnp.complexfloating
    ):
        parts = (jnp.real, jnp.imag)
        if isinstance(delta, list):
            re, im = (mean([part(x) for x in delta], where) for part in parts)
        else:
            re, im = (mean(part(delta), where) for part in parts)
        return jax.lax.complex(re, im).astype(first.dtype)
    with jax.numpy_dtype_promotion("standard"):
        acc = jnp.result_type(comm, jnp.float32)
    if isinstance(delta, list):  # the sum of the workers' slices
        total = functools.reduce(operator.add, [x.astype(comm).astype(acc) for x in delta])
        averaged = total / jnp.asarray(len(delta), acc)
    elif where.workers is not None:  # the axis sharded over a mesh: one all-reduce
        total = jnp.sum(delta.astype(comm).astype(acc), axis=0, dtype=acc)
        averaged = total / jnp.asarray(where.workers, acc)
    else:  # inside the user's shard_map / pmap / vmap over axis_name
        averaged = jax.lax.pmean(delta.astype(comm).astype(acc), where.axis_name)
    return averaged.astype(comm).astype(first.dtype)


def initial_stats(params: Any, where: Any) -> SyncStats | None:
    """Zero :class:`SyncStats` (before the first sync; NaN where they are not computed), or
    None without workers."""
    if where.workers is None and where.axis_name is None:
        return None
    fill = 0.0 if where.stats else float("nan")  # NaN: not computed (sync_stats=False)
    drift = jnp.full(() if where.workers is None else (where.workers,), fill, jnp.float32)
    if where.workers is not None:
        drift = shard_worker_axis_like(drift, params)
    return SyncStats(jnp.full([], fill, jnp.float32), drift)


def _squares(x: jax.Array, axes: Any) -> jax.Array:
    x = x.astype(jnp.complex64 if jnp.iscomplexobj(x) else jnp.float32)
    return jnp.sum(jnp.real(x * jnp.conj(x)) if jnp.iscomplexobj(x) else jnp.square(x), axis=axes)


def sync_stats(per_worker: list[Any], delta: list[Any], like: SyncStats, where: Any) -> SyncStats:
    """The norm of Delta and each worker's distance to the mean (complex parts included).

    ``per_worker`` and ``delta``: the leaves, as :func:`mean` took and returned them.
    """
    pairs = [(w, d) for w, d in zip(per_worker, delta) if np.size(d)]
    norm = jnp.sqrt(sum((_squares(d, None) for _, d in pairs), jnp.zeros([], jnp.float32)))

    def drift_of(w: Any, d: Any) -> jax.Array:
        if isinstance(w, list):  # the worker axis whole on the device: one sum per slice
            return jnp.stack([_squares(x - d, None) for x in w])
        return _squares(w - d, tuple(range(1, w.ndim)))

    if where.workers is not None:  # per worker: a local reduction over its own axes
        zero = jnp.zeros(like.worker_drift.shape, jnp.float32)
        drift = sum((drift_of(w, d) for w, d in pairs), zero)
    else:  # the mean over workers: one scalar all-reduce, and the same on every worker
        drift = sum((_squares(w - d, None) for w, d in pairs), jnp.zeros([], jnp.float32))
        drift = jax.lax.pmean(drift, where.axis_name)
    return match_types(SyncStats(norm, jnp.sqrt(drift)), like)

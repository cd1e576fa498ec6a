"""Many workers (DiLoCo): params with a leading worker axis."""

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


def replicate(params: optax.Params, workers: int) -> optax.Params:
    """``params`` copied onto a new leading worker axis of size ``workers``.

    The starting point of ``lookahead(..., workers=N)``: every worker starts
    from the same weights (the shared slow weights start as worker 0's). Real
    copies, so the result can be donated to a jitted step.

    Args:
      params: One worker's params.
      workers: The number of workers N, a positive int (NumPy integers too).

    Returns:
      A pytree like ``params`` whose leaves have shape ``(N, *leaf.shape)``.

    Raises:
      ValueError: if ``workers`` is not a positive int (0, -1, 2.0, True).

    Examples:
      >>> import jax.numpy as jnp
      >>> import lookahead_optax as lo
      >>> lo.replicate({"w": jnp.array([1.0, -2.0])}, 3)["w"].shape
      (3, 2)
    """
    from lookahead_optax._checks import check_worker_count

    # Checked before jax sees it: jnp.repeat(x, 2.0) fails and then poisons jax's cache, so
    # that every later replicate(p, 2) in the process fails too.
    workers = check_worker_count(workers)
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
    - A new worker starts at the slow weights (leaves that never sync, such as
      int or bool leaves, at worker 0's value) with a copy of worker 0's inner
      state (its moments and counters), so every worker's state has the same
      dtypes and step counts.
    - Around and beside the lookahead, every leaf of ``opt_state`` with the
      shape of a leaf of ``params`` carries the worker axis too and is resized
      the same way (new workers copy worker 0's): ``optax.MultiSteps``'
      accumulated gradients, the states of a ``multi_transform``'s other
      branches. Other leaves (counters, hyperparameters) are kept.

    Works with the ``opt_state`` and params of an ``nnx.Optimizer`` (Variables
    keep their types) and with params sharded over a mesh, Explicit or Auto:
    the resized leaves have their worker axis gathered (replicated over the old
    mesh, other axes keep their sharding); put them onto the new workers'
    sharding. Build the transformation again with ``workers=workers`` and
    continue with the returned ``(params, opt_state)``. Restore a checkpoint
    first with the shapes it was saved with (``lo.abstract_opt_state`` of the
    old ``tx``).

    Args:
      opt_state: A state holding one ``LookaheadState`` of a ``workers=N`` run.
      params: Its params, with a leading worker axis of size N.
      workers: The new number of workers, a positive int (NumPy integers too).

    Returns:
      ``(params, opt_state)`` with a leading worker axis of size ``workers``.

    Raises:
      ValueError: if ``workers`` is not a positive int, ``opt_state`` holds no
        lookahead (or several) or one without ``workers``, or ``params`` lack
        its worker axis.

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
    from lookahead_optax._checks import check_worker_axes, check_worker_count
    from lookahead_optax._state import is_lookahead_state, the_state
    from lookahead_optax._tree import is_masked

    workers = check_worker_count(workers)
    state = the_state(opt_state, "resize_workers' opt_state")
    stats = state.sync_stats
    drift = None if stats is None else _value(stats.worker_drift)
    if drift is None or np.ndim(drift) != 1:
        raise ValueError(
            "resize_workers needs the state of a lookahead built with workers=N (its params "
            "carry a leading worker axis); this one has "
            + ("axis_name" if drift is not None else "no workers")
        )
    old = int(np.shape(drift)[0])
    variable = _variable_type()
    is_leaf = (lambda x: isinstance(x, variable)) if variable else None
    check_worker_axes(jax.tree.map(_value, params, is_leaf=is_leaf), old)

    def resize(x: Any, fill: Any = None) -> Any:
        """x with its worker axis cut to ``workers`` or extended by copies of ``fill``
        (default: worker 0's slice). Variables keep their type and metadata."""
        value = _gather_worker_axis(jnp.asarray(_value(x)))
        if workers <= old:
            new = value[:workers]
        else:
            fill = value[0] if fill is None else jnp.asarray(_value(fill))
            if not jax.dtypes.issubdtype(value.dtype, jax.dtypes.extended):
                fill = fill.astype(value.dtype)
            new = jnp.concatenate([value, jnp.repeat(fill[None], workers - old, axis=0)])
        return x.replace(new) if variable and isinstance(x, variable) else new

    def per_worker_leaf(x: Any) -> bool:
        return np.ndim(_value(x)) >= 1 and np.shape(_value(x))[0] == old

    # New workers' params: the slow weights where the lookahead syncs, else worker 0's.
    param_leaves, structure = jax.tree.flatten(params, is_leaf=is_leaf)
    param_def: Any = structure  # PyTreeDef: no stubs
    slow_leaves = jax.tree.leaves(
        state.slow, is_leaf=lambda x: is_masked(x) or bool(is_leaf and is_leaf(x))
    )
    new_param_leaves = []
    for p, slow in zip(param_leaves, slow_leaves, strict=True):
        synced = not is_masked(slow) and jnp.issubdtype(jnp.result_type(_value(p)), jnp.inexact)
        new_param_leaves.append(resize(p, slow if synced else None))
    new_params = param_def.unflatten(new_param_leaves)

    def resize_state(s: Any) -> Any:
        inner = jax.tree.map(
            lambda x: resize(x) if per_worker_leaf(x) else x, s.inner_state, is_leaf=is_leaf
        )
        cycle_start = s.cycle_start
        if cycle_start is not None:
            cycle_start = jax.tree.map(
                lambda x: resize(x) if per_worker_leaf(x) else x, cycle_start, is_leaf=is_leaf
            )
        new_stats = s.sync_stats._replace(
            worker_drift=resize(s.sync_stats.worker_drift, jnp.zeros([], jnp.float32))
        )
        residual = s.residual  # error feedback: a new worker starts with nothing owed
        if residual is not None:
            residual = jax.tree.map(
                lambda x: resize(x, jnp.zeros(np.shape(x)[1:], jnp.float32)), residual
            )
        return s._replace(
            inner_state=inner, cycle_start=cycle_start, sync_stats=new_stats, residual=residual
        )

    # Outside the lookahead: the leaves shaped like a leaf of params carry the worker axis.
    param_shapes = {np.shape(_value(p)) for p in param_leaves}

    def outside(x: Any) -> Any:
        if is_lookahead_state(x):
            return resize_state(x)
        if np.shape(_value(x)) in param_shapes and per_worker_leaf(x):
            return resize(x)
        return x

    either = lambda x: is_lookahead_state(x) or bool(is_leaf and is_leaf(x))  # noqa: E731
    new_opt_state = jax.tree.map(outside, opt_state, is_leaf=either)
    return new_params, new_opt_state


def _variable_type() -> Any:
    """``flax.nnx.Variable`` if flax is loaded (params or states holding Variables mean it
    is), else None: flax stays optional."""
    import sys

    nnx = sys.modules.get("flax.nnx")
    return getattr(nnx, "Variable", None)


def _value(x: Any) -> Any:
    """The array inside an nnx Variable, or x itself."""
    variable = _variable_type()
    return x.get_value() if variable and isinstance(x, variable) else x


def _gather_worker_axis(x: jax.Array) -> jax.Array:
    """``x`` with its worker axis (0) not sharded, so it can be sliced and extended: on an
    Explicit mesh slicing a sharded axis is a ShardingTypeError. Other axes keep their
    sharding; unsharded arrays are returned as they are."""
    sharding = getattr(x, "sharding", None)
    spec = getattr(sharding, "spec", None)
    if not isinstance(sharding, jax.sharding.NamedSharding) or not spec or spec[0] is None:
        return x
    rest = tuple(spec[1:])
    target = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(None, *rest))
    return jax.device_put(x, target)


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

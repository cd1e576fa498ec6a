"""Making and resizing the worker axis of a ``workers=N`` run: ``replicate`` and
``resize_workers`` (a machine lost or added)."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lookahead_optax._checks import check_worker_count
from lookahead_optax._consistency import check_worker_axes
from lookahead_optax._state import is_lookahead_state, the_state
from lookahead_optax._tree import is_masked


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
    workers = check_worker_count(workers)
    state = the_state(opt_state, "resize_workers' opt_state")
    old = _old_workers(state)
    variable = _variable_type()
    is_leaf = (lambda x: isinstance(x, variable)) if variable else None
    check_worker_axes(jax.tree.map(_value, params, is_leaf=is_leaf), old)
    resize = functools.partial(_resize, old=old, workers=workers)
    new_params = _resize_params(params, state.slow, resize, is_leaf)

    # Outside the lookahead: the leaves shaped like a leaf of params carry the worker axis.
    param_shapes = {np.shape(_value(p)) for p in jax.tree.leaves(params, is_leaf=is_leaf)}

    def outside(x: Any) -> Any:
        if is_lookahead_state(x):
            return _resize_state(x, resize, old, is_leaf)
        if np.shape(_value(x)) in param_shapes and _per_worker_leaf(x, old):
            return resize(x)
        return x

    either = lambda x: is_lookahead_state(x) or bool(is_leaf and is_leaf(x))  # noqa: E731
    return new_params, jax.tree.map(outside, opt_state, is_leaf=either)


def _old_workers(state: Any) -> int:
    """N of the ``workers=N`` lookahead that made ``state`` (its per-worker drift's length)."""
    stats = state.sync_stats
    drift = None if stats is None else _value(stats.worker_drift)
    if drift is None or np.ndim(drift) != 1:
        raise ValueError(
            "resize_workers needs the state of a lookahead built with workers=N (its params "
            "carry a leading worker axis); this one has "
            + ("axis_name" if drift is not None else "no workers")
        )
    return int(np.shape(drift)[0])


def _resize(x: Any, fill: Any = None, *, old: int, workers: int) -> Any:
    """x with its worker axis cut to ``workers`` or extended by copies of ``fill`` (default:
    worker 0's slice). Variables keep their type and metadata."""
    variable = _variable_type()
    value = _gather_worker_axis(jnp.asarray(_value(x)))
    if workers <= old:
        new = value[:workers]
    else:
        fill = value[0] if fill is None else jnp.asarray(_value(fill))
        if not jax.dtypes.issubdtype(value.dtype, jax.dtypes.extended):
            fill = fill.astype(value.dtype)
        new = jnp.concatenate([value, jnp.repeat(fill[None], workers - old, axis=0)])
    return x.replace(new) if variable and isinstance(x, variable) else new


def _per_worker_leaf(x: Any, old: int) -> bool:
    return np.ndim(_value(x)) >= 1 and np.shape(_value(x))[0] == old


def _resize_params(params: Any, slow: Any, resize: Callable[..., Any], is_leaf: Any) -> Any:
    """New workers' params: the slow weights where the lookahead syncs, else worker 0's."""
    param_leaves, structure = jax.tree.flatten(params, is_leaf=is_leaf)
    param_def: Any = structure  # PyTreeDef: no stubs
    slow_leaves = jax.tree.leaves(
        slow, is_leaf=lambda x: is_masked(x) or bool(is_leaf and is_leaf(x))
    )
    new_leaves = []
    for p, s in zip(param_leaves, slow_leaves, strict=True):
        synced = not is_masked(s) and jnp.issubdtype(jnp.result_type(_value(p)), jnp.inexact)
        new_leaves.append(resize(p, s if synced else None))
    return param_def.unflatten(new_leaves)


def _resize_state(s: Any, resize: Callable[..., Any], old: int, is_leaf: Any) -> Any:
    """A LookaheadState's per-worker parts resized: inner state, cycle start, drift, residual."""

    def per_worker(tree: Any) -> Any:
        return jax.tree.map(
            lambda x: resize(x) if _per_worker_leaf(x, old) else x, tree, is_leaf=is_leaf
        )

    new_stats = s.sync_stats._replace(
        worker_drift=resize(s.sync_stats.worker_drift, jnp.zeros([], jnp.float32))
    )
    residual = s.residual  # error feedback: a new worker starts with nothing owed
    if residual is not None:
        residual = jax.tree.map(
            lambda x: resize(x, jnp.zeros(np.shape(x)[1:], jnp.float32)), residual
        )
    cycle_start = None if s.cycle_start is None else per_worker(s.cycle_start)
    return s._replace(
        inner_state=per_worker(s.inner_state), cycle_start=cycle_start, sync_stats=new_stats,
        residual=residual,
    )  # fmt: skip


def _variable_type() -> Any:
    """``flax.nnx.Variable`` if flax is loaded (params or states holding Variables mean it
    is), else None: flax stays optional."""
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

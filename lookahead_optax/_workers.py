"""Many workers (DiLoCo): params with a leading worker axis."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


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
    from lookahead_optax._state import LookaheadState

    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ValueError(f"workers must be a positive int, got {workers!r}")
    states = [
        leaf
        for leaf in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, LookaheadState))
        if isinstance(leaf, LookaheadState)
    ]
    if len(states) != 1:
        raise ValueError(f"resize_workers needs exactly one LookaheadState, found {len(states)}")
    (state,) = states
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
    new_opt_state = jax.tree.map(
        lambda x: new_state if isinstance(x, LookaheadState) else x,
        opt_state,
        is_leaf=lambda x: isinstance(x, LookaheadState),
    )
    return new_params, new_opt_state

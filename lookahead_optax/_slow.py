"""The slow weights: what to evaluate and export from a Lookahead run."""

from __future__ import annotations

import jax
import optax

from lookahead_optax._lookahead import LookaheadState


def _is_state(x) -> bool:
    return isinstance(x, LookaheadState)


def _find_states(opt_state: optax.OptState) -> list[LookaheadState]:
    """The outermost LookaheadStates in ``opt_state``, in tree order."""
    leaves = jax.tree.leaves(opt_state, is_leaf=_is_state)
    return [leaf for leaf in leaves if _is_state(leaf)]


def slow_params(opt_state: optax.OptState, params: optax.Params) -> optax.Params:
    """Returns the slow weights of a Lookahead run, with the structure of params.

    Finds the :class:`LookaheadState` wherever it sits in ``opt_state``: at the
    top, inside ``optax.chain``, ``inject_hyperparams``, ``MultiSteps``,
    ``masked`` or ``multi_transform``. Params that no lookahead covers (masked
    out) are returned as they are. With nested lookaheads the outermost (slowest)
    weights are returned. Leaves have the slow weights' dtype: the params' dtype
    unless ``slow_dtype`` was given. Pure: works under ``jit`` and ``vmap``.

    Args:
      opt_state: A state returned by the ``init`` or ``update`` of a
        transformation that contains :func:`lookahead_optax.lookahead`.
      params: The current params (the fast weights).

    Returns:
      The slow weights, a pytree with the structure of ``params``.

    Raises:
      ValueError: if ``opt_state`` holds no ``LookaheadState``.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> import lookahead_optax as lo
      >>> tx = optax.chain(optax.clip_by_global_norm(1.0), lo.lookahead(optax.adam(1e-3)))
      >>> params = {"w": jnp.ones(3)}
      >>> opt_state = tx.init(params)
      >>> lo.slow_params(opt_state, params)["w"]
      Array([1., 1., 1.], dtype=float32)
    """
    states = _find_states(opt_state)
    if not states:
        raise ValueError(
            "slow_params found no LookaheadState in opt_state: pass the state of a "
            "transformation built with lookahead_optax.lookahead"
        )
    result = params
    for state in states:
        # Leaves a lookahead does not cover are MaskedNodes in its slow tree.
        result = jax.tree.map(
            lambda slow, current: current if isinstance(slow, optax.MaskedNode) else slow,
            state.slow,
            result,
            is_leaf=lambda x: isinstance(x, optax.MaskedNode),
        )
    return result

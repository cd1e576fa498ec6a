"""The slow weights: what to evaluate and export from a Lookahead run."""

from __future__ import annotations

import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lookahead_optax._state import find_states
from lookahead_optax._tree import is_inexact
from lookahead_optax._workers import first_worker


def _nnx_variable_type() -> type | None:
    """``flax.nnx.Variable`` if flax is loaded, else None (flax stays optional).

    ``nnx.Optimizer`` wraps every leaf of its opt_state in an ``OptVariable``
    and ``nnx.state(model, nnx.Param)`` wraps params in ``Param``s; both are
    Variables. Params holding Variables means flax is already imported.
    """
    nnx = sys.modules.get("flax.nnx")
    return getattr(nnx, "Variable", None)


def slow_params(opt_state: optax.OptState, params: optax.Params) -> optax.Params:
    """Returns the slow weights of a Lookahead run, with the structure of params.

    Finds the :class:`LookaheadState` wherever it sits in ``opt_state``: at the
    top, inside ``optax.chain``, ``inject_hyperparams``, ``MultiSteps``,
    ``masked`` or ``multi_transform``. Params that no lookahead covers (masked
    out) are returned as they are. With nested lookaheads the outermost (slowest)
    weights are returned. Leaves have the slow weights' dtype: the params' dtype
    unless ``slow_dtype`` was given. Pure: works under ``jit`` and ``vmap``.
    With Flax NNX, pass ``nnx.Optimizer.opt_state`` and
    ``nnx.state(model, nnx.Param)``: the result is an ``nnx.State`` of
    ``nnx.Param`` (see also :func:`lookahead_optax.flax.nnx_slow_model`).

    With ``workers=N`` the params carry a leading worker axis and the result
    does not: it is the one set of slow weights all workers share. Leaves that
    are not floating (int, bool, PRNG keys) are never synced: the result holds
    their current value (with ``workers=N``, worker 0's).

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
    states = find_states(opt_state)
    if not states:
        raise ValueError(
            "slow_params found no LookaheadState in opt_state: pass the state of a "
            "transformation built with lookahead_optax.lookahead"
        )
    variable: Any = _nnx_variable_type() or ()

    def is_leaf(x) -> bool:
        return isinstance(x, (optax.MaskedNode, variable))

    def pick(slow, current):
        # Leaves a lookahead does not cover are MaskedNodes in its slow tree.
        if isinstance(slow, optax.MaskedNode):
            return current
        if isinstance(slow, variable):
            slow = slow.get_value()
        value = current.get_value() if isinstance(current, variable) else current
        # workers=N: params carry a worker axis, the slow weights are shared (no axis).
        stacked = np.ndim(value) == np.ndim(slow) + 1 and np.shape(value)[1:] == np.shape(slow)
        if not stacked and np.shape(value) != np.shape(slow):
            raise ValueError(
                "params must have the leaf shapes of the params the state was initialised "
                f"with: got a leaf of shape {np.shape(value)} where the slow weights have "
                f"{np.shape(slow)}"
            )
        if not is_inexact(value):
            # Not synced (int, bool, PRNG keys): the params are the answer, their current
            # value; with workers, worker 0's (the slow weights' shapes have no worker axis).
            if not stacked:
                return current
            first = first_worker(jnp.asarray(value))
            return current.replace(first) if isinstance(current, variable) else first
        if isinstance(current, variable):
            # Keep the params' Variable type (nnx.Param) and metadata.
            return current.replace(slow)
        return slow

    result = params
    for state in states:
        try:
            result = jax.tree.map(pick, state.slow, result, is_leaf=is_leaf)
        except ValueError as error:
            if "leaf shapes" in str(error):
                raise
            raise ValueError(
                "params must have the structure of the params the state was initialised with: "
                f"{error}"
            ) from error
    return result

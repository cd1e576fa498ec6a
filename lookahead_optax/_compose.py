"""A one-time check that a transformation obeys Lookahead's composition rule."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lookahead_optax._checks import is_inexact
from lookahead_optax._slow import slow_params
from lookahead_optax._state import find_states, replace_states


def _force_sync_next(opt_state: optax.OptState) -> optax.OptState:
    """Every LookaheadState set one step before its sync."""
    return replace_states(lambda state: state._replace(count=state.period - 1), opt_state)


def check_composition(
    tx: optax.GradientTransformation,
    params: optax.Params,
    grads: optax.Updates | None = None,
    *,
    max_calls: int = 64,
    **extra_args,
) -> None:
    """Raises if something in ``tx`` changes the updates a lookahead returns.

    The rule: a sync's update must move the params exactly onto the slow
    weights, so nothing after a lookahead in a chain may scale, clip, decay or
    otherwise change its updates (put those inside the lookahead's inner
    optimizer, or before the lookahead). Breaking it is silent: the params
    leave the slow weights at every sync and the slow weights drift.

    This runs ``tx`` from ``tx.init(params)`` with every lookahead set to sync
    at its next update (calling ``update`` up to ``max_calls`` times, for
    wrappers such as ``optax.MultiSteps`` that call it only every few steps)
    and checks that after the sync the params equal
    :func:`lookahead_optax.slow_params` within a few ulps. Call it once on
    your ``tx``, e.g. in a test; it is eager and cheap. It can only see what
    these ``grads`` provoke (default: standard normal gradients): a clip whose
    threshold they do not reach changes nothing here.

    Args:
      tx: A transformation containing :func:`lookahead_optax.lookahead`.
      params: Params to start from (their values matter: weight decay on zero
        params changes nothing).
      grads: Gradients to use at every call; default standard normal ones.
      max_calls: How many ``update`` calls to wait for a sync.
      **extra_args: Passed to ``tx.update`` (e.g. ``value`` for
        ``reduce_on_plateau``).

    Raises:
      ValueError: if ``tx`` holds no lookahead, none synced within
        ``max_calls`` calls, or the params after a sync are not the slow
        weights (the message says by how much and what to change).

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> import lookahead_optax as lo
      >>> params = {"w": jnp.array([1.0, -2.0])}
      >>> good = lo.lookahead(optax.chain(optax.scale_by_adam(), optax.scale(-0.1)), k=3)
      >>> lo.check_composition(good, params)
      >>> bad = optax.chain(lo.lookahead(optax.scale_by_adam(), k=3), optax.scale(-0.1))
      >>> lo.check_composition(bad, params)  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      ValueError: something after the lookahead changed its updates: ...
    """
    tx = optax.with_extra_args_support(tx)
    opt_state = tx.init(params)
    if not find_states(opt_state):
        raise ValueError("check_composition found no lookahead in tx")
    if grads is None:
        leaves, treedef = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.key(0), len(leaves))
        grads = treedef.unflatten(
            [
                jax.random.normal(key, jnp.shape(p), jnp.result_type(p)) if is_inexact(p) else p
                for key, p in zip(keys, leaves)
            ]
        )
    opt_state = _force_sync_next(opt_state)
    syncs_before = [int(s.syncs) for s in find_states(opt_state)]
    for _ in range(max_calls):
        updates, opt_state = tx.update(grads, opt_state, params, **extra_args)
        params = optax.apply_updates(params, updates)
        if [int(s.syncs) for s in find_states(opt_state)] != syncs_before:
            break
    else:
        raise ValueError(f"no lookahead in tx synced within max_calls={max_calls} update calls")
    slow = slow_params(opt_state, params)
    worst = 0.0
    for p, s in zip(jax.tree.leaves(params), jax.tree.leaves(slow)):
        if not is_inexact(p):
            continue
        eps = float(jnp.finfo(jnp.result_type(p)).eps)
        p, s = np.asarray(p, np.complex128), np.asarray(s, np.complex128)
        scale = np.maximum(np.abs(s), 1.0)
        worst = max(worst, float(np.max(np.abs(p - s) / scale, initial=0.0)) / eps)
    if worst > 16:
        raise ValueError(
            "something after the lookahead changed its updates: after a sync the params "
            f"differ from the slow weights by {worst:.3g} ulps (relative). Nothing may come "
            "after lookahead in a chain that changes updates: move learning rates, clipping, "
            "weight decay and reduce_on_plateau inside it, "
            "lookahead(optax.chain(..., inner_optimizer, ...)), or before it."
        )

"""One optimizer step as one fused program: the sync is decided before the update runs."""

from __future__ import annotations

import jax
import optax

from lookahead_optax._slow import find_states
from lookahead_optax._state import HINT_KEY, SyncHint


def update_and_apply(
    tx: optax.GradientTransformation,
    grads: optax.Updates,
    opt_state: optax.OptState,
    params: optax.Params,
    **extra_args,
) -> tuple[optax.Params, optax.OptState]:
    """``tx.update`` then ``optax.apply_updates``, faster when ``tx`` holds a lookahead.

    Returns what ``updates, opt_state = tx.update(grads, opt_state, params)``
    followed by ``optax.apply_updates(params, updates)`` returns, up to an
    ulp of rounding where XLA fuses the two programs differently (a
    multiply-add, a global norm's sum). The difference is speed: whether this
    step syncs is read from the lookahead's state first (``count + 1 ==
    period``), and a ``lax.cond`` then runs one of two whole steps, each
    compiled as one fused program with the apply.

    - A non-sync step is the inner optimizer's step: the slow weights are
      not read or written at all.
    - A sync step computes the inner update once, fused with the slow update
      and the apply, and runs a collective inside the inner optimizer (a
      global-norm clip under ``shard_map``) once, not twice.

    The decision reaches the lookahead as data: ``tx.update`` is called with
    the extra argument ``lookahead_sync``, a hint naming the state it was read
    from. The lookahead takes it only when it updates that very state in that
    very trace; effects inside ``tx`` run once per step.

    Which compositions take the fused path: ``tx`` must hold exactly one
    lookahead (nested ones count once: the outermost), reached through
    transformations that forward extra arguments and pass the state through
    unchanged: ``optax.chain``, ``named_chain``, ``inject_hyperparams``,
    ``apply_if_finite``, ``masked``, ``multi_transform``,
    ``partition``, ``conditionally_mask`` / ``conditionally_transform``. All
    others run exactly ``tx.update`` followed by ``optax.apply_updates``: no
    lookahead, several lookaheads, ``optax.MultiSteps`` (its ``lax.cond``
    passes the state as a new operand), a wrapper that drops extra arguments
    or calls ``update`` through its own ``jax.jit``.
    :func:`fused_path_taken` tells which one a ``tx`` gets. Under ``vmap``
    with a batched step count both branches run, as for any ``lax.cond``.

    ``tx.update`` alone cannot do this: it returns updates for the caller to
    apply, so its own sync is a ``lax.cond`` inside the step. Use this in a
    hand-written training step; Flax's ``TrainState`` and ``nnx.Optimizer``
    call ``tx.update`` themselves and get the usual path.

    Args:
      tx: Any optax transformation, e.g. ``lookahead(adam)`` or
        ``optax.chain(optax.clip_by_global_norm(1.0), lookahead(adam))``.
      grads: Gradients, with the structure of params.
      opt_state: ``tx``'s state.
      params: The current params.
      **extra_args: Passed to ``tx.update`` (``value``, ``grad``, ...).

    Returns:
      ``(new_params, new_opt_state)``.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> import lookahead_optax as lo
      >>> tx = lo.lookahead(optax.sgd(0.1), k=2, alpha=0.5)
      >>> params = {"w": jnp.array([1.0, -2.0])}
      >>> opt_state = tx.init(params)
      >>> step = jax.jit(lambda p, s: lo.update_and_apply(tx, p, s, p))  # grads = p
      >>> for _ in range(2):
      ...     params, opt_state = step(params, opt_state)
      >>> params["w"]  # as in lookahead's example: half way back to the start
      Array([ 0.905, -1.81 ], dtype=float32)
    """
    tx = optax.with_extra_args_support(tx)
    if HINT_KEY in extra_args:
        raise ValueError(f"{HINT_KEY!r} is reserved for update_and_apply's own use")
    if not fused_path_taken(tx, grads, opt_state, params, **extra_args):
        updates, new_state = tx.update(grads, opt_state, params, **extra_args)
        return optax.apply_updates(params, updates), new_state
    (state,) = find_states(opt_state)

    def step(sync: bool) -> tuple[optax.Params, optax.OptState]:
        hint = {HINT_KEY: SyncHint(state.count, sync)}
        updates, new_state = tx.update(grads, opt_state, params, **extra_args, **hint)
        return optax.apply_updates(params, updates), new_state

    sync = state.count + 1 >= state.period
    return jax.lax.cond(sync, lambda: step(True), lambda: step(False))


def fused_path_taken(
    tx: optax.GradientTransformation,
    grads: optax.Updates,
    opt_state: optax.OptState,
    params: optax.Params,
    **extra_args,
) -> bool:
    """Whether :func:`update_and_apply` takes its fused path for these arguments.

    Traces ``tx.update`` once with ``jax.eval_shape``: nothing is computed and
    no effect runs.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> import lookahead_optax as lo
      >>> tx = optax.chain(optax.clip_by_global_norm(1.0), lo.lookahead(optax.adam(1e-3)))
      >>> params = {"w": jnp.ones(3)}
      >>> lo.fused_path_taken(tx, params, tx.init(params), params)
      True
      >>> ms = optax.MultiSteps(lo.lookahead(optax.adam(1e-3)), every_k_schedule=2)
      >>> lo.fused_path_taken(ms, params, ms.init(params), params)
      False
    """
    tx = optax.with_extra_args_support(tx)
    states = find_states(opt_state)
    if len(states) != 1:
        return False
    hint = SyncHint(states[0].count, True)
    jax.eval_shape(lambda: tx.update(grads, opt_state, params, **extra_args, **{HINT_KEY: hint}))
    return hint.taken

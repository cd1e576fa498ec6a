"""One optimizer step as one fused program: the sync is decided before the update runs."""

from __future__ import annotations

import jax
import jax.extend
import optax

from lookahead_optax._lookahead import _sync_mode


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
    step syncs is read from the state first, and a ``lax.cond`` then runs one
    of two whole steps, each compiled as one fused program with the apply.

    - A non-sync step is the inner optimizer's step: the slow weights are
      not read or written at all.
    - A sync step computes the inner update once, fused with the slow update
      and the apply, and runs a collective inside the inner optimizer (a
      global-norm clip under ``shard_map``) once, not twice.

    ``tx.update`` alone cannot do this: it returns updates for the caller to
    apply, so its own sync is a ``lax.cond`` inside the step (see
    ``benchmarks/RESULTS.md`` for both, measured). Use this in a hand-written
    training step; Flax's ``TrainState`` and ``nnx.Optimizer`` call
    ``tx.update`` themselves and get the usual path.

    When ``tx`` holds no lookahead, several, or one that runs inside another
    transformation's control flow (``optax.MultiSteps``), this is exactly
    ``tx.update`` followed by ``optax.apply_updates``. Under ``vmap`` with a
    batched step count both branches run, as for any ``lax.cond``.

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

    def step(sync: bool | list | None):  # None: tx.update decides, as usual
        with _sync_mode(sync):
            updates, new_state = tx.update(grads, opt_state, params, **extra_args)
        return optax.apply_updates(params, updates), new_state

    # Traced for the predicates only: its outputs are unused, and XLA drops the code.
    predicates: list = []
    step(predicates)
    here = jax.extend.core.get_opaque_trace_state()
    if len(predicates) != 1 or predicates[0][1] != here:
        return step(None)
    return jax.lax.cond(predicates[0][0], lambda: step(True), lambda: step(False))

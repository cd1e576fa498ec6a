"""Lookahead as a drop-in optax transformation: params stay a plain pytree.

Algorithm 1 of Zhang et al. (2019), grown into its two-loop family: the inner optimizer
takes k fast steps from the slow weights, then one sync (``_sync.py``: the algorithm)
moves the slow weights and the fast weights restart there. The slow weights live in the
optimizer state, so params, gradients and updates keep one structure. How a step is
arranged for XLA is ``_steps.py``; one step, top to bottom, is ``_update.py``; many
workers are ``_workers.py``; what happens to the inner state at a sync is ``_policies.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import jax
import optax

from lookahead_optax import _checks, _consistency, _sync, _update, _workers
from lookahead_optax._adaptive import AdaptiveAlpha
from lookahead_optax._hint import HINT_KEY, SyncHint

InnerStatePolicy = Literal["keep", "reset", "pullback"]
AlphaLike = float | jax.Array | Callable[[jax.Array], jax.Array] | AdaptiveAlpha


def lookahead(
    inner: optax.GradientTransformation,
    k: int | jax.Array = 5,
    alpha: AlphaLike | None = None,
    *,
    outer: optax.GradientTransformation | None = None,
    inner_state: InnerStatePolicy = "keep",
    slow_dtype: jax.typing.DTypeLike | None = None,
    workers: int | None = None,
    axis_name: Any = None,
    communication_dtype: jax.typing.DTypeLike | None = None,
    fragments: int | None = None,
    overlap: int | None = None,
    mixing: float | None = None,
    communication_block: int | None = None,
    error_feedback: bool | None = None,
    sync_stats: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""Lookahead: k fast steps of ``inner``, then one slow step back.

    Every ``update`` call is one step of the inner optimizer. On calls k, 2k, ... the
    sync happens inside that same call: with :math:`\theta_k` the params plus the inner
    update and :math:`\phi` the slow weights (a copy of the initial params at first),
    :math:`\phi \leftarrow \phi + \alpha (\theta_k - \phi)`, and the returned update moves
    the params to the new :math:`\phi`. Other calls return the inner update unchanged.
    Params, gradients and updates stay plain pytrees; only floating and complex leaves
    sync (int, bool and key leaves get the inner optimizer's updates). Evaluate
    :func:`lookahead_optax.slow_params`; :func:`lookahead_optax.update_and_apply` takes
    the same step faster in a hand-written training step.

    Nothing after a lookahead may change its updates (put clipping, schedules and weight
    decay inside ``inner`` or before the lookahead): docs page "Semantics";
    :func:`lookahead_optax.check_composition` tests a pipeline once.

    Args:
      inner: The inner optimizer, an optax ``GradientTransformation``; ``update``'s extra
        keyword arguments (``value``, ``grad``, ...) are passed to it.
      k: Sync period, an int in [1, 2**31 - 1] or a traced integer scalar (under
        ``optax.inject_hyperparams``); a changed ``k`` applies from the next cycle.
      alpha: Slow step size in (0, 1] (default 0.5), a scalar array, a schedule of the
        sync index j = 0, 1, ..., or :func:`lookahead_optax.adaptive_alpha`.
        ``alpha=a`` is ``outer=optax.sgd(a)`` bit for bit; ``alpha=1`` is ``inner``.
      outer: Any optax transformation for the slow step instead of ``alpha``: at each
        sync ``u, s = outer.update(Delta, s, phi)`` with :math:`\Delta = \phi - \theta_k`,
        then :math:`\phi \leftarrow \phi + u` (``optax.sgd(0.7, momentum=0.9,
        nesterov=True)`` is SNOO's and DiLoCo's step). Docs page "Outer optimizers (SNOO)
        and DiLoCo".
      inner_state: At a sync, ``"keep"`` (default) the inner state, ``"reset"`` its
        params-shaped records (schedules keep counting), or ``"pullback"`` interpolate
        them like the weights (stores one more copy). Docs page "Inner state, alpha
        schedules, adaptive alpha, fp32 slow weights".
      slow_dtype: Floating dtype of the slow weights (e.g. ``jnp.float32`` for bf16
        params). Default: the params' dtype.
      workers: DiLoCo with N workers on a leading axis of params, grads and inner states
        (:func:`lookahead_optax.replicate` makes it); a sync averages their
        pseudo-gradients.
      axis_name: The same inside your own ``shard_map``, ``pmap`` or ``vmap``: params have
        one worker's shapes and the sync averages over ``axis_name``.
      communication_dtype: The dtype each worker's pseudo-gradient travels in (e.g.
        ``jnp.bfloat16``; the mean accumulates in float32), or a quantized one
        (``jnp.int8``, ``jnp.int4``, ``jnp.int2``, ``jnp.float8_e4m3fn``,
        ``jnp.float8_e5m2``) sent in scaled blocks. Default: the slow dtype.
      fragments: Streaming DiLoCo: the floating leaves sync in this many groups in turn,
        each with its own outer state (``k`` a multiple of it).
      overlap: Steps, in [0, k / fragments), that a fragment's pseudo-gradient travels
        before its sync (torchft's ``fragment_sync_delay``); kept in
        ``LookaheadState.in_flight``. Needs a Python int ``k``.
      mixing: In [0, 1]: a sync lands each worker on ``phi + mixing (theta - phi)``
        (torchft's ``fragment_update_alpha``). Default 0: on ``phi``.
      communication_block: Values per float32 scale in a quantized exchange (default 256).
      error_feedback: With a quantized exchange, each worker adds what its last
        quantization lost to its next pseudo-gradient (``LookaheadState.residual``).
      sync_stats: With ``workers`` or ``axis_name``, compute
        :class:`lookahead_optax.SyncStats` at each sync. Default False: the state keeps
        the record, filled with NaN, since on XLA:CPU computing them keeps every worker's
        pseudo-gradient in memory and makes the sync step about twice as slow (docs page
        "Performance").

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a
      :class:`LookaheadState`.

    Raises:
      TypeError: if ``inner`` or ``outer`` is not a GradientTransformation.
      ValueError: if an argument is not one of its allowed values or the arguments do
        not go together; the message names the argument and what is allowed.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> import lookahead_optax as lo
      >>> tx = lo.lookahead(optax.sgd(0.1), k=2, alpha=0.5)
      >>> params = {"w": jnp.array([1.0, -2.0])}
      >>> opt_state = tx.init(params)
      >>> for _ in range(2):
      ...     grads = params  # gradient of 0.5 * ||w||^2
      ...     updates, opt_state = tx.update(grads, opt_state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> params["w"]  # 0.5 * (1 + 0.9**2): half way back to the start
      Array([ 0.905, -1.81 ], dtype=float32)

      A Nesterov outer step (SNOO): Delta = 0.19 w0, and the first sync moves the slow
      weights by ``-0.7 (Delta + 0.9 Delta)``.

      >>> tx = lo.lookahead(optax.sgd(0.1), k=2, outer=optax.sgd(0.7, momentum=0.9, nesterov=True))
      >>> params = {"w": jnp.array([1.0, -2.0])}
      >>> opt_state = tx.init(params)
      >>> for _ in range(2):
      ...     updates, opt_state = tx.update(params, opt_state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> params["w"]
      Array([ 0.7473, -1.4946], dtype=float32)

    References:
      Zhang, Lucas, Hinton, Ba, `Lookahead Optimizer: k steps forward, 1 step back
      <https://arxiv.org/abs/1907.08610>`_, NeurIPS 2019. Kallusky et al., `SNOO
      <https://arxiv.org/abs/2510.15830>`_, 2025. Douillard et al., `DiLoCo
      <https://arxiv.org/abs/2311.08105>`_, 2023.
    """
    alpha = _checks.check_arguments(
        inner, k, alpha, outer, inner_state, slow_dtype, workers, axis_name,
        communication_dtype, fragments, overlap, mixing, communication_block,
        error_feedback, sync_stats,
    )  # fmt: skip
    inner = optax.with_extra_args_support(inner)
    config = _update.Config(
        inner=inner,
        stepper=inner if workers is None else _workers.per_worker(inner, int(workers)),
        k=k,
        alpha=alpha,
        outer=None if outer is None else optax.with_extra_args_support(outer),
        policy=inner_state,
        slow_dtype=slow_dtype,
        where=_sync.Where(
            None if workers is None else int(workers),
            axis_name,
            communication_dtype,
            block=256 if communication_block is None else int(communication_block),
            stats=sync_stats,
        ),
        fragments=1 if fragments is None else int(fragments),
        overlap=int(overlap or 0),
        mixing=float(mixing or 0.0),
        error_feedback=bool(error_feedback),
    )

    def update_fn(updates, state, params=None, **extra_args):
        _consistency.check_state(state, config)
        _consistency.check_trees(updates, params, state.slow, config.where.workers)
        hint = extra_args.pop(HINT_KEY, None)  # never forwarded to the inner optimizer
        # update_and_apply may have decided this call's sync (note 5); None: decide here.
        sync = (
            hint.take(state.count, config.fragments, config.overlap)
            if isinstance(hint, SyncHint)
            else None
        )
        return _update.update(config, updates, state, params, sync, extra_args)

    return optax.GradientTransformationExtraArgs(
        lambda params: _update.init(config, params), update_fn
    )

"""Lookahead as a drop-in optax transformation: params stay a plain pytree.

Algorithm 1 of Zhang et al. (2019), grown into its two-loop family: the inner optimizer
takes k fast steps from the slow weights, then one sync (``_sync.py``: the algorithm)
moves the slow weights and the fast weights restart there. The slow weights live in the
optimizer state, so params, gradients and updates keep one structure. How a step is
arranged for XLA is ``_steps.py``; many workers are ``_workers.py``; what happens to the
inner state at a sync is ``_policies.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lookahead_optax import _checks, _comm, _consistency, _policies, _steps, _sync, _workers
from lookahead_optax._adaptive import AdaptiveAlpha
from lookahead_optax._state import HINT_KEY, LookaheadState, SyncHint
from lookahead_optax._tree import (
    floats_only,
    fragment_trees,
    is_inexact,
    is_masked,
    slow_dtype_for,
)

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
    config = _Config(
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
        return _update(config, updates, state, params, sync, extra_args)

    return optax.GradientTransformationExtraArgs(lambda params: _init(config, params), update_fn)


class _Config(NamedTuple):
    """What ``lookahead`` was built with, checked and normalised."""

    inner: optax.GradientTransformationExtraArgs
    stepper: optax.GradientTransformationExtraArgs  # inner, per worker with ``workers``
    k: int | jax.Array
    alpha: Any  # None with an outer optimizer
    outer: optax.GradientTransformationExtraArgs | None
    policy: str
    slow_dtype: Any
    where: _sync.Where
    fragments: int
    overlap: int = 0  # tau: steps a fragment's average travels (_steps.run_overlapped)
    mixing: float = 0.0  # a: a sync lands on phi + a (theta - phi)
    error_feedback: bool = False  # quantization residuals in the state (_comm)


def _init(config: _Config, params: optax.Params) -> LookaheadState:
    where = config.where
    _consistency.check_worker_axes(params, where.workers)  # before vmap's own rank error
    _consistency.check_quantized_params(params, where.communication_dtype)

    def copy(p):
        # A real copy (not an alias of params), so params and state can both be donated.
        p = jnp.asarray(p)
        if where.workers is not None:  # the shared slow weights start at worker 0's params
            _consistency.check_worker_axis(p, where.workers)
            p = _workers.first_worker(p)
        dtype = slow_dtype_for(p, config.slow_dtype) if is_inexact(p) else None
        return jnp.array(p, dtype=dtype, copy=True)

    inner_init = config.stepper.init(params)
    slow = jax.tree.map(copy, params)
    if config.policy != "keep":
        _policies.params_mask(config.inner, inner_init, config.policy)  # fail now
    outer_states = (
        [None] * config.fragments
        if config.outer is None
        else [config.outer.init(part) for part in fragment_trees(slow, config.fragments)]
    )
    return LookaheadState(
        inner_state=inner_init,
        slow=slow,
        count=jnp.zeros([], jnp.int32),
        syncs=jnp.zeros([], jnp.int32),
        period=jnp.asarray(config.k, jnp.int32),
        # A separate copy: aliasing inner_state would break donating the state.
        cycle_start=(
            jax.tree.map(lambda x: jnp.array(x, copy=True), inner_init)
            if config.policy == "pullback"
            else None
        ),
        adaptive=(
            config.alpha.init(params, inner_init)
            if isinstance(config.alpha, AdaptiveAlpha)
            else None
        ),
        outer_state=_pack(outer_states, config),
        sync_stats=_workers.initial_stats(params, where),
        in_flight=(
            jax.tree.map(
                lambda s: s if is_masked(s) else jnp.zeros_like(s),
                floats_only(slow),
                is_leaf=is_masked,
            )
            if config.overlap
            else None
        ),
        residual=_comm.residual_init(params, slow) if config.error_feedback else None,
        fragments=config.fragments,
        mixing=config.mixing,
    )


def _pack(outer_states: list[Any], config: _Config) -> Any:
    """The state's ``outer_state``: one fragment's as it is, several as a tuple; None for alpha."""
    if config.outer is None:
        return None
    return outer_states[0] if config.fragments == 1 else tuple(outer_states)


def _unpack(outer_state: Any, config: _Config) -> list[Any]:
    if config.outer is None:
        return [None] * config.fragments
    return [outer_state] if config.fragments == 1 else list(outer_state)


def _update(config, updates, state, params, sync: bool | None, extra_args):
    """One step: ``sync`` decided in Python (True/False), or None: traced from the state."""
    params = jax.tree.map(jnp.asarray, params)  # Python-float leaves, as optax allows
    count = state.count + 1
    syncs: list[Any]  # per fragment: a Python bool (decided) or traced
    if sync is None:
        wrap = count >= state.period
        syncs = _steps.fragment_syncs(count, state.period, config.fragments)
    else:
        wrap, syncs = sync, [sync]

    def inner_step(inner_state):
        return config.stepper.update(updates, inner_state, params, **extra_args)

    adaptive = isinstance(config.alpha, AdaptiveAlpha)
    first = (
        sync is not None or adaptive or _steps.has_effects(lambda: inner_step(state.inner_state))
    )
    inner_result = inner_step(state.inner_state) if first else None  # notes 4 and 5
    step_alpha, adaptive_state = _step_alpha(config, state, wrap, updates, params, inner_result)
    outer_step = (
        _sync.alpha_step(step_alpha) if config.outer is None else _sync.optax_step(config.outer)
    )
    parts = fragment_trees(state.slow, config.fragments)
    outer_in = _unpack(state.outer_state, config)
    in_flight = state.in_flight
    if config.overlap:
        new_parts, outer_states, stats, in_flight, residual = _steps.overlapped(
            config, state, parts, outer_in, params, outer_step, syncs
        )
        inner_updates, new_inner_state = (
            inner_step(state.inner_state) if inner_result is None else inner_result
        )
    else:
        new_parts, outer_states, stats, residual, (inner_updates, new_inner_state) = (
            _steps.synced(
                config, state, parts, outer_in, params, outer_step, syncs, inner_step,
                inner_result,
            )
        )  # fmt: skip
    new_slow, new_updates = _sync.land(
        state.slow, new_parts, syncs, params, inner_updates, config.mixing
    )
    new_inner_state, cycle_start = _policies.at_sync(
        config.policy, config.inner, config.stepper.init, wrap, new_inner_state,
        state.cycle_start, new_slow, params, step_alpha,
    )  # fmt: skip
    return new_updates, LookaheadState(
        inner_state=new_inner_state,
        slow=new_slow,
        count=jnp.where(wrap, 0, count).astype(jnp.int32),
        syncs=jnp.where(wrap, optax.safe_increment(state.syncs), state.syncs),
        period=jnp.where(wrap, jnp.asarray(config.k).astype(jnp.int32), state.period),
        cycle_start=cycle_start,
        adaptive=adaptive_state,
        outer_state=_pack(outer_states, config),
        sync_stats=stats,
        in_flight=in_flight,
        residual=residual,
        fragments=config.fragments,
        mixing=config.mixing,
    )


def _step_alpha(config, state, wrap, updates, params, inner_result):
    """This call's alpha (None with an outer optimizer) and the adaptive state."""
    if config.outer is not None:
        return None, state.adaptive
    if isinstance(config.alpha, AdaptiveAlpha):
        inner_updates, new_inner_state = inner_result
        return config.alpha.step(
            jnp.asarray(wrap), updates, inner_updates, params, state.slow, new_inner_state,
            state.adaptive,
        )  # fmt: skip
    alpha = config.alpha(state.syncs) if callable(config.alpha) else config.alpha
    return jnp.asarray(alpha), state.adaptive

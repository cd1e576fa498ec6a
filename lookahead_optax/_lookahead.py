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

from lookahead_optax import _checks, _comm, _policies, _steps, _sync, _workers
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
    sync_stats: bool = True,
) -> optax.GradientTransformationExtraArgs:
    r"""Lookahead: k fast steps of ``inner``, then one slow step back.

    Every ``update`` call is one step of the inner optimizer. On calls k, 2k,
    3k, ... the sync happens inside that same call: with :math:`\theta_k` the
    params plus the inner update and :math:`\phi` the slow weights,

    .. math::
        \phi \leftarrow \phi + \alpha (\theta_k - \phi),

    and the returned update moves the params to the new :math:`\phi`. On every
    other call the update is exactly the inner optimizer's. The slow weights
    start as a copy of the initial params. Params, gradients and updates stay
    plain pytrees, so this drops into ``optax.chain``, Flax's ``TrainState``
    and ``nnx.Optimizer``. Evaluate the slow weights with
    :func:`lookahead_optax.slow_params`. In a hand-written training step,
    :func:`lookahead_optax.update_and_apply` takes the same step faster.

    **Composition rule.** Nothing after a lookahead may change the updates it
    returns: a sync's update must move the params exactly onto the slow
    weights. Put learning rates, clipping, weight decay and
    ``reduce_on_plateau`` inside ``inner`` (``lookahead(optax.chain(clip,
    adam, decay))``) or before the lookahead (``optax.chain(clip,
    lookahead(adam))``), never after it. :func:`lookahead_optax.check_composition`
    tests a transformation for this once.

    Only floating (and complex) leaves of params take part in the sync. Leaves
    of other dtypes (int, bool, PRNG keys) are the inner optimizer's business:
    their updates pass through unchanged.

    Args:
      inner: The inner ("fast") optimizer, an optax ``GradientTransformation``.
        Extra keyword arguments given to ``update`` (``value``, ``grad``,
        ``value_fn``, ...) are passed to it.
      k: Sync period, an int in [1, 2**31 - 1] (or a traced integer scalar,
        e.g. under ``optax.inject_hyperparams``). A changed ``k`` takes effect
        from the next cycle (see ``LookaheadState.period``).
      alpha: Slow step size in (0, 1] (default 0.5), a scalar array, or a
        schedule: a callable of the sync index j = 0, 1, 2, ... (the j-th sync
        uses ``alpha(j)``), or :func:`lookahead_optax.adaptive_alpha` (the
        paper's line search on a diagonal quadratic model). ``alpha=1``
        recovers the inner optimizer. ``alpha=a`` is ``outer=optax.sgd(a)``,
        bit for bit.
      outer: An optax transformation for the slow step, instead of ``alpha``.
        At each sync it is applied to the pseudo-gradient
        :math:`\Delta = \phi - \theta_k` with the slow weights as params,
        ``u, outer_state = outer.update(Delta, outer_state, phi)``, and
        :math:`\phi \leftarrow \phi + u`. Its state lives in
        ``LookaheadState.outer_state`` (initialised on the slow weights, so in
        ``slow_dtype``) and changes on sync calls only; a schedule inside it
        counts syncs. ``optax.sgd(lr, momentum=mu, nesterov=True)`` is SNOO's
        and DiLoCo's outer step: it computes ``b <- mu b + Delta;
        phi <- phi - lr (Delta + mu b)``, what ``torch.optim.SGD(nesterov=True,
        dampening=0)`` computes with Delta as the gradient (DiLoCo: lr 0.7,
        mu 0.9). Any chain works (Adam, clipping of Delta, schedules).
      inner_state: What happens to the inner state at a sync; it acts on the
        leaves of the inner state shaped like the params (moments, momentum
        traces: those ``optax.tree_map_params`` maps). ``"keep"`` (default)
        carries everything over. ``"reset"`` re-initialises, from the new
        params, every state record that holds such leaves (Adam's moments with
        their bias-correction count); records without them (learning-rate
        schedules, ``inject_hyperparams``' count and values,
        ``reduce_on_plateau``) keep their values, so schedules keep decaying.
        ``"pullback"`` interpolates those leaves like the weights,
        ``s <- s0 + alpha (s - s0)`` with ``s0`` the inner state at the start
        of the cycle, and leaves every other leaf (counters, scalars such as an
        injected learning rate or a line search's values) alone. Pullback
        stores ``s0``: one extra copy of the inner state.
      slow_dtype: Floating dtype to store and update the slow weights in, e.g.
        ``jnp.float32`` for bf16 params, so the small slow steps are not
        rounded away. Default: the params' dtype. Complex leaves keep complex
        slow weights of that precision.
      workers: Many workers (DiLoCo): params, grads, updates and the inner
        states carry a leading worker axis of size ``workers``
        (:func:`lookahead_optax.replicate` makes it); each worker runs ``inner``
        on its own slice and a sync averages the workers' pseudo-gradients. See
        the docs page "Outer optimizers (SNOO) and DiLoCo".
      axis_name: The same inside your own ``shard_map``, ``pmap`` or
        ``vmap(axis_name=...)``: params have one worker's shapes and the sync
        averages with ``lax.pmean(..., axis_name)``.
      communication_dtype: The dtype each worker's pseudo-gradient is rounded
        to for the exchange (e.g. ``jnp.bfloat16``); the mean accumulates in at
        least float32. Default: the slow dtype.
      fragments: Streaming DiLoCo: the floating leaves split into this many
        contiguous groups that sync in turn, each with its own outer state
        (``k`` a multiple of it). See the docs page "Outer optimizers (SNOO)
        and DiLoCo".
      overlap: Streaming DiLoCo's overlapped communication (torchft's
        ``fragment_sync_delay``), an int in [0, k / fragments): each fragment's
        pseudo-gradient is taken ``overlap`` steps before its sync, from the
        params the call receives (the fast weights after step ``s - overlap``),
        and its average is kept in ``LookaheadState.in_flight`` (one slow-sized
        buffer) until the sync applies it. No step in between reads it, so the
        collective can run beside them. 0 or None (default): taken at the sync.
        Needs a Python int ``k`` and a fixed alpha or ``outer``; ``sync_stats``
        then describe the pseudo-gradient sent.
      mixing: torchft's ``fragment_update_alpha``, in [0, 1]: at a sync each
        worker's params land on ``phi + mixing (theta - phi)`` (``phi`` the new
        slow weights, ``theta`` its fast weights of that step) instead of on
        ``phi``. 0 or None (default) lands on ``phi``; 1 leaves the fast weights.
      communication_block: With ``communication_dtype=jnp.int8`` (or a float8
        dtype such as ``jnp.float8_e4m3fn``), the number of values that share
        one float32 scale (default 256). A quantized ``communication_dtype``
        exchanges the pseudo-gradients as blocks of that type: an all-to-all of
        quantized chunks, a float32 sum of each chunk on its worker,
        requantized, then an all-gather (the wire carries one byte per value
        plus the scales). Needs ``workers`` or ``axis_name``.
      error_feedback: With a quantized ``communication_dtype``: each worker
        keeps what quantizing its pseudo-gradient lost and adds it to its next
        one. Costs one params-sized float32 buffer per worker
        (``LookaheadState.residual``). Default None: off.
      sync_stats: With ``workers`` or ``axis_name``, whether each sync
        computes :class:`lookahead_optax.SyncStats` (the pseudo-gradient norm
        and each worker's drift; default True). They read every worker's
        pseudo-gradient once more: on XLA:CPU that keeps the params-sized
        pseudo-gradients in memory and makes the sync step about twice as slow
        (docs page "Performance"). ``False`` skips them: the state keeps its
        ``sync_stats`` record (same tree, so checkpoints of either setting
        restore into the other), filled with NaN.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a
      :class:`LookaheadState`.

    Raises:
      TypeError: if ``inner`` or ``outer`` is not a GradientTransformation.
      ValueError: if ``k``, ``alpha``, ``inner_state`` or ``slow_dtype`` is
        not one of the allowed values (the message says which are), or
        ``outer`` is given with ``alpha`` or with ``inner_state="pullback"``,
        or ``workers``/``axis_name``/``communication_dtype`` are inconsistent.

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
      >>> lo.slow_params(opt_state, params)["w"]
      Array([ 0.905, -1.81 ], dtype=float32)

      A Nesterov outer step (SNOO): the sync moves the slow weights by
      ``-0.7 (Delta + 0.9 Delta)`` the first time, as the momentum starts at 0.

      >>> tx = lo.lookahead(optax.sgd(0.1), k=2, outer=optax.sgd(0.7, momentum=0.9, nesterov=True))
      >>> params = {"w": jnp.array([1.0, -2.0])}
      >>> opt_state = tx.init(params)
      >>> for _ in range(2):
      ...     updates, opt_state = tx.update(params, opt_state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> params["w"]  # Delta = 0.19 w0; phi = w0 - 0.7 * 1.9 * 0.19 w0 = 0.7473 w0
      Array([ 0.7473, -1.4946], dtype=float32)

    References:
      Zhang, Lucas, Hinton, Ba, `Lookahead Optimizer: k steps forward, 1 step
      back <https://arxiv.org/abs/1907.08610>`_, NeurIPS 2019.

      Kallusky et al., `SNOO: Step-K Nesterov Outer Optimizer
      <https://arxiv.org/abs/2510.15830>`_, 2025. Douillard et al., `DiLoCo:
      Distributed Low-Communication Training of Language Models
      <https://arxiv.org/abs/2311.08105>`_, 2023.
    """
    _checks.check_inner(inner)
    _checks.check_k(k)
    _checks.check_inner_state_policy(inner_state)
    _checks.check_slow_dtype(slow_dtype)
    if outer is None:
        alpha = 0.5 if alpha is None else alpha
        _checks.check_alpha(alpha)
    else:
        _checks.check_outer(outer, alpha, inner_state)
    _checks.check_workers(workers, axis_name, communication_dtype, alpha)
    if not isinstance(sync_stats, bool):
        raise ValueError(f"sync_stats must be True or False, got {sync_stats!r}")
    _checks.check_fragments(fragments, k, alpha, inner_state)
    _checks.check_overlap(overlap, mixing, k, fragments, alpha)
    _checks.check_quantized(
        communication_dtype, communication_block, error_feedback, workers, axis_name
    )
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
        _checks.check_state(state, config)
        _checks.check_trees(updates, params, state.slow, config.where.workers)
        hint = extra_args.pop(HINT_KEY, None)  # never forwarded to the inner optimizer
        # update_and_apply may have decided this call's sync (note 5); None: decide here.
        sync = hint.take(state.count, config.fragments) if isinstance(hint, SyncHint) else None
        if config.overlap and isinstance(hint, SyncHint) and hint.taken:
            hint.taken, sync = False, None
            hint.refused = (
                f"the lookahead has overlap={config.overlap}: a pseudo-gradient is sent and "
                "applied on different steps (as fragments > 1 sync on different steps), so "
                "there is no single sync decision to take"
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
    _checks.check_worker_axes(params, where.workers)  # before vmap's own rank error
    _checks.check_quantized_params(params, where.communication_dtype)

    def copy(p):
        # A real copy (not an alias of params), so params and state can both be donated.
        p = jnp.asarray(p)
        if where.workers is not None:  # the shared slow weights start at worker 0's params
            _checks.check_worker_axis(p, where.workers)
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
    in_flight, residual = state.in_flight, state.residual
    if config.overlap:
        new_parts, outer_states, stats, in_flight, residual = _overlapped(
            config, state, parts, params, outer_step, syncs
        )
        inner_updates, new_inner_state = (
            inner_step(state.inner_state) if inner_result is None else inner_result
        )
    else:
        new_parts, outer_states, stats, residual, (inner_updates, new_inner_state) = _synced(
            config, state, parts, params, outer_step, syncs, inner_step, inner_result
        )
    new_slow, new_updates = _land(
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


def _land(slow, new_parts, syncs, params, inner_updates, mixing=0.0):
    """The new slow weights (each leaf from its fragment) and the returned updates (note 2)."""
    flat_slow, structure = jax.tree.flatten(slow, is_leaf=is_masked)
    treedef: Any = structure  # PyTreeDef: no stubs
    flat_parts = [treedef.flatten_up_to(part) for part in new_parts]
    new_slow, flags = [], []
    for i, old in enumerate(flat_slow):
        owners = [j for j, part in enumerate(flat_parts) if not is_masked(part[i])]
        new_slow.append(flat_parts[owners[0]][i] if owners else old)
        flags.append(syncs[owners[0]] if owners else False)
    flat_params = treedef.flatten_up_to(params)
    flat_updates = treedef.flatten_up_to(inner_updates)
    new_updates = [
        _sync.update_onto_mix(s, p, u, flag, mixing)
        if mixing
        else _sync.update_onto_slow(s, p, u, flag)
        for s, p, u, flag in zip(new_slow, flat_params, flat_updates, flags)
    ]
    return treedef.unflatten(new_slow), treedef.unflatten(new_updates)


def _synced(config, state, parts, params, outer_step, syncs, inner_step, inner_result):
    """The syncs without overlap (``_steps.run``); with error feedback each fragment's
    residual travels through the cond beside its outer state."""
    outer_in = _unpack(state.outer_state, config)
    feedback = config.error_feedback
    if feedback:
        outer_in = [(o, _select(part, state.residual)) for o, part in zip(outer_in, parts)]

    def sync_part(j, inner_updates, outer_state, stats):
        if not feedback:
            return _sync.sync(
                parts[j], outer_state, stats, params, inner_updates, outer_step, config.where
            )
        outer_state, res = outer_state
        delta, stats, res = _sync.average(parts[j], stats, params, inner_updates, config.where, res)
        new_part, outer_state = _sync.apply_outer(parts[j], delta, outer_state, outer_step)
        return new_part, (outer_state, res), stats

    new_parts, outer_out, stats, inner = _steps.run(
        syncs, parts, outer_in, state.sync_stats, sync_part, inner_step, state.inner_state,
        inner_result,
    )  # fmt: skip
    residual = state.residual
    if feedback:
        residual = _merge(residual, [res for _, res in outer_out])
        outer_out = [o for o, _ in outer_out]
    return new_parts, outer_out, stats, residual, inner


def _overlapped(config, state, parts, params, outer_step, syncs):
    """The sends and syncs of ``overlap > 0`` (``_steps.run_overlapped``)."""
    sends = _steps.fragment_sends(state.count, state.period, config.fragments, config.overlap)
    feedback = config.error_feedback
    zeros = jax.tree.map(jnp.zeros_like, params)  # Delta = phi - p: the params are theta

    def send_part(j, stats, res):
        return _sync.average(parts[j], stats, params, zeros, config.where, res)

    def apply_part(j, average, outer_state):
        return _sync.apply_outer(parts[j], average, outer_state, outer_step)

    flights = [_select(part, state.in_flight) for part in parts]
    residuals = [_select(part, state.residual) if feedback else None for part in parts]
    new_parts, outer_out, flights, stats, residuals = _steps.run_overlapped(
        sends, syncs, parts, flights, _unpack(state.outer_state, config), state.sync_stats,
        residuals, send_part, apply_part, sends_first=config.overlap == 1,
    )  # fmt: skip
    residual = _merge(state.residual, residuals) if feedback else state.residual
    return new_parts, outer_out, stats, _merge(state.in_flight, flights), residual


def _select(part, tree):
    """``tree``'s entries where the fragment ``part`` has leaves, masked elsewhere."""
    return jax.tree.map(lambda s, x: s if is_masked(s) else x, part, tree, is_leaf=is_masked)


def _merge(tree, parts):
    """``tree`` with each leaf taken from the fragment that owns it (kept where none does)."""
    flat, structure = jax.tree.flatten(tree, is_leaf=is_masked)
    treedef: Any = structure  # PyTreeDef: no stubs
    flat_parts = [treedef.flatten_up_to(part) for part in parts]
    out = []
    for i, old in enumerate(flat):
        owners = [p[i] for p in flat_parts if not is_masked(p[i])]
        out.append(owners[0] if owners else old)
    return treedef.unflatten(out)

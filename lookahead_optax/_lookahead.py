"""Lookahead as a drop-in optax transformation: params stay a plain pytree.

Algorithm 1 of Zhang et al. (2019): the inner optimizer takes k fast steps from
the slow weights, then the slow weights move a fraction alpha of the way to the
fast weights and the fast weights restart from there. The slow weights live in
the optimizer state, so the params, gradients and updates keep one structure.

One update body serves both entry points. ``sync`` is either a Python bool,
when :func:`lookahead_optax.update_and_apply` decided it before the step, or
traced, when ``tx.update`` decides it from the state. The traced form is
arranged for XLA; the notes below are referred to by number in the code.

XLA notes (measured on CPU with benchmarks/speed.py; simpler forms cost
2.5-4x the inner step and a params-sized temporary buffer):

1. The sync's ``lax.cond`` touches only the step's inputs. Its sync branch
   recomputes the inner update from (grads, inner state, params) instead of
   taking it as an operand: an inner update that flows into a cond is written
   to memory on every step. The non-sync branch passes the slow weights (an
   input) through, free when donated.
2. The returned update is one elementwise select in which the inner update
   appears once, so XLA fuses it with the inner optimizer's arithmetic and the
   caller's ``apply_updates``: it is never written to memory. Non-sync steps
   read the slow weights once more, nothing else.
3. The cond also returns a scalar True that gates the inner state read by the
   inner step (``where(True, s, 0)`` is ``s`` exactly and fuses into its one
   consumer). The data dependence runs the inner step after the cond; without
   it XLA cannot tell that the cond reads the old inner state before the inner
   step overwrites it in place (donation), and copies every params-sized inner
   state leaf on every step.
4. Recomputing (note 1) would run the inner optimizer's effects (e.g.
   ``jax.debug.callback``) twice on sync steps. When the inner update has
   effects it is computed once, before the cond, and passed in: the price of
   effects running exactly once per step is one params-sized write per step.
5. With ``sync`` static (``update_and_apply``, whose ``lax.cond`` is around the
   whole step) there is no cond here: the non-sync step is the inner step and
   never reads the slow weights; the sync step computes the inner update once,
   fused with the slow step and the caller's apply.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import Array

from lookahead_optax import _checks, _policies
from lookahead_optax._adaptive import AdaptiveAlpha
from lookahead_optax._state import HINT_KEY, LookaheadState, SyncHint, SyncStats

InnerStatePolicy = Literal["keep", "reset", "pullback"]
AlphaLike = float | Array | Callable[[Array], Array]


def _gated(x: Any, gate: Array) -> Any:
    """x where gate is True (always: only the data dependence on gate matters, note 3)."""
    if not (hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.number)):
        return x  # e.g. PRNG keys: small, an extra copy of them costs nothing
    return jnp.where(gate, x, jnp.zeros([], x.dtype))


def _promote(*dtypes) -> jnp.dtype:
    """Standard promotion, also under strict promotion (the casts that use it are explicit)."""
    with jax.numpy_dtype_promotion("standard"):
        return jnp.result_type(*dtypes)


def _slow_dtype_for(leaf: Any, slow_dtype: Any) -> Any:
    dtype = jnp.result_type(leaf)
    if slow_dtype is None:
        return dtype
    if jnp.issubdtype(dtype, jnp.complexfloating) and not jnp.issubdtype(
        slow_dtype, jnp.complexfloating
    ):
        return _promote(slow_dtype, jnp.complex64)  # keep the imaginary part
    return slow_dtype


def _update_onto_slow(slow: Array, p: Array, u: Any, sync: bool | Array) -> Any:
    """The returned update: ``slow - p`` where ``sync``, else the inner update ``u`` (note 2).

    ``sync`` is a Python bool (static: no select) or traced (one fused select). Its dtype is
    the wider of ``u``'s and ``p``'s: f32 params with bf16 grads land exactly on f32 slow weights.
    """
    if not _checks.is_inexact(p):
        return u
    u = jnp.asarray(u)
    out_dtype = _promote(u.dtype, p.dtype)
    if sync is False:
        return u.astype(out_dtype)
    wide = _promote(slow.dtype, p.dtype)
    to_slow = (slow.astype(wide) - p.astype(wide)).astype(out_dtype)
    return to_slow if sync is True else jnp.where(sync, to_slow, u.astype(out_dtype))


def _floats_only(tree: Any) -> Any:
    """The floating leaves of ``tree``; the others become ``optax.MaskedNode`` (not synced)."""
    return jax.tree.map(lambda x: x if _checks.is_inexact(x) else optax.MaskedNode(), tree)


def _fragment_trees(tree: Any, fragments: int) -> list[Any]:
    """``tree`` split into ``fragments`` trees of contiguous floating leaves (about equal
    sizes, in tree order); each holds ``optax.MaskedNode`` where the others' leaves are."""
    leaves, treedef = jax.tree.flatten(tree)
    sizes = [int(np.prod(np.shape(x))) if _checks.is_inexact(x) else 0 for x in leaves]
    total, start, owner = max(sum(sizes), 1), 0, []
    for size in sizes:
        owner.append(min(fragments - 1, int(fragments * (start + size / 2) / total)))
        start += size
    return [
        treedef.unflatten(
            [
                x if o == j and size else optax.MaskedNode()
                for x, o, size in zip(leaves, owner, sizes)
            ]
        )
        for j in range(fragments)
    ]


def _per_worker(
    inner: optax.GradientTransformationExtraArgs,
) -> optax.GradientTransformationExtraArgs:
    """``inner`` on every worker: vmapped over the leading axis of params, grads and state.

    Extra arguments of ``update`` reach every worker unchanged. A global-norm clip or
    ``apply_if_finite`` inside sees only its own worker.
    """

    def init(params):
        return _shard_worker_axis_like(jax.vmap(inner.init)(params), params)

    def update(updates, state, params=None, **extra_args):
        state = _shard_worker_axis_like(state, params)
        return jax.vmap(lambda u, s, p: inner.update(u, s, p, **extra_args))(updates, state, params)

    return optax.GradientTransformationExtraArgs(init, update)


def _shard_worker_axis_like(tree: Any, params: Any) -> Any:
    """On an Explicit mesh, ``tree``'s worker axis sharded as params' is (vmap requires it).

    ``vmap(inner.init)`` makes per-worker counters whose worker axis is not sharded;
    moving them onto the params' worker sharding is a local slice, no communication.
    Nothing to do on Auto meshes and single devices.
    """
    sharding = getattr(jax.typeof(jax.tree.leaves(params)[0]), "sharding", None)
    spec = getattr(sharding, "spec", None)
    if not spec or spec[0] is None:
        return tree
    target = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(spec[0]))

    def move(x):
        if not hasattr(x, "ndim") or x.ndim == 0:
            return x
        if jax.typeof(x).sharding.spec[:1] == (spec[0],):
            return x
        return jax.sharding.reshard(x, target)

    return jax.tree.map(move, tree)


def _first_worker(p: Array) -> Array:
    """``p[0]`` exactly, written as a reduction over the worker axis: slicing an axis that an
    Explicit mesh shards is not allowed, a reduction is (one all-reduce, at init only)."""
    first = jnp.arange(p.shape[0]).reshape((-1,) + (1,) * (p.ndim - 1)) == 0
    return jnp.sum(jnp.where(first, p, jnp.zeros([], p.dtype)), axis=0, dtype=p.dtype)


def _has_effects(fn: Callable[[], Any]) -> bool:
    return bool(jax.make_jaxpr(fn)().effects)


def lookahead(
    inner: optax.GradientTransformation,
    k: int | Array = 5,
    alpha: AlphaLike | None = None,
    *,
    outer: optax.GradientTransformation | None = None,
    inner_state: InnerStatePolicy = "keep",
    slow_dtype: jax.typing.DTypeLike | None = None,
    workers: int | None = None,
    axis_name: Any = None,
    communication_dtype: jax.typing.DTypeLike | None = None,
    fragments: int | None = None,
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
        (:func:`lookahead_optax.replicate` makes it). Each worker runs the
        inner optimizer on its own slice (vmapped: a global-norm clip inside
        sees only its worker); at a sync :math:`\Delta = \phi - \mathrm{mean}_w
        \theta_w`, one outer step, and every worker restarts at the new
        :math:`\phi`. The slow weights, outer state and counters are shared
        (no worker axis; :math:`\phi` starts at worker 0's params). Sharded
        over a mesh axis, the step communicates only at the sync: one
        all-reduce of one params' worth.
      axis_name: The same inside your own ``shard_map``, ``pmap`` or
        ``vmap(axis_name=...)``: params have one worker's shapes and the sync
        averages the pseudo-gradient with ``lax.pmean(..., axis_name)``.
      communication_dtype: The dtype the pseudo-gradient is averaged in (e.g.
        ``jnp.bfloat16``: half the bytes of float32); default the slow dtype.
      fragments: Streaming DiLoCo (Douillard et al. 2025; default None: one
        fragment, everything syncs together): the floating leaves
        split into this many contiguous groups of about equal size (in tree
        order); fragment j syncs, with its own outer state, at step
        ``(j + 1) k / fragments`` of every cycle, so one sync moves about
        ``1 / fragments`` of the bytes and the total stays. ``k`` must be a
        multiple of it. With more than one fragment there is no single sync
        decision, so ``update_and_apply`` takes the ``tx.update`` path, and
        ``sync_stats`` describes the latest fragment's sync.

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
        outer = optax.with_extra_args_support(outer)
    _checks.check_workers(workers, axis_name, communication_dtype, alpha)
    _checks.check_fragments(fragments, k, alpha, inner_state)
    fragments = 1 if fragments is None else int(fragments)
    policy = inner_state
    inner = optax.with_extra_args_support(inner)
    # Per-worker inner optimizer: params, grads and inner states carry a leading worker axis.
    stepper = inner if workers is None else _per_worker(inner)

    def average_over_workers(delta: Array) -> Array:
        """The sync's only communication: the mean of the workers' pseudo-gradients."""
        if workers is None and axis_name is None:
            return delta
        sent = delta.astype(communication_dtype or delta.dtype)
        if workers is not None:  # explicit axis 0; sharded over a mesh, an all-reduce
            mean = jnp.sum(sent, axis=0, dtype=sent.dtype) / jnp.asarray(workers, sent.dtype)
        else:  # inside the user's shard_map / pmap / vmap over axis_name
            mean = jax.lax.pmean(sent, axis_name)
        return mean.astype(delta.dtype)

    def initial_stats(params: optax.Params) -> SyncStats | None:
        if workers is None and axis_name is None:
            return None
        drift_shape = () if workers is None else (workers,)
        drift = jnp.zeros(drift_shape, jnp.float32)
        if workers is not None:
            drift = _shard_worker_axis_like(drift, params)
        return SyncStats(jnp.zeros([], jnp.float32), drift)

    def sync_stats(per_worker, delta, like: SyncStats) -> SyncStats:
        """The norm of Delta and each worker's distance to the mean, for SyncStats."""

        def squares(x, axes):
            return jnp.sum(jnp.square(x.astype(jnp.float32)), axis=axes)

        norm = jnp.sqrt(sum(squares(d, None) for d in jax.tree.leaves(delta)))
        if workers is not None:  # per worker: a local reduction over its own axes
            drift = sum(
                squares(w - d, tuple(range(1, w.ndim)))
                for w, d in zip(jax.tree.leaves(per_worker), jax.tree.leaves(delta))
            )
        else:  # the mean over workers: one scalar all-reduce, and the same on every worker
            pairs = zip(jax.tree.leaves(per_worker), jax.tree.leaves(delta))
            drift = jax.lax.pmean(sum(squares(w - d, None) for w, d in pairs), axis_name)
        new = SyncStats(norm, jnp.sqrt(drift))
        return _policies.match_types(new, like)

    def init_fn(params: optax.Params) -> LookaheadState:
        # A real copy (not an alias of params) so params and state can both be
        # donated to a jitted step; jnp.array(copy=True) copies even when the dtype is equal.
        def copy(p):
            dtype = _slow_dtype_for(p, slow_dtype) if _checks.is_inexact(p) else None
            if workers is not None:  # the shared slow weights start at worker 0's params
                _checks.check_worker_axis(p, workers)
                p = _first_worker(jnp.asarray(p))
            return jnp.array(p, dtype=dtype, copy=True)

        inner_init = stepper.init(params)
        slow = jax.tree.map(copy, params)
        if policy != "keep":
            _policies.params_mask(inner, inner_init, policy)  # fails now, not at the first sync
        return LookaheadState(
            inner_state=inner_init,
            slow=slow,
            count=jnp.zeros([], jnp.int32),
            syncs=jnp.zeros([], jnp.int32),
            period=jnp.asarray(k, jnp.int32),
            # A separate copy: aliasing inner_state would break donating the state.
            cycle_start=(
                jax.tree.map(lambda x: jnp.array(x, copy=True), inner_init)
                if policy == "pullback"
                else None
            ),
            adaptive=(alpha.init(params, inner_init) if isinstance(alpha, AdaptiveAlpha) else None),
            outer_state=(
                None
                if outer is None
                else outer.init(_floats_only(slow))
                if fragments == 1
                else tuple(outer.init(part) for part in _fragment_trees(slow, fragments))
            ),
            sync_stats=initial_stats(params),
        )

    def update_fn(updates, state: LookaheadState, params=None, **extra_args):
        _checks.check_state(state)
        _checks.check_trees(updates, params, state.slow, workers)
        hint = extra_args.pop(HINT_KEY, None)  # never forwarded to the inner optimizer
        if fragments > 1:  # several syncs per cycle: no single static decision to take
            return streaming_body(updates, state, params, extra_args)
        if isinstance(hint, SyncHint) and hint.count is state.count:
            hint.taken = True
            return update_body(updates, state, params, hint.sync, extra_args)
        return update_body(updates, state, params, None, extra_args)

    def update_body(updates, state, params, sync: bool | None, extra_args):
        """One step; ``sync`` is static (True/False) or None: decided here, traced."""
        params = jax.tree.map(jnp.asarray, params)  # Python-float leaves, as optax allows
        count = state.count + 1
        traced = sync is None
        if traced:
            sync = count >= state.period

        def inner_step(inner_state=state.inner_state):
            return stepper.update(updates, inner_state, params, **extra_args)

        inner_result = None  # the inner step, when it must run before the slow step
        adaptive = None
        if isinstance(alpha, AdaptiveAlpha):
            inner_result = inner_step()
            step_alpha, adaptive = alpha.step(
                jnp.asarray(sync), updates, *inner_result[:1], params, state.slow,
                inner_result[1], state.adaptive,
            )  # fmt: skip
        elif outer is None:
            step_alpha = alpha(state.syncs) if callable(alpha) else alpha
        step_alpha = None if outer is not None else jnp.asarray(step_alpha)

        def worker_pseudo_gradient(u, p, slow):
            """phi - theta_k (theta_k = params + the inner update), per worker, slow dtype."""
            if not _checks.is_inexact(slow):
                return optax.MaskedNode()  # not synced
            u = jnp.asarray(u)  # Python-float updates of Python-float params
            return slow - (p.astype(slow.dtype) + u.astype(slow.dtype))

        def slow_step(inner_updates):
            """The sync: (new slow weights, new outer state, sync stats)."""
            per_worker = jax.tree.map(worker_pseudo_gradient, inner_updates, params, state.slow)
            delta = jax.tree.map(average_over_workers, per_worker)  # Delta, shared
            stats = (
                None
                if state.sync_stats is None
                else sync_stats(per_worker, delta, state.sync_stats)
            )
            if outer is None:  # Algorithm 1: phi <- phi + alpha (theta_k - phi) = phi - alpha Delta
                return jax.tree.map(
                    lambda s, d: s if _checks.is_masked(d) else s - step_alpha.astype(s.dtype) * d,
                    state.slow, delta,
                ), state.outer_state, stats  # fmt: skip
            # The outer optimizer's step on the pseudo-gradient:
            # u, outer_state <- outer.update(Delta, outer_state, phi); phi <- phi + u.
            slow = _floats_only(state.slow)
            outer_updates, outer_state = outer.update(delta, state.outer_state, slow)
            moved = jax.tree.map(lambda s, u: s + u.astype(s.dtype), slow, outer_updates)
            merged = jax.tree.map(lambda s, m: s if _checks.is_masked(m) else m, state.slow, moved)
            return merged, _policies.match_types(outer_state, state.outer_state), stats

        unchanged = (state.slow, state.outer_state, state.sync_stats)
        if not traced:  # note 5
            inner_updates, new_inner_state = inner_result or inner_step()
            new_slow, new_outer_state, new_stats = slow_step(inner_updates) if sync else unchanged
        elif inner_result is None and not _has_effects(inner_step):  # notes 1 and 3
            new_slow, new_outer_state, new_stats, gate = jax.lax.cond(
                sync,
                lambda: (*slow_step(inner_step()[0]), jnp.array(True)),
                lambda: (*unchanged, jnp.array(True)),
            )
            gated_state = jax.tree.map(lambda s: _gated(s, gate), state.inner_state)
            inner_updates, new_inner_state = inner_step(gated_state)
        else:  # note 4
            inner_updates, new_inner_state = inner_result or inner_step()
            new_slow, new_outer_state, new_stats = jax.lax.cond(
                sync, lambda: slow_step(inner_updates), lambda: unchanged
            )

        new_updates = jax.tree.map(
            lambda slow, p, u: _update_onto_slow(slow, p, u, sync), new_slow, params, inner_updates
        )
        new_inner_state, cycle_start = sync_inner_state(
            sync, traced, new_inner_state, state.cycle_start, new_slow, params, step_alpha
        )
        new_state = LookaheadState(
            inner_state=new_inner_state,
            slow=new_slow,
            count=jnp.where(sync, 0, count).astype(jnp.int32),
            syncs=jnp.where(sync, optax.safe_increment(state.syncs), state.syncs),
            period=jnp.where(sync, jnp.asarray(k).astype(jnp.int32), state.period),
            cycle_start=cycle_start,
            adaptive=adaptive,
            outer_state=new_outer_state,
            sync_stats=new_stats,
        )
        return new_updates, new_state

    def streaming_body(updates, state, params, extra_args):
        """Streaming DiLoCo: fragment j of the params syncs at step (j + 1) period / P of a cycle.

        Each fragment's sync is the usual one (notes 1 and 3) restricted to its leaves,
        with its own outer state, so one step communicates about 1/P of the params.
        """
        params = jax.tree.map(jnp.asarray, params)
        count = state.count + 1
        wrap = count >= state.period
        step_alpha = None if outer is not None else jnp.asarray(
            alpha(state.syncs) if callable(alpha) else alpha
        )  # fmt: skip

        def inner_step(inner_state=state.inner_state):
            return stepper.update(updates, inner_state, params, **extra_args)

        def fragment_sync(j, inner_updates):
            mine = _fragment_trees(state.slow, fragments)[j]
            per_worker = jax.tree.map(
                lambda s, u, p: s if _checks.is_masked(s)
                else s - (p.astype(s.dtype) + jnp.asarray(u).astype(s.dtype)),
                mine, inner_updates, params, is_leaf=_checks.is_masked,
            )  # fmt: skip
            delta = jax.tree.map(average_over_workers, per_worker)
            stats = (
                None
                if state.sync_stats is None
                else sync_stats(per_worker, delta, state.sync_stats)
            )
            if outer is None:
                return jax.tree.map(
                    lambda s, d: s - step_alpha.astype(s.dtype) * d, mine, delta
                ), state.outer_state, stats  # fmt: skip
            outer_updates, outer_state_j = outer.update(delta, state.outer_state[j], mine)
            moved = jax.tree.map(lambda s, u: s + u.astype(s.dtype), mine, outer_updates)
            outer_state = list(state.outer_state)
            outer_state[j] = _policies.match_types(outer_state_j, state.outer_state[j])
            return moved, tuple(outer_state), stats

        new_slow, new_outer_state, new_stats = state.slow, state.outer_state, state.sync_stats
        gates, syncs_of_leaf = [], jax.tree.map(lambda _: None, state.slow)
        for j in range(fragments):
            sync_j = count == (j + 1) * (state.period // fragments)
            moved, new_outer_state, new_stats, gate = jax.lax.cond(
                sync_j,
                lambda j=j: (*fragment_sync(j, inner_step()[0]), jnp.array(True)),
                lambda j=j, o=new_outer_state, st=new_stats: (
                    _fragment_trees(state.slow, fragments)[j],
                    o,
                    st,
                    jnp.array(True),
                ),
            )
            gates.append(gate)
            new_slow = jax.tree.map(
                lambda old, m: old if _checks.is_masked(m) else m, new_slow, moved,
                is_leaf=_checks.is_masked,
            )  # fmt: skip
            syncs_of_leaf = jax.tree.map(
                lambda prev, m, sj=sync_j: prev if _checks.is_masked(m) else sj, syncs_of_leaf,
                moved, is_leaf=lambda x: x is None or _checks.is_masked(x),
            )  # fmt: skip
        gate = jnp.logical_and.reduce(jnp.stack(gates))
        inner_updates, new_inner_state = inner_step(
            jax.tree.map(lambda x: _gated(x, gate), state.inner_state)
        )

        new_updates = jax.tree.map(
            _update_onto_slow, new_slow, params, inner_updates, syncs_of_leaf
        )
        return new_updates, state._replace(
            inner_state=new_inner_state,
            slow=new_slow,
            count=jnp.where(wrap, 0, count).astype(jnp.int32),
            syncs=jnp.where(wrap, optax.safe_increment(state.syncs), state.syncs),
            period=jnp.where(wrap, jnp.asarray(k).astype(jnp.int32), state.period),
            outer_state=new_outer_state,
            sync_stats=new_stats,
        )

    def sync_inner_state(sync, traced, new_inner_state, cycle_start, new_slow, params, step_alpha):
        """The inner-state policy at a sync (see inner_state in lookahead's docstring)."""
        if policy == "keep":
            return new_inner_state, None

        def when_syncing(synced: Callable[[], Any], otherwise: Any) -> Any:
            if not traced:
                return synced() if sync else otherwise
            return jax.lax.cond(sync, synced, lambda: otherwise)

        mask = _policies.params_mask(inner, new_inner_state, policy)
        if policy == "reset":

            def reset():
                restart = jax.tree.map(
                    lambda s, p: jnp.broadcast_to(s.astype(p.dtype), p.shape)
                    if _checks.is_inexact(p)
                    else p,
                    new_slow, params,
                )  # fmt: skip
                fresh = _policies.match_types(stepper.init(restart), new_inner_state)
                return _policies.reset(mask, new_inner_state, fresh)

            return when_syncing(reset, new_inner_state), None

        pulled = when_syncing(
            lambda: _policies.pullback(mask, cycle_start, new_inner_state, step_alpha),
            new_inner_state,
        )
        return pulled, when_syncing(lambda: pulled, cycle_start)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)

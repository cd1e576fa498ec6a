"""Lookahead as a drop-in optax transformation: params stay a plain pytree.

Algorithm 1 of Zhang et al. (2019): the inner optimizer takes k fast steps from
the slow weights, then the slow weights move a fraction alpha of the way to the
fast weights and the fast weights restart from there. The slow weights live in
the optimizer state, so the params, gradients and updates keep one structure.
"""

from __future__ import annotations

import contextlib
import contextvars
import numbers
from collections.abc import Callable, Iterator
from typing import Any, Literal, NamedTuple

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, PyTree

from lookahead_optax._adaptive import AdaptiveAlpha, AdaptiveAlphaState

InnerStatePolicy = Literal["keep", "reset", "pullback"]
AlphaLike = float | Array | Callable[[Array], Array]
_INNER_STATE_POLICIES = ("keep", "reset", "pullback")

# Set by update_and_apply while it traces tx.update: either a list in which every
# lookahead records (its sync predicate, the trace it was computed in), or the static sync
# decision of the lax.cond branch being traced. None: the usual update, which decides itself.
_static_sync: contextvars.ContextVar[list | bool | None] = contextvars.ContextVar(
    "lookahead_optax_static_sync", default=None
)


@contextlib.contextmanager
def _sync_mode(mode: list | bool | None) -> Iterator[None]:
    """Within the block, every lookahead's update records its predicate or takes ``mode``."""
    token = _static_sync.set(mode)
    try:
        yield
    finally:
        _static_sync.reset(token)


class LookaheadState(NamedTuple):
    """State of :func:`lookahead`.

    Attributes:
      inner_state: The inner optimizer's state, kept across syncs by default.
      slow: The slow weights phi, a pytree with the structure of params (in
        ``slow_dtype`` when one was given). Evaluate and export these, via
        :func:`lookahead_optax.slow_params`.
      count: Inner steps taken since the last sync, in ``[0, k)``; it wraps to 0
        at every sync, so it never overflows.
      syncs: Number of syncs so far (saturating int32). The j-th sync (from 0)
        uses ``alpha(j)`` when alpha is a schedule.
      cycle_start: With ``inner_state="pullback"``, the inner state at the
        start of the current cycle; ``None`` otherwise.
      adaptive: With ``alpha=adaptive_alpha(...)``, its ``AdaptiveAlphaState``;
        ``None`` otherwise (a trailing field defaulting to None, so the default
        configuration's state has the same leaves as without it).
    """

    inner_state: optax.OptState
    slow: optax.Params
    count: Array
    syncs: Array
    cycle_start: optax.OptState = None
    adaptive: AdaptiveAlphaState | None = None


def _is_traced(value: Any) -> bool:
    return isinstance(value, jax.core.Tracer)


def _check_k(k: Any) -> None:
    if _is_traced(k):
        if not jnp.issubdtype(k.dtype, jnp.integer) or k.ndim != 0:
            raise ValueError(f"k must be a positive int, got a traced {k.dtype}{list(k.shape)}")
        return
    is_int_array = (
        isinstance(k, (np.ndarray, jax.Array, np.integer))
        and np.ndim(k) == 0
        and jnp.issubdtype(np.asarray(k).dtype, jnp.integer)
    )
    is_int = isinstance(k, numbers.Integral) and not isinstance(k, (bool, np.bool_))
    if not (is_int or is_int_array) or int(k) < 1:
        raise ValueError(f"k must be a positive int (1, 2, 3, ...), got {k!r}")


def _check_alpha(alpha: Any) -> None:
    if isinstance(alpha, AdaptiveAlpha) or callable(alpha) or _is_traced(alpha):
        return
    is_number = isinstance(alpha, numbers.Real) and not isinstance(alpha, (bool, np.bool_))
    is_scalar_array = (
        isinstance(alpha, (np.ndarray, jax.Array, np.floating)) and np.ndim(alpha) == 0
    )
    if not (is_number or is_scalar_array) or not 0.0 < float(alpha) <= 1.0:
        raise ValueError(
            f"alpha must be a float in (0, 1] or a schedule (a callable of the sync index), "
            f"got {alpha!r}"
        )


def _check_params(params: optax.Params, slow: optax.Params) -> None:
    if params is None:
        raise ValueError(
            "lookahead's update needs params: call tx.update(grads, opt_state, params)"
        )
    params_structure = jax.tree.structure(params, is_leaf=_is_masked)
    slow_structure = jax.tree.structure(slow, is_leaf=_is_masked)
    if params_structure != slow_structure:
        raise ValueError(
            "params must have the structure the state was initialised with: "
            f"expected {slow_structure}, got {params_structure}"
        )


def _is_masked(x: Any) -> bool:
    return isinstance(x, optax.MaskedNode)


def _is_float(x: Any) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)


def _interpolate_floats(start: PyTree, end: PyTree, alpha: Array) -> PyTree:
    """start + alpha (end - start) on floating leaves; other leaves keep ``end``."""

    def interpolate(s, e):
        if not _is_float(e):
            return e
        return (s + alpha.astype(e.dtype) * (e - s)).astype(e.dtype)

    return jax.tree.map(interpolate, start, end)


def _gated(x: Any, gate: Array) -> Any:
    """x where gate is True (always: only the data dependence on gate matters)."""
    if not (hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.number)):
        return x  # e.g. PRNG keys: small, an extra copy of them costs nothing
    return jnp.where(gate, x, jnp.zeros([], x.dtype))


def _difference(slow: Array, params: Array) -> Array:
    """slow - params in the wider dtype, also under strict dtype promotion (bf16 params)."""
    with jax.numpy_dtype_promotion("standard"):  # only to pick the dtype; the casts are explicit
        wide = jnp.promote_types(slow.dtype, params.dtype)
    return slow.astype(wide) - params.astype(wide)


def _match_types(new: PyTree, like: PyTree) -> PyTree:
    """Casts ``new``'s floating and integer leaves to ``like``'s dtypes (for lax.cond)."""

    def match(n, old):
        if jnp.issubdtype(old.dtype, jax.dtypes.prng_key):
            return n
        return jax.lax.convert_element_type(n, old.dtype)

    return jax.tree.map(match, new, like)


def lookahead(
    inner: optax.GradientTransformation,
    k: int | Array = 5,
    alpha: AlphaLike = 0.5,
    *,
    inner_state: InnerStatePolicy = "keep",
    slow_dtype: jax.typing.DTypeLike | None = None,
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

    Args:
      inner: The inner ("fast") optimizer. Extra keyword arguments given to
        ``update`` (``value``, ``grad``, ``value_fn``, ...) are passed to it.
      k: Sync period, a positive int (or a traced integer scalar, e.g. under
        ``optax.inject_hyperparams``).
      alpha: Slow step size in (0, 1], a scalar array, or a schedule: a
        callable of the sync index j = 0, 1, 2, ... (the j-th sync uses
        ``alpha(j)``), or :func:`lookahead_optax.adaptive_alpha` (the paper's
        line search on a diagonal quadratic model). ``alpha=1`` recovers the
        inner optimizer.
      inner_state: What happens to the inner state at a sync. ``"keep"``
        (default) carries it over; ``"reset"`` re-initialises it from the
        params after the sync; ``"pullback"`` interpolates its floating leaves
        like the weights, ``s <- s0 + alpha (s - s0)`` with ``s0`` the inner
        state at the start of the cycle (integer, bool and key leaves are left
        alone). Pullback stores ``s0``: one extra copy of the inner state.
      slow_dtype: Dtype to store and update the slow weights in, e.g.
        ``jnp.float32`` for bf16 params, so the small slow steps are not
        rounded away. Default: the params' dtype.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a
      :class:`LookaheadState`.

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

    References:
      Zhang, Lucas, Hinton, Ba, `Lookahead Optimizer: k steps forward, 1 step
      back <https://arxiv.org/abs/1907.08610>`_, NeurIPS 2019.
    """
    _check_k(k)
    _check_alpha(alpha)
    if inner_state not in _INNER_STATE_POLICIES:
        raise ValueError(f"inner_state must be one of {_INNER_STATE_POLICIES}, got {inner_state!r}")
    if slow_dtype is not None and not jnp.issubdtype(slow_dtype, jnp.inexact):
        raise ValueError(f"slow_dtype must be a floating dtype or None, got {slow_dtype!r}")
    inner = optax.with_extra_args_support(inner)

    def init_fn(params: optax.Params) -> LookaheadState:
        # A real copy (not an alias of params) so params and state can both be
        # donated to a jitted step; astype copies even when the dtype is equal.
        def copy(p):
            return jnp.array(p, dtype=slow_dtype or p.dtype, copy=True)

        inner_init = inner.init(params)
        return LookaheadState(
            inner_state=inner_init,
            slow=jax.tree.map(copy, params),
            count=jnp.zeros([], jnp.int32),
            syncs=jnp.zeros([], jnp.int32),
            # A separate copy: aliasing inner_state would break donating the state.
            cycle_start=(
                jax.tree.map(lambda x: jnp.array(x, copy=True), inner_init)
                if inner_state == "pullback"
                else None
            ),
            adaptive=(alpha.init(params, inner_init) if isinstance(alpha, AdaptiveAlpha) else None),
        )

    def update_fn(updates, state: LookaheadState, params=None, **extra_args):
        _check_params(params, state.slow)

        def inner_step(grads, old_inner_state=state.inner_state):
            return inner.update(grads, old_inner_state, params, **extra_args)

        count = state.count + 1
        sync = count >= k
        adaptive = None
        # The inner step's result when something needs it before the sync's cond; the fast
        # path (None) runs the inner step after the cond, see below.
        inner_before_sync = None
        if isinstance(alpha, AdaptiveAlpha):  # a Python branch: the default path is unchanged
            inner_before_sync = inner_step(updates)
            inner_updates, new_inner_state = inner_before_sync
            step_alpha, adaptive = alpha.step(
                sync, updates, inner_updates, params, state.slow, new_inner_state, state.adaptive
            )
        else:
            step_alpha = alpha(state.syncs) if callable(alpha) else alpha
        step_alpha = jnp.asarray(step_alpha)

        def slow_step(u, p, slow):
            fast = p.astype(slow.dtype) + u.astype(slow.dtype)
            return slow + step_alpha.astype(slow.dtype) * (fast - slow)

        # Arranged for XLA (CPU), measured with benchmarks/speed.py; simpler forms cost
        # 2.5-4x the inner step and a params-sized temp buffer:
        # - The cond touches only the step's inputs. Its sync branch recomputes the inner
        #   update from (grads, inner state, params) instead of taking it as an operand:
        #   an inner update that flows into a cond is written to memory on every step. The
        #   non-sync branch passes the slow weights (an input) through, free when donated.
        # - The returned update is one elementwise select in which the inner update appears
        #   once, so XLA fuses it with the inner optimizer's arithmetic and the caller's
        #   apply_updates; it is never written to memory. Non-sync steps read the slow
        #   weights once more, nothing else.
        # - The cond also returns a scalar True that gates the inner state read by the
        #   inner step (where(True, s, 0) is s exactly, and fuses into its one consumer).
        #   The data dependence runs the inner step after the cond; without it XLA cannot
        #   tell that the cond reads the old inner state before the inner step overwrites
        #   it in place (donation), and copies every params-sized inner state leaf on
        #   every step. (Gating the grads instead works in f32, but in bf16 XLA writes the
        #   gated grads to memory, as Adam reads them twice.)
        def synced():
            fast_updates = (inner_before_sync or inner_step(updates))[0]
            new_slow = jax.tree.map(slow_step, fast_updates, params, state.slow)
            return new_slow, jnp.array(True)

        def not_synced():
            return state.slow, jnp.array(True)

        mode = _static_sync.get()
        if isinstance(mode, list):  # update_and_apply's probe: record, trace the cheap branch
            mode.append((sync, jax.extend.core.get_opaque_trace_state()))
            mode = False
        if mode is None:
            new_slow, gate = jax.lax.cond(sync, synced, not_synced)
        else:  # a branch of update_and_apply's cond: whether it syncs is known statically
            sync = jnp.asarray(mode)
            new_slow, gate = synced() if mode else not_synced()
        if inner_before_sync is None:
            ordered_inner_state = jax.tree.map(lambda s: _gated(s, gate), state.inner_state)
            inner_updates, new_inner_state = inner_step(updates, ordered_inner_state)

        def to_slow(s, p, u):
            return _difference(s, p).astype(u.dtype)

        if mode is None:
            new_updates = jax.tree.map(
                lambda s, p, u: jnp.where(sync, to_slow(s, p, u), u),
                new_slow,
                params,
                inner_updates,
            )
        else:
            new_updates = (
                jax.tree.map(to_slow, new_slow, params, inner_updates) if mode else inner_updates
            )
        new_inner_state, cycle_start = _sync_inner_state(
            sync, new_inner_state, state.cycle_start, new_slow, params, step_alpha
        )
        new_state = LookaheadState(
            inner_state=new_inner_state,
            slow=new_slow,
            count=jnp.where(sync, 0, count).astype(jnp.int32),
            syncs=jnp.where(sync, optax.safe_increment(state.syncs), state.syncs),
            cycle_start=cycle_start,
            adaptive=adaptive,
        )
        return new_updates, new_state

    def _sync_inner_state(sync, new_inner_state, cycle_start, new_slow, params, step_alpha):
        if inner_state == "keep":
            return new_inner_state, None
        if inner_state == "reset":

            def reset():
                params_after = jax.tree.map(lambda s, p: s.astype(p.dtype), new_slow, params)
                return _match_types(inner.init(params_after), new_inner_state)

            return jax.lax.cond(sync, reset, lambda: new_inner_state), None

        pulled = jax.lax.cond(
            sync,
            lambda: _interpolate_floats(cycle_start, new_inner_state, step_alpha),
            lambda: new_inner_state,
        )
        return pulled, jax.lax.cond(sync, lambda: pulled, lambda: cycle_start)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)

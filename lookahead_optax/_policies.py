"""What happens to the inner optimizer's state at a sync: keep it, reset it or pull it back.

Both ``reset`` and ``pullback`` act on the leaves of the inner state that are
shaped like the params (Adam's moments, a momentum trace), found the way
``optax.tree_map_params`` finds them: by running ``inner.init`` on a
placeholder. Scalars and counters are never interpolated (an injected learning
rate, ``reduce_on_plateau``'s best value, a line search's values), and states
that hold no params-shaped leaf (learning-rate schedules, injected
hyperparameters, ``reduce_on_plateau``) survive a reset, so schedules keep
decaying across syncs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from lookahead_optax._tree import is_inexact, match_types


def params_mask(inner: optax.GradientTransformation, inner_state: Any, policy: str) -> Any:
    """``inner_state``'s structure with True on the leaves that are shaped like params."""
    try:
        return optax.tree_map_params(
            inner, lambda _: True, inner_state, transform_non_params=lambda _: False
        )
    except Exception as error:  # noqa: BLE001 (whatever the inner init does with a placeholder)
        raise ValueError(
            f'inner_state="{policy}" needs to know which leaves of the inner optimizer\'s state '
            "are shaped like the params, and optax.tree_map_params cannot tell for this inner "
            f"optimizer (its init failed on a placeholder: {error!r}); use "
            'inner_state="keep"'
        ) from error


def _is_record(node: Any) -> bool:
    return isinstance(node, tuple) and hasattr(node, "_fields")


def _holds_params(mask: Any) -> bool:
    leaves = jax.tree.leaves(mask)
    return bool(leaves) and all(leaves)


def reset(mask: Any, current: Any, fresh: Any) -> Any:
    """``fresh`` for every state record that holds a params-shaped field, ``current`` elsewhere.

    A record such as Adam's ``(count, mu, nu)`` is reset as a whole (its count
    goes with its moments: bias correction restarts too). Records without
    params-shaped fields (``ScaleByScheduleState``, ``inject_hyperparams``'
    count and hyperparameters, ``reduce_on_plateau``) keep their values.
    """
    if _is_record(current):
        if any(_holds_params(field) for field in mask):
            return fresh
        return type(current)(*(reset(m, c, f) for m, c, f in zip(mask, current, fresh)))
    if dataclasses.is_dataclass(current) and not isinstance(current, type):  # a LookaheadState
        names = [field.name for field in dataclasses.fields(current)]
        if any(_holds_params(getattr(mask, name)) for name in names):
            return fresh
        return dataclasses.replace(
            current,
            **{n: reset(getattr(mask, n), getattr(current, n), getattr(fresh, n)) for n in names},
        )
    if isinstance(current, (tuple, list)):
        return type(current)(reset(m, c, f) for m, c, f in zip(mask, current, fresh))
    if isinstance(current, dict):
        return type(current)({key: reset(mask[key], current[key], fresh[key]) for key in current})
    return jax.tree.map(lambda m, c, f: f if m else c, mask, current, fresh)


def pullback(mask: Any, start: Any, end: Any, alpha: jax.Array) -> Any:
    """``start + alpha (end - start)`` on the params-shaped floating leaves; ``end`` elsewhere.

    Where either value is not finite the leaf keeps ``end``: interpolating
    never turns a finite state into NaN.
    """

    def interpolate(is_param, s, e):
        if not (is_param and is_inexact(e)):
            return e
        pulled = (s + alpha.astype(e.dtype) * (e - s)).astype(e.dtype)
        return jnp.where(jnp.isfinite(s) & jnp.isfinite(e), pulled, e)

    return jax.tree.map(interpolate, mask, start, end)


def at_sync(
    policy: str,
    inner: optax.GradientTransformation,
    init: Callable[[Any], Any],
    synced: bool | jax.Array,
    inner_state: Any,
    cycle_start: Any,
    slow: Any,
    params: Any,
    alpha: jax.Array | None,
) -> tuple[Any, Any]:
    """The inner state and cycle start after this call, by ``policy`` (see ``inner_state``).

    ``init`` is the (per-worker) inner init; ``synced`` a Python bool or traced.
    """
    if policy == "keep":
        return inner_state, None

    def when_syncing(fn: Callable[[], Any], otherwise: Any) -> Any:
        if isinstance(synced, bool):
            return fn() if synced else otherwise
        return jax.lax.cond(synced, fn, lambda: otherwise)

    mask = params_mask(inner, inner_state, policy)
    if policy == "reset":

        def fresh_state():
            restart = jax.tree.map(
                lambda s, p: jnp.broadcast_to(s.astype(p.dtype), p.shape) if is_inexact(p) else p,
                slow,
                params,
            )
            return reset(mask, inner_state, match_types(init(restart), inner_state))

        return when_syncing(fresh_state, match_types(inner_state, inner_state)), None
    assert alpha is not None  # pullback needs alpha: refused with outer= at construction
    pulled = when_syncing(lambda: pullback(mask, cycle_start, inner_state, alpha), inner_state)
    return pulled, when_syncing(lambda: pulled, cycle_start)

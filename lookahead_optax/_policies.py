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

from typing import Any

import jax
import jax.numpy as jnp
import optax

from lookahead_optax._checks import is_inexact


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


def match_types(new: Any, like: Any) -> Any:
    """``new``'s leaves cast to ``like``'s dtypes (and weak types), for ``lax.cond``."""

    def match(n, old):
        if jnp.issubdtype(old.dtype, jax.dtypes.prng_key):
            return n
        return jax.lax.convert_element_type(n, old.dtype)

    return jax.tree.map(match, new, like)

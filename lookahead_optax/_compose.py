"""A one-time check that a transformation obeys Lookahead's composition rule."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lookahead_optax._state import LookaheadState, find_states, replace_states
from lookahead_optax._tree import is_inexact, is_masked

# The largest difference between the params and the slow weights after a sync that passes,
# in ulps of the params' dtype relative to max(|slow|, 1). A correct sync lands within a
# rounding or two (p + (phi - p)); anything that scales or clips its update by even 1e-4
# lands hundreds of ulps away (tests/test_compose.py checks both sides).
TOLERANCE_ULPS = 16


def _steps_since_sync(state: LookaheadState) -> Any:
    return state.count


def _set_steps_since_sync(opt_state: optax.OptState, counts: list[int]) -> optax.OptState:
    """``opt_state`` with its i-th (outermost) LookaheadState's step counter set to counts[i]."""
    values = iter(counts)

    def set_count(state: LookaheadState) -> LookaheadState:
        count = _steps_since_sync(state)
        return state._replace(count=jnp.asarray(next(values), jnp.result_type(count)))

    return replace_states(set_count, opt_state)


def _ulps(p: Any, s: Any) -> float:
    """max |p - s| / max(|s|, 1) in ulps of p's dtype (s broadcast over a worker axis of p)."""
    eps = float(jnp.finfo(jnp.result_type(p)).eps)
    p, s = np.asarray(p, np.complex128), np.asarray(s, np.complex128)
    scale = np.maximum(np.abs(s), 1.0)
    return float(np.max(np.abs(p - s) / scale, initial=0.0)) / eps


def _synced_leaves(before: LookaheadState, after: LookaheadState, params: Any) -> dict[int, float]:
    """{leaf index: ulps from the slow weights} for the leaves of params that this step synced
    (their slow weights moved): the fragment that synced, or every leaf without fragments."""
    slow_before = jax.tree.leaves(before.slow, is_leaf=is_masked)
    slow_after = jax.tree.leaves(after.slow, is_leaf=is_masked)
    leaves = jax.tree.leaves(params)
    if len(leaves) != len(slow_after):
        raise ValueError(
            "check_composition: params must have the structure of the params tx was "
            f"initialised with ({len(slow_after)} leaves), got {len(leaves)} leaves"
        )
    synced = {}
    for i, (p, old, new) in enumerate(zip(leaves, slow_before, slow_after)):
        if is_masked(new) or not is_inexact(p) or not np.size(new):
            continue
        if np.array_equal(np.asarray(old), np.asarray(new)):
            continue  # not synced at this step (another fragment's leaf)
        synced[i] = _ulps(p, new)
    return synced


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
    and checks that after the sync the params of the leaves that synced equal
    the slow weights within a few ulps. With ``fragments > 1`` it does so
    once for every fragment's sync point, each from ``tx.init(params)`` (with
    ``workers``, every worker's params must land there). Call it once on
    your ``tx``, e.g. in a test: it compiles one step. It can only see what
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
    states = find_states(opt_state)
    if not states:
        raise ValueError("check_composition found no lookahead in tx")
    mixed = [float(getattr(state, "mixing", 0.0)) for state in states]
    if any(mixed):
        raise ValueError(
            f"check_composition checks that a sync lands the params on the slow weights; a "
            f"lookahead with mixing={max(mixed)} lands them on phi + mixing (theta - phi) by "
            "design: check the same chain built with mixing=0"
        )
    if grads is None:
        grads = _random_grads(params)
    periods = [int(state.period) for state in states]

    @jax.jit  # one program for every call, as a training step runs (eagerly, each op compiles)
    def call(state: optax.OptState, current: optax.Params) -> tuple[optax.OptState, optax.Params]:
        updates, state = tx.update(grads, state, current, **extra_args)
        return state, optax.apply_updates(current, updates)

    def trial(counts: list[int]) -> list[dict[int, float]]:
        """From the initial state with these step counters, run tx until its lookaheads take
        a step; per lookahead, the leaves that synced and their distance to the slow weights."""
        state, current = _set_steps_since_sync(opt_state, counts), params
        before = find_states(state)
        for _ in range(max_calls):
            state, current = call(state, current)
            after = find_states(state)
            stepped = [
                int(_steps_since_sync(a)) != int(_steps_since_sync(b))
                or int(a.syncs) != int(b.syncs)
                for b, a in zip(before, after)
            ]
            if any(stepped):
                return [_synced_leaves(b, a, current) for b, a in zip(before, after)]
        raise ValueError(f"no lookahead in tx synced within max_calls={max_calls} update calls")

    # Every lookahead syncs (its last fragment, with fragments > 1) on the last step of a cycle.
    found = trial([period - 1 for period in periods])
    synced = [dict(leaves) for leaves in found]
    # With fragments > 1, fragment j syncs at step max(1, (j + 1) period // fragments) of
    # each cycle (as _steps.fragment_syncs): one trial from each of those steps.
    for i, (state, period) in enumerate(zip(states, periods)):
        fragments = int(getattr(state, "fragments", 1))
        steps = {max(1, (j + 1) * period // fragments) for j in range(fragments - 1)}
        for step in sorted(steps - {period}):
            counts = [0] * len(periods)
            counts[i] = step - 1
            for mine, new in zip(synced, trial(counts)):
                mine.update(new)
    worst = max((max(leaves.values(), default=0.0) for leaves in synced), default=0.0)
    if worst > TOLERANCE_ULPS:
        raise ValueError(
            "something after the lookahead changed its updates: after a sync the params "
            f"differ from the slow weights by {worst:.3g} ulps (relative). Nothing may come "
            "after lookahead in a chain that changes updates: move learning rates, clipping, "
            "weight decay and reduce_on_plateau inside it, "
            "lookahead(optax.chain(..., inner_optimizer, ...)), or before it."
        )


def _random_grads(params: Any) -> Any:
    """Standard normal gradients for the floating leaves of ``params`` (others as they are).

    Drawn with numpy, on the host: ``jax.random.normal`` would compile a program for every
    distinct leaf shape (about 0.15 s each on a CPU) before the check could start."""
    rng = np.random.default_rng(0)

    def draw(p: Any) -> Any:
        if not is_inexact(p):
            return p
        shape, dtype = jnp.shape(p), jnp.result_type(p)
        x = rng.standard_normal(shape)
        if jnp.issubdtype(dtype, jnp.complexfloating):
            x = (x + 1j * rng.standard_normal(shape)) / np.sqrt(2)
        return jnp.asarray(x, dtype)

    return jax.tree.map(draw, params)

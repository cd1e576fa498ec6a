"""Inner-state policies ("keep", "reset", "pullback") and alpha schedules.

Every test compares the library with a plain loop written here from the spec
(Algorithm 1 plus the policy), never with the library's own output:

- "keep": the inner state carries over a sync.
- "reset": after the j-th sync the inner state is ``inner.init(params after the sync)``.
- "pullback": every floating leaf s <- s0 + alpha_j (s - s0), s0 the inner state
  at the start of the cycle; integer, bool and key leaves untouched.
- a schedule alpha: the j-th sync (j = 0, 1, ...) uses alpha(j).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lookahead_optax as lo
from tests import reference

K = 3
NUM_STEPS = 3 * K + 2  # three syncs and a partial cycle


# --- the independent reference (numpy, float64) -------------------------------------------


def _pull(start, end, alpha):
    """start + alpha (end - start) on floating arrays; ints (Adam's t) keep ``end``."""
    if isinstance(end, (list, tuple)):
        return type(end)(_pull(s, e, alpha) for s, e in zip(start, end))
    if isinstance(end, (np.ndarray, np.floating)) and np.issubdtype(end.dtype, np.floating):
        return start + alpha * (end - start)
    return end


def policy_trajectory(params0, grad_fn, inner, k, alpha, num_steps, policy):
    """Algorithm 1 with an inner-state policy; returns (fast, slow, inner state) per step."""
    slow = [np.array(p, np.float64) for p in params0]
    fast = [s.copy() for s in slow]
    state = inner.init(fast)
    cycle_start = state
    syncs = 0
    history = []
    for step in range(1, num_steps + 1):
        updates, state = inner.step(grad_fn(fast), state, fast)
        fast = [p + u for p, u in zip(fast, updates)]
        if step % k == 0:
            step_alpha = float(alpha(syncs)) if callable(alpha) else alpha
            slow = [s + step_alpha * (f - s) for s, f in zip(slow, fast)]
            fast = [s.copy() for s in slow]
            if policy == "reset":
                state = inner.init(fast)
            elif policy == "pullback":
                state = _pull(cycle_start, state, step_alpha)
                cycle_start = state
            syncs += 1
        history.append(([f.copy() for f in fast], [s.copy() for s in slow], state))
    return history


# --- running the library ------------------------------------------------------------------


def library_trajectory(tx, params0, loss, num_steps):
    @jax.jit
    def step(params, opt_state):
        updates, opt_state = tx.update(jax.grad(loss)(params), opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, lo.slow_params(opt_state, params)

    params, opt_state = params0, tx.init(params0)
    history = []
    for _ in range(num_steps):
        params, opt_state, slow = step(params, opt_state)
        history.append((params, slow, opt_state))
    return history


def _close(actual_tree, expected_leaves, rtol=2e-4, atol=2e-6):
    for actual, expected in zip(jax.tree.leaves(actual_tree), expected_leaves, strict=True):
        np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol)


PROBLEM = reference.LogisticQuadratic()
PARAMS0 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), PROBLEM.params0)

INNERS = {
    # name: (optax inner, numpy reference inner, how to read the reference state's moments)
    "momentum": (
        optax.sgd(0.3, momentum=0.9),
        reference.Momentum(0.3, 0.9),
        lambda state: {"trace": state},
    ),
    "adam": (
        optax.adam(0.05),
        reference.Adam(0.05),
        lambda state: {"count": state[0], "mu": state[1], "nu": state[2]},
    ),
}


@pytest.mark.parametrize("policy", ["keep", "reset", "pullback"])
@pytest.mark.parametrize("inner_name", ["momentum", "adam"])
def test_policy_matches_reference(policy, inner_name):
    inner, reference_inner, moments = INNERS[inner_name]
    alpha = 0.6
    tx = lo.lookahead(inner, k=K, alpha=alpha, inner_state=policy)
    got = library_trajectory(tx, PARAMS0, PROBLEM.loss, NUM_STEPS)
    expected = policy_trajectory(
        PROBLEM.leaves0(), PROBLEM.grad, reference_inner, K, alpha, NUM_STEPS, policy
    )
    for (params, slow, opt_state), (fast_ref, slow_ref, state_ref) in zip(got, expected):
        _close(params, fast_ref)
        _close(slow, slow_ref)
        for name, value in moments(state_ref).items():
            got_value = optax.tree_utils.tree_get(opt_state.inner_state, name)
            if name == "count":  # Adam's step count: reset restarts it, pullback leaves it
                assert int(got_value) == value
            else:
                _close(got_value, value)


def test_policies_differ_on_this_problem():
    """Guards the test above: the three policies give three different trajectories here."""
    _, reference_inner, _ = INNERS["adam"]
    finals = [
        policy_trajectory(
            PROBLEM.leaves0(), PROBLEM.grad, reference_inner, K, 0.6, NUM_STEPS, policy
        )[-1][0]
        for policy in ("keep", "reset", "pullback")
    ]
    for i in range(3):
        for j in range(i + 1, 3):
            gap = max(np.max(np.abs(a - b)) for a, b in zip(finals[i], finals[j]))
            assert gap > 1e-3


@pytest.mark.parametrize("policy", ["keep", "pullback"])
def test_alpha_schedule_uses_alpha_of_sync_index(policy):
    schedule = optax.linear_schedule(init_value=0.9, end_value=0.3, transition_steps=2)
    tx = lo.lookahead(optax.adam(0.05), k=K, alpha=schedule, inner_state=policy)
    got = library_trajectory(tx, PARAMS0, PROBLEM.loss, NUM_STEPS)
    expected = policy_trajectory(
        PROBLEM.leaves0(), PROBLEM.grad, reference.Adam(0.05), K, schedule, NUM_STEPS, policy
    )
    for (params, slow, opt_state), (fast_ref, slow_ref, state_ref) in zip(got, expected):
        _close(params, fast_ref)
        _close(slow, slow_ref)
        _close(optax.tree_utils.tree_get(opt_state.inner_state, "mu"), state_ref[1])
    # Not the same as a constant alpha(0): the schedule really is indexed by the sync.
    constant = policy_trajectory(
        PROBLEM.leaves0(), PROBLEM.grad, reference.Adam(0.05), K, 0.9, NUM_STEPS, policy
    )
    gap = max(np.max(np.abs(a - b)) for a, b in zip(constant[-1][1], expected[-1][1]))
    assert gap > 1e-3


# --- states with bool, integer and PRNG-key leaves -------------------------------------------


class AnchoredState(NamedTuple):
    anchor: optax.Params  # params at init: makes init depend on the params' values
    moved: jax.Array  # bool: has any update been larger than 0.01?
    count: jax.Array  # int32
    key: jax.Array  # typed PRNG key
    velocity: optax.Params  # float


def anchored_sgd(lr: float) -> optax.GradientTransformation:
    """SGD with momentum, a pull towards the params it was initialised with, and noise."""

    def init(params):
        return AnchoredState(
            anchor=jax.tree.map(lambda p: jnp.array(p, copy=True), params),
            moved=jnp.array(False),
            count=jnp.zeros([], jnp.int32),
            key=jax.random.key(0),
            velocity=jax.tree.map(jnp.zeros_like, params),
        )

    def update(grads, state, params):
        key, noise_key = jax.random.split(state.key)
        noise = optax.tree_utils.tree_random_like(noise_key, grads)
        velocity = jax.tree.map(
            lambda v, g, p, a, n: 0.5 * v + g + 0.5 * (p - a) + 0.01 * n,
            state.velocity,
            grads,
            params,
            state.anchor,
            noise,
        )
        updates = jax.tree.map(lambda v: -lr * v, velocity)
        moved = state.moved | (optax.tree_utils.tree_max(jax.tree.map(jnp.abs, updates)) > 0.01)
        return updates, AnchoredState(state.anchor, moved, state.count + 1, key, velocity)

    return optax.GradientTransformation(init, update)


def optax_policy_trajectory(inner, params0, loss, k, alpha, num_steps, policy):
    """The same spec as ``policy_trajectory``, but the inner optimizer is an optax one."""

    def pull(start, end):
        floating = jnp.issubdtype(end.dtype, jnp.floating)
        return start + alpha * (end - start) if floating else end

    @jax.jit
    def inner_step(fast, state):
        updates, state = inner.update(jax.grad(loss)(fast), state, fast)
        return optax.apply_updates(fast, updates), state

    fast = slow = params0
    state = cycle_start = inner.init(params0)
    history = []
    for step in range(1, num_steps + 1):
        fast, state = inner_step(fast, state)
        if step % k == 0:
            slow = jax.tree.map(lambda s, f: s + alpha * (f - s), slow, fast)
            fast = slow
            if policy == "reset":
                state = inner.init(fast)
            elif policy == "pullback":
                state = cycle_start = jax.tree.map(pull, cycle_start, state)
        history.append((fast, slow, state))
    return history


@functools.cache
def anchored_reference(policy):
    """The reference run of ``anchored_sgd`` for one policy (shared by two tests)."""
    inner = anchored_sgd(0.2)
    return optax_policy_trajectory(inner, PARAMS0, PROBLEM.loss, K, 0.5, NUM_STEPS, policy)


@pytest.mark.parametrize("policy", ["reset", "pullback"])
def test_bool_int_and_key_leaves(policy):
    """reset: init from the post-sync params, bool stays bool; pullback: only floats move."""
    inner = anchored_sgd(0.2)
    tx = lo.lookahead(inner, k=K, alpha=0.5, inner_state=policy)
    got = library_trajectory(tx, PARAMS0, PROBLEM.loss, NUM_STEPS)
    expected = anchored_reference(policy)
    init_state = inner.init(PARAMS0)
    for (params, slow, opt_state), (fast_ref, slow_ref, state_ref) in zip(got, expected):
        _close(params, [np.asarray(x) for x in jax.tree.leaves(fast_ref)], atol=1e-5)
        _close(slow, [np.asarray(x) for x in jax.tree.leaves(slow_ref)], atol=1e-5)
        state = opt_state.inner_state
        # dtypes never change (bool stays bool, the key stays a typed key)
        assert jax.tree.map(lambda x: x.dtype, state) == jax.tree.map(lambda x: x.dtype, init_state)
        assert bool(state.moved) == bool(state_ref.moved)
        assert int(state.count) == int(state_ref.count)
        np.testing.assert_array_equal(
            jax.random.key_data(state.key), jax.random.key_data(state_ref.key)
        )
        _close(state.anchor, [np.asarray(x) for x in jax.tree.leaves(state_ref.anchor)], atol=1e-5)
        _close(
            state.velocity, [np.asarray(x) for x in jax.tree.leaves(state_ref.velocity)], atol=1e-5
        )
    # reset re-initialises from the params AFTER the sync: the anchor is the new slow weights
    if policy == "reset":
        params, slow, opt_state = got[K - 1]
        _close(opt_state.inner_state.anchor, [np.asarray(x) for x in jax.tree.leaves(slow)])
        assert not bool(opt_state.inner_state.moved)
        assert int(opt_state.inner_state.count) == 0


@pytest.mark.parametrize("policy", ["keep", "reset", "pullback"])
def test_policies_run_in_scan_and_donate(policy):
    """State dtypes are stable (lax.scan carries them) and the state can be donated."""
    tx = lo.lookahead(anchored_sgd(0.2), k=K, alpha=0.5, inner_state=policy)

    def body(carry, _):
        params, opt_state = carry
        updates, opt_state = tx.update(jax.grad(PROBLEM.loss)(params), opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), None

    run = jax.jit(lambda carry: jax.lax.scan(body, carry, length=NUM_STEPS)[0], donate_argnums=0)
    fresh_params = jax.tree.map(jnp.copy, PARAMS0)  # donated below
    params, opt_state = run((fresh_params, tx.init(fresh_params)))
    expected = anchored_reference(policy)[-1]
    _close(params, [np.asarray(x) for x in jax.tree.leaves(expected[0])], atol=1e-5)

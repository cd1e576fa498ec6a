"""Inner-state policies ("keep", "reset", "pullback") and alpha schedules.

Every test compares the library with tests/reference.py's step-wise Lookahead,
never with the library's own output. The library's policies act on the leaves of
the inner state that ``optax.tree_map_params`` maps (the params-shaped ones);
``PARAMS_LIKE`` says which leaves of each reference inner state those are:

- "keep": the inner state carries over a sync.
- "reset": after the j-th sync every state record that holds params-shaped leaves
  is ``inner.init(params after the sync)`` (Adam's moments with their count);
  records without them keep their values (a learning-rate schedule's count).
- "pullback": the params-shaped leaves s <- s0 + alpha_j (s - s0), s0 the inner
  state at the start of the cycle; counters, bools and keys untouched.
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
from tests import helpers, reference
from tests.helpers import SGD_LR, library_trajectory

K = 3
NUM_STEPS = 3 * K + 2  # three syncs and a partial cycle

# --- running the library ------------------------------------------------------------------


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
# (inner, policy): the leaves of the reference inner state the library's policy acts on.
PARAMS_LIKE = helpers.REFERENCE_PARAMS_LIKE


def reference_run(inner_name, policy, alpha=0.6, inner=None):
    reference_inner = inner or INNERS[inner_name][1]
    params_like = PARAMS_LIKE.get((inner_name, policy))
    lookahead = reference.Lookahead(reference_inner, K, alpha, policy, params_like)
    return reference.run(lookahead, PROBLEM.leaves0(), PROBLEM.grad, NUM_STEPS)


@pytest.mark.parametrize("policy", ["keep", "reset", "pullback"])
@pytest.mark.parametrize("inner_name", ["momentum", "adam"])
def test_policy_matches_reference(policy, inner_name):
    inner, _, moments = INNERS[inner_name]
    alpha = 0.6
    tx = lo.lookahead(inner, k=K, alpha=alpha, inner_state=policy)
    got = library_trajectory(tx, PARAMS0, PROBLEM.loss, NUM_STEPS)
    expected = reference_run(inner_name, policy, alpha)
    for (params, slow, opt_state), step in zip(got, expected, strict=True):
        _close(params, step.params)
        _close(slow, step.state.slow)
        for name, value in moments(step.state.inner).items():
            got_value = optax.tree_utils.tree_get(opt_state.inner_state, name)
            if name == "count":  # Adam's step count: reset restarts it, pullback leaves it
                assert int(got_value) == value
            else:
                _close(got_value, value)


def test_policies_differ_on_this_problem():
    """Guards the test above: the three policies give three different trajectories here."""
    finals = [reference_run("adam", policy)[-1].params for policy in ("keep", "reset", "pullback")]
    for i in range(3):
        for j in range(i + 1, 3):
            gap = max(np.max(np.abs(a - b)) for a, b in zip(finals[i], finals[j]))
            assert gap > 1e-3


@pytest.mark.parametrize("policy", ["keep", "pullback"])
def test_alpha_schedule_uses_alpha_of_sync_index(policy):
    schedule = optax.linear_schedule(init_value=0.9, end_value=0.3, transition_steps=2)
    tx = lo.lookahead(optax.adam(0.05), k=K, alpha=schedule, inner_state=policy)
    got = library_trajectory(tx, PARAMS0, PROBLEM.loss, NUM_STEPS)
    plain_schedule = [0.9, 0.6, 0.3, 0.3]  # the same schedule, written out
    expected = reference_run("adam", policy, alpha=lambda j: plain_schedule[j])
    for (params, slow, opt_state), step in zip(got, expected, strict=True):
        _close(params, step.params)
        _close(slow, step.state.slow)
        _close(optax.tree_utils.tree_get(opt_state.inner_state, "mu"), step.state.inner[1])
    # Not the same as a constant alpha(0): the schedule really is indexed by the sync.
    constant = reference_run("adam", policy, alpha=0.9)
    gap = max(
        np.max(np.abs(a - b)) for a, b in zip(constant[-1].state.slow, expected[-1].state.slow)
    )
    assert gap > 1e-3


@pytest.mark.parametrize("policy", ["keep", "reset", "pullback"])
def test_learning_rate_schedule_of_the_inner_optimizer(policy):
    """Adam with a decaying learning rate: "reset" restarts Adam, not the schedule."""

    def decay(n):
        return 0.08 * 0.8**n

    tx = lo.lookahead(
        optax.adam(optax.exponential_decay(0.08, 1, 0.8)), k=K, alpha=0.6, inner_state=policy
    )
    got = library_trajectory(tx, PARAMS0, PROBLEM.loss, NUM_STEPS)
    # The reference Adam's state is (t, mu, nu, n), n the schedule's count. The library
    # resets Adam's record (t, mu, nu) and keeps the schedule's; pullback moves mu, nu.
    params_like = {
        "keep": None,
        "reset": reference.under((0,), (1,), (2,)),
        "pullback": reference.under((1,), (2,)),
    }[policy]
    lookahead = reference.Lookahead(reference.Adam(decay), K, 0.6, policy, params_like)
    expected = reference.run(lookahead, PROBLEM.leaves0(), PROBLEM.grad, NUM_STEPS)
    for (params, slow, opt_state), step in zip(got, expected, strict=True):
        _close(params, step.params)
        _close(slow, step.state.slow)
        adam_state, schedule_state = opt_state.inner_state
        assert int(adam_state.count) == step.state.inner[0]  # Adam's bias-correction count
        assert int(schedule_state.count) == step.state.inner[3]  # the schedule's
    # Guard: restarting the schedule too would be a different trajectory.
    if policy == "reset":
        restart_all = reference.Lookahead(reference.Adam(decay), K, 0.6, "reset")
        restarted = reference.run(restart_all, PROBLEM.leaves0(), PROBLEM.grad, NUM_STEPS)
        gap = max(np.max(np.abs(a - b)) for a, b in zip(restarted[-1].params, expected[-1].params))
        assert gap > 1e-3


def test_pullback_moves_the_params_shaped_leaves_only():
    """An injected, scheduled learning rate is a float scalar of the inner state, not a
    params-shaped leaf: pullback leaves it at its end-of-cycle value, moves the trace."""
    inner = optax.inject_hyperparams(optax.sgd)(
        learning_rate=optax.linear_schedule(0.3, 0.1, 6), momentum=0.9
    )
    tx = lo.lookahead(inner, k=K, alpha=0.6, inner_state="pullback")
    got = library_trajectory(tx, PARAMS0, PROBLEM.loss, NUM_STEPS)
    # The inner step is optax's own (helpers.JaxInner): the test is about which leaves
    # Lookahead's pullback interpolates. InjectHyperparamsState(count, hyperparams,
    # inner_state): the trace lives under inner_state.
    reference_inner = helpers.JaxInner(inner, jax.tree.structure(PARAMS0))
    lookahead = reference.Lookahead(
        reference_inner, K, 0.6, "pullback", reference.under(("inner_state",))
    )
    expected = reference.run(lookahead, PROBLEM.leaves0(), PROBLEM.grad, NUM_STEPS)
    for (params, slow, opt_state), step in zip(got, expected, strict=True):
        _close(params, step.params, atol=1e-5)
        _close(slow, step.state.slow, atol=1e-5)
        state, state_ref = opt_state.inner_state, step.state.inner
        np.testing.assert_allclose(
            state.hyperparams["learning_rate"], state_ref.hyperparams["learning_rate"], rtol=1e-6
        )
        _close(state.inner_state[0].trace, jax.tree.leaves(state_ref.inner_state), atol=1e-5)
        assert int(state.count) == int(state_ref.count)
    # Guard: interpolating the learning rate too would have changed it at the syncs.
    cycle_start_lr, end_lr = 0.3 - 0.2 * (K - 1) / 6, 0.3 - 0.2 * (2 * K - 1) / 6
    assert abs(0.6 * (end_lr - cycle_start_lr)) > 1e-3


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


# Which leaves of AnchoredState the library's policies act on: reset re-initialises the
# record as a whole (it holds params-shaped fields); pullback moves anchor and velocity.
ANCHORED_PARAMS_LIKE = {
    "keep": None,
    "reset": reference.every_leaf,
    "pullback": reference.under(("anchor",), ("velocity",)),
}


@functools.cache
def anchored_reference(policy):
    """The reference run of ``anchored_sgd`` for one policy (shared by two tests).

    The inner step is anchored_sgd itself (run by helpers.JaxInner): these tests are about
    what Lookahead does to an inner state with bool, int and key leaves, not about SGD.
    """
    inner = helpers.JaxInner(anchored_sgd(0.2), jax.tree.structure(PARAMS0))
    lookahead = reference.Lookahead(inner, K, 0.5, policy, ANCHORED_PARAMS_LIKE[policy])
    return reference.run(lookahead, PROBLEM.leaves0(), PROBLEM.grad, NUM_STEPS)


@pytest.mark.parametrize("policy", [pytest.param("reset", marks=pytest.mark.slow), "pullback"])
def test_bool_int_and_key_leaves(policy):
    """reset: init from the post-sync params, bool stays bool; pullback: only floats move."""
    inner = anchored_sgd(0.2)
    tx = lo.lookahead(inner, k=K, alpha=0.5, inner_state=policy)
    got = library_trajectory(tx, PARAMS0, PROBLEM.loss, NUM_STEPS)
    expected = anchored_reference(policy)
    init_state = inner.init(PARAMS0)
    for (params, slow, opt_state), step in zip(got, expected, strict=True):
        _close(params, step.params, atol=1e-5)
        _close(slow, step.state.slow, atol=1e-5)
        state, state_ref = opt_state.inner_state, step.state.inner
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


@pytest.mark.parametrize(
    "policy",
    [pytest.param("keep", marks=pytest.mark.slow), pytest.param("reset", marks=pytest.mark.slow),
     "pullback"],
)  # fmt: skip
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
    _close(params, anchored_reference(policy)[-1].params, atol=1e-5)


# ---- policies on what is not params-shaped (0.2.0's defects) ----


def test_pullback_leaves_scalars_alone_reduce_on_plateau():
    inner = optax.chain(optax.sgd(SGD_LR), optax.contrib.reduce_on_plateau(patience=2))
    tx = lo.lookahead(inner, k=2, inner_state="pullback")
    params = {"w": jnp.array([1.0, -2.0])}
    opt_state = tx.init(params)
    update = jax.jit(tx.update)
    for _ in range(6):
        value = 0.5 * jnp.sum(params["w"] ** 2)
        updates, opt_state = update(params, opt_state, params, value=value)
        params = optax.apply_updates(params, updates)
    plateau = opt_state.inner_state[1]
    assert np.isfinite(plateau.best_value) and float(plateau.best_value) > 0
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(opt_state))


def test_pullback_keeps_an_injected_learning_rate_the_user_set():
    inner = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.9)
    tx = lo.lookahead(inner, k=2, alpha=0.5, inner_state="pullback")
    params = {"w": jnp.array([1.0, -2.0])}
    opt_state = tx.init(params)
    hyperparams = opt_state.inner_state.hyperparams
    hyperparams["learning_rate"] = jnp.asarray(0.01, hyperparams["learning_rate"].dtype)
    update = jax.jit(tx.update)
    for _ in range(4):
        updates, opt_state = update(params, opt_state, params)
        params = optax.apply_updates(params, updates)
    assert int(opt_state.syncs) == 2
    assert float(opt_state.inner_state.hyperparams["learning_rate"]) == pytest.approx(0.01)
    # ... while the momentum trace (params-shaped) is pulled back: it differs from "keep".
    keep = lo.lookahead(inner, k=2, alpha=0.5)
    keep_state = keep.init({"w": jnp.array([1.0, -2.0])})
    keep_state.inner_state.hyperparams["learning_rate"] = jnp.asarray(0.01, jnp.float32)
    p = {"w": jnp.array([1.0, -2.0])}
    keep_update = jax.jit(keep.update)
    for _ in range(4):
        updates, keep_state = keep_update(p, keep_state, p)
        p = optax.apply_updates(p, updates)
    trace, keep_trace = (
        opt_state.inner_state.inner_state[0].trace,
        keep_state.inner_state.inner_state[0].trace,
    )
    assert not np.allclose(trace["w"], keep_trace["w"])


@pytest.mark.parametrize("policy", ["pullback", "reset"])
def test_a_policy_that_cannot_find_the_params_shaped_leaves_says_so(policy):
    tx = lo.lookahead(optax.lbfgs(), k=2, inner_state=policy)
    with pytest.raises(ValueError, match=f'inner_state="{policy}".*tree_map_params.*"keep"'):
        tx.init({"w": jnp.array([1.0, -2.0])})


def test_reset_keeps_the_schedule_and_restarts_the_moments():
    schedule = optax.linear_schedule(0.1, 0.0, 20)
    tx = lo.lookahead(optax.adam(schedule), k=3, inner_state="reset")
    params = {"w": jnp.array([1.0, -2.0])}
    opt_state = tx.init(params)
    update = jax.jit(tx.update)
    for _ in range(7):
        updates, opt_state = update(params, opt_state, params)
        params = optax.apply_updates(params, updates)
    adam_state, schedule_state = opt_state.inner_state
    assert int(schedule_state.count) == 7  # the learning rate keeps decaying across syncs
    assert int(adam_state.count) == 1  # Adam restarted at the sync after step 6
    # Injected hyperparameters the user changed survive a reset.
    tx = lo.lookahead(
        optax.inject_hyperparams(optax.sgd)(learning_rate=0.1), k=2, inner_state="reset"
    )
    opt_state = tx.init(params)
    opt_state.inner_state.hyperparams["learning_rate"] = jnp.asarray(0.01, jnp.float32)
    update = jax.jit(tx.update)
    for _ in range(4):
        updates, opt_state = update(params, opt_state, params)
    assert float(opt_state.inner_state.hyperparams["learning_rate"]) == pytest.approx(0.01)
    assert int(opt_state.inner_state.count) == 4

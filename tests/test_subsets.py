"""Lookahead on a part of the params, nested lookaheads, and two models trained together.

The plain masked/multi_transform cases with independent leaf groups are in
test_compose.py. Here the covered and uncovered leaves interact through the loss,
the inner state policies run on masked states, lookahead(lookahead(...)) is checked
against a reference in which the outer loop sees the inner lookahead as its
optimizer, and two lookaheads play a bilinear min-max game (GAN-style).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lookahead_optax as lo
from tests import reference
from tests.test_policies import _pull, library_trajectory, policy_trajectory

PROBLEM = reference.LogisticQuadratic()
PARAMS0 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), PROBLEM.params0)
NUM_STEPS = 11
TOL = dict(rtol=5e-5, atol=5e-6)

# Leaves in tree order: [b, q, w]. The lookahead covers w and q, not b; w and b
# interact through the logistic loss, so a wrong b changes w and the other way round.
COVERED = [False, True, True]
LABELS = {"b": "plain", "head": {"q": "lookahead"}, "w": "lookahead"}


def _close(tree, leaves):
    for got, want in zip(jax.tree.leaves(tree), leaves, strict=True):
        np.testing.assert_allclose(np.asarray(got, np.float64), want, **TOL)


def subset_reference(covered_inner, plain_inner, k, alpha, num_steps, policy="keep"):
    """Algorithm 1 on the covered leaves, the plain optimizer on the rest, one gradient."""
    leaves = PROBLEM.leaves0()
    covered = [i for i, c in enumerate(COVERED) if c]
    plain = [i for i, c in enumerate(COVERED) if not c]
    slow = [leaves[i].copy() for i in covered]
    covered_state = cycle_start = covered_inner.init([leaves[i] for i in covered])
    plain_state = plain_inner.init([leaves[i] for i in plain])
    history = []
    for step in range(1, num_steps + 1):
        grads = PROBLEM.grad(leaves)
        u_cov, covered_state = covered_inner.step(
            [grads[i] for i in covered], covered_state, [leaves[i] for i in covered]
        )
        u_plain, plain_state = plain_inner.step(
            [grads[i] for i in plain], plain_state, [leaves[i] for i in plain]
        )
        for i, u in zip(covered, u_cov):
            leaves[i] = leaves[i] + u
        for i, u in zip(plain, u_plain):
            leaves[i] = leaves[i] + u
        if step % k == 0:
            slow = [s + alpha * (leaves[i] - s) for s, i in zip(slow, covered)]
            for s, i in zip(slow, covered):
                leaves[i] = s.copy()
            if policy == "reset":
                covered_state = covered_inner.init(slow)
            elif policy == "pullback":
                covered_state = cycle_start = _pull(cycle_start, covered_state, alpha)
        slow_all = list(leaves)
        for s, i in zip(slow, covered):
            slow_all[i] = s
        history.append(([x.copy() for x in leaves], slow_all, covered_state))
    return history


@pytest.mark.parametrize("policy", ["keep", "reset", "pullback"])
@pytest.mark.parametrize("wrapper", ["multi_transform", "masked"])
def test_lookahead_on_a_subset(wrapper, policy):
    lookahead = lo.lookahead(optax.adam(0.05), k=3, alpha=0.6, inner_state=policy)
    plain = optax.sgd(0.3, momentum=0.9)
    if wrapper == "multi_transform":
        tx = optax.multi_transform({"lookahead": lookahead, "plain": plain}, LABELS)
    else:
        mask = jax.tree.map(lambda label: label == "lookahead", LABELS)
        tx = optax.chain(
            optax.masked(lookahead, mask),
            optax.masked(plain, jax.tree.map(lambda m: not m, mask)),
        )
    got = library_trajectory(tx, PARAMS0, PROBLEM.loss, NUM_STEPS)
    expected = subset_reference(
        reference.Adam(0.05), reference.Momentum(0.3, 0.9), 3, 0.6, NUM_STEPS, policy
    )
    for (params, slow, opt_state), (fast_ref, slow_ref, adam_ref) in zip(got, expected):
        _close(params, fast_ref)
        _close(slow, slow_ref)  # b is not covered: slow_params gives the params back
        np.testing.assert_array_equal(np.asarray(slow["b"]), np.asarray(params["b"]))
        # The covered Adam's second moments (q then w) match the reference's.
        is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)  # noqa: E731
        # The first Adam state is the live one (pullback's cycle_start holds a second).
        adam = [x for x in jax.tree.leaves(opt_state, is_leaf=is_adam) if is_adam(x)][0]
        assert int(adam.count) == adam_ref[0]
        _close(adam.mu, adam_ref[1])
        _close(adam.nu, adam_ref[2])


def test_adaptive_alpha_on_a_subset():
    """adaptive_alpha(curvature="adam") under optax.masked sums over the covered leaves only."""
    alpha_min, b2 = 0.1, 0.95
    mask = jax.tree.map(lambda label: label == "lookahead", LABELS)
    tx = optax.chain(
        optax.masked(
            lo.lookahead(
                optax.adam(0.3, b2=b2),
                k=3,
                alpha=lo.adaptive_alpha(alpha_min, curvature="adam", b2=b2),
            ),
            mask,
        ),
        optax.masked(optax.sgd(0.3), jax.tree.map(lambda m: not m, mask)),
    )
    got = library_trajectory(tx, PARAMS0, PROBLEM.loss, NUM_STEPS)

    # Reference: the adaptive slow step on the covered leaves [q, w].
    adam, sgd = reference.Adam(0.3, b2=b2), reference.SGD(0.3)
    leaves = PROBLEM.leaves0()
    slow = [leaves[1].copy(), leaves[2].copy()]
    adam_state = adam.init(slow)
    alphas = []
    for step in range(1, NUM_STEPS + 1):
        grads = PROBLEM.grad(leaves)
        theta_prev = [leaves[1], leaves[2]]
        u, adam_state = adam.step([grads[1], grads[2]], adam_state, theta_prev)
        (u_b,), _ = sgd.step([grads[0]], (), [leaves[0]])
        leaves = [leaves[0] + u_b, leaves[1] + u[0], leaves[2] + u[1]]
        if step % 3 == 0:
            t, _, nu = adam_state
            v_hat = [v / (1 - b2**t) for v in nu]
            d = [leaves[1] - slow[0], leaves[2] - slow[1]]
            g_k = [grads[1] + v_hat[0] * u[0], grads[2] + v_hat[1] * u[1]]
            numerator = sum(np.sum(g * di) for g, di in zip(g_k, d))
            denominator = sum(np.sum(v * di * di) for v, di in zip(v_hat, d))
            alpha = float(np.clip(1 - numerator / denominator, alpha_min, 1.0))
            alphas.append(alpha)
            slow = [s + alpha * di for s, di in zip(slow, d)]
            leaves = [leaves[0], slow[0].copy(), slow[1].copy()]
        if step % 3 == 0:
            adaptive = jax.tree.leaves(
                got[step - 1][2], is_leaf=lambda x: isinstance(x, lo.AdaptiveAlphaState)
            )
            (state,) = [x for x in adaptive if isinstance(x, lo.AdaptiveAlphaState)]
            np.testing.assert_allclose(float(state.alpha), alpha, rtol=5e-5)
        _close(got[step - 1][0], leaves)
    assert any(alpha_min < a < 1.0 for a in alphas), alphas


# --- lookahead(lookahead(...)) -------------------------------------------------------------


class ReferenceLookahead:
    """Lookahead as an inner optimizer (init/step) for the reference loops."""

    def __init__(self, inner, k, alpha):
        self.inner, self.k, self.alpha = inner, k, alpha

    def init(self, params):
        return (self.inner.init(params), [np.array(p, np.float64) for p in params], 0)

    def step(self, grads, state, params):
        inner_state, slow, count = state
        updates, inner_state = self.inner.step(grads, inner_state, params)
        count += 1
        if count == self.k:
            fast = [p + u for p, u in zip(params, updates)]
            slow = [s + self.alpha * (f - s) for s, f in zip(slow, fast)]
            updates = [s - p for s, p in zip(slow, params)]
            count = 0
        return updates, (inner_state, slow, count)


@pytest.mark.parametrize("outer_policy", ["keep", "reset"])
def test_nested_lookahead(outer_policy):
    """The outer lookahead sees the inner lookahead as its optimizer.

    With "keep" the inner slow weights carry over an outer sync; with "reset" the
    inner lookahead restarts from the outer slow weights (a multi-level scheme).
    """
    tx = lo.lookahead(
        lo.lookahead(optax.adam(0.05), k=2, alpha=0.5), k=3, alpha=0.6, inner_state=outer_policy
    )
    got = library_trajectory(tx, PARAMS0, PROBLEM.loss, 13)
    expected = policy_trajectory(
        PROBLEM.leaves0(),
        PROBLEM.grad,
        ReferenceLookahead(reference.Adam(0.05), 2, 0.5),
        3,
        0.6,
        13,
        outer_policy,
    )
    for (params, slow, opt_state), (fast_ref, slow_ref, inner_ref) in zip(got, expected):
        _close(params, fast_ref)
        _close(slow, slow_ref)  # slow_params: the outermost (slowest) weights
        _close(opt_state.inner_state.slow, inner_ref[1])  # the middle level
        assert int(opt_state.inner_state.count) == inner_ref[2]


# --- two models trained together (GAN-style) -----------------------------------------------

GAME = np.array([[1.0, 0.5, 0.0], [0.0, 1.0, -0.5], [0.3, 0.0, 1.0]])
X0, Y0 = np.array([1.0, -0.5, 0.5]), np.array([0.5, 1.0, -1.0])


def game_grads(x, y):
    """min_x max_y x^T M y: the descent directions of both players."""
    return GAME @ y, -(GAME.T @ x)


def game_reference(k, alpha, lr, num_steps, alternating):
    """Both players run Algorithm 1 with SGD; both sync on steps k, 2k, ...

    Alternating: the second player's gradient is taken at the first player's new
    weights (after its sync, on sync steps).
    """
    x, y = X0.copy(), Y0.copy()
    slow_x, slow_y = x.copy(), y.copy()
    history = []
    for step in range(1, num_steps + 1):
        sync = step % k == 0
        gx, gy = game_grads(x, y)
        x = x - lr * gx
        if sync:
            slow_x = slow_x + alpha * (x - slow_x)
            x = slow_x.copy()
        if alternating:
            _, gy = game_grads(x, y)
        y = y - lr * gy
        if sync:
            slow_y = slow_y + alpha * (y - slow_y)
            y = slow_y.copy()
        history.append((x.copy(), y.copy()))
    return history


@pytest.mark.parametrize("alternating", [False, True])
def test_two_models_sync_on_the_same_steps(alternating):
    k, alpha, lr, num_steps = 5, 0.5, 0.3, 60
    tx_x = lo.lookahead(optax.sgd(lr), k=k, alpha=alpha)
    tx_y = lo.lookahead(optax.sgd(lr), k=k, alpha=alpha)
    game = jnp.asarray(GAME, jnp.float32)

    def value(x, y):
        return x @ game @ y

    @jax.jit
    def step(x, y, state_x, state_y):
        gx = jax.grad(value, 0)(x, y)
        updates, state_x = tx_x.update(gx, state_x, x)
        x_new = optax.apply_updates(x, updates)
        gy = -jax.grad(value, 1)(x_new if alternating else x, y)  # y ascends
        updates, state_y = tx_y.update(gy, state_y, y)
        return x_new, optax.apply_updates(y, updates), state_x, state_y

    x, y = jnp.asarray(X0, jnp.float32), jnp.asarray(Y0, jnp.float32)
    state_x, state_y = tx_x.init(x), tx_y.init(y)
    expected = game_reference(k, alpha, lr, num_steps, alternating)
    for x_ref, y_ref in expected:
        x, y, state_x, state_y = step(x, y, state_x, state_y)
        assert int(state_x.count) == int(state_y.count)
        assert int(state_x.syncs) == int(state_y.syncs)
        np.testing.assert_allclose(np.asarray(x), x_ref, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(np.asarray(y), y_ref, rtol=1e-4, atol=1e-5)
    assert int(state_x.syncs) == num_steps // k

    # Why one would do this: simultaneous gradient descent spirals out on a bilinear
    # game, Lookahead's averaging pulls it in (Chavdarova et al., 2021).
    distance0 = np.linalg.norm(np.concatenate([X0, Y0]))
    distance = np.linalg.norm(np.concatenate(expected[-1]))
    plain = game_reference(1, 1.0, lr, num_steps, alternating)
    distance_plain = np.linalg.norm(np.concatenate(plain[-1]))
    if not alternating:
        assert distance_plain > distance0
    assert distance < 0.3 * distance0  # measured: 0.15 (simultaneous), 0.12 (alternating)

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
from tests.helpers import REFERENCE_PARAMS_LIKE as PARAMS_LIKE
from tests.helpers import adam_curvature_alpha, library_trajectory

PROBLEM = reference.LogisticQuadratic()
PARAMS0 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), PROBLEM.params0)
NUM_STEPS = 11
TOL = dict(rtol=5e-5, atol=5e-6)

# Leaves in tree order: [b, q, w]. The lookahead covers w and q, not b; w and b
# interact through the logistic loss, so a wrong b changes w and the other way round.
COVERED, PLAIN = [1, 2], [0]
LABELS = {"b": "plain", "head": {"q": "lookahead"}, "w": "lookahead"}


def _close(tree, leaves):
    for got, want in zip(jax.tree.leaves(tree), leaves, strict=True):
        np.testing.assert_allclose(np.asarray(got, np.float64), want, **TOL)


def subset_reference(lookahead, plain_inner, num_steps):
    """The reference ``lookahead`` on the covered leaves, ``plain_inner`` on b, one gradient.

    Per step: (params, slow weights of every leaf (b's are its params), the Lookahead's state).
    """
    partition = reference.Partition([lookahead, plain_inner], [COVERED, PLAIN])
    history = []
    for step in reference.run(partition, PROBLEM.leaves0(), PROBLEM.grad, num_steps):
        lookahead_state = step.state[0]
        slow = list(step.params)
        for i, s in zip(COVERED, lookahead_state.slow):
            slow[i] = s
        history.append((step.params, slow, lookahead_state))
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
    reference_lookahead = reference.Lookahead(
        reference.Adam(0.05), 3, 0.6, policy, PARAMS_LIKE.get(("adam", policy))
    )
    expected = subset_reference(reference_lookahead, reference.Momentum(0.3, 0.9), NUM_STEPS)
    for (params, slow, opt_state), (fast_ref, slow_ref, lookahead_ref) in zip(
        got, expected, strict=True
    ):
        _close(params, fast_ref)
        _close(slow, slow_ref)  # b is not covered: slow_params gives the params back
        np.testing.assert_array_equal(np.asarray(slow["b"]), np.asarray(params["b"]))
        # The covered Adam's moments (q then w) match the reference's.
        is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)  # noqa: E731
        # The first Adam state is the live one (pullback's cycle_start holds a second).
        adam = [x for x in jax.tree.leaves(opt_state, is_leaf=is_adam) if is_adam(x)][0]
        t, mu, nu = lookahead_ref.inner
        assert int(adam.count) == t
        _close(adam.mu, mu)
        _close(adam.nu, nu)


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
    # The reference's alpha rule sees the covered leaves [q, w] only.
    reference_lookahead = reference.Lookahead(
        reference.Adam(0.3, b2=b2), 3, alpha_rule=adam_curvature_alpha(alpha_min, b2)
    )
    expected = subset_reference(reference_lookahead, reference.SGD(0.3), NUM_STEPS)
    alphas = []
    for step, ((params, _, opt_state), (fast_ref, _, lookahead_ref)) in enumerate(
        zip(got, expected, strict=True), start=1
    ):
        _close(params, fast_ref)
        if step % 3 == 0:
            adaptive = jax.tree.leaves(
                opt_state, is_leaf=lambda x: isinstance(x, lo.AdaptiveAlphaState)
            )
            (state,) = [x for x in adaptive if isinstance(x, lo.AdaptiveAlphaState)]
            np.testing.assert_allclose(float(state.alpha), lookahead_ref.alpha, rtol=5e-5)
            alphas.append(lookahead_ref.alpha)
    assert any(alpha_min < a < 1.0 for a in alphas), alphas


# --- lookahead(lookahead(...)) -------------------------------------------------------------


@pytest.mark.parametrize("outer_policy", ["keep", "reset"])
def test_nested_lookahead(outer_policy):
    """The outer lookahead sees the inner lookahead as its optimizer.

    With "keep" the inner slow weights carry over an outer sync; with "reset" the
    inner lookahead restarts from the outer slow weights (a multi-level scheme): its
    state is one record holding params-shaped leaves, re-initialised as a whole.
    """
    tx = lo.lookahead(
        lo.lookahead(optax.adam(0.05), k=2, alpha=0.5), k=3, alpha=0.6, inner_state=outer_policy
    )
    got = library_trajectory(tx, PARAMS0, PROBLEM.loss, 13)
    middle = reference.Lookahead(reference.Adam(0.05), 2, 0.5)
    outer = reference.Lookahead(middle, 3, 0.6, outer_policy, reference.every_leaf)
    expected = reference.run(outer, PROBLEM.leaves0(), PROBLEM.grad, 13)
    for (params, slow, opt_state), step in zip(got, expected, strict=True):
        _close(params, step.params)
        _close(slow, step.state.slow)  # slow_params: the outermost (slowest) weights
        _close(opt_state.inner_state.slow, step.state.inner.slow)  # the middle level
        assert int(opt_state.inner_state.count) == step.state.inner.count
    # Guard: the two levels' slow weights differ (the middle level is really checked).
    gaps = [
        max(np.max(np.abs(a - b)) for a, b in zip(step.state.slow, step.state.inner.slow))
        for step in expected
    ]
    assert max(gaps) > 1e-3


# --- two models trained together (GAN-style) -----------------------------------------------

GAME = np.array([[1.0, 0.5, 0.0], [0.0, 1.0, -0.5], [0.3, 0.0, 1.0]])
X0, Y0 = np.array([1.0, -0.5, 0.5]), np.array([0.5, 1.0, -1.0])


def game_grads(x, y):
    """min_x max_y x^T M y: the descent directions of both players."""
    return GAME @ y, -(GAME.T @ x)


def game_reference(k, alpha, lr, num_steps, alternating):
    """Both players run the reference Lookahead with SGD; both sync on steps k, 2k, ...

    Alternating: the second player's gradient is taken at the first player's new
    weights (after its sync, on sync steps).
    """
    player_x = reference.Lookahead(reference.SGD(lr), k, alpha)
    player_y = reference.Lookahead(reference.SGD(lr), k, alpha)
    x, y = X0.copy(), Y0.copy()
    state_x, state_y = player_x.init([x]), player_y.init([y])
    history = []
    for _ in range(num_steps):
        gx, gy = game_grads(x, y)
        (ux,), state_x = player_x.step([gx], state_x, [x])
        x_new = x + ux
        if alternating:
            _, gy = game_grads(x_new, y)
        (uy,), state_y = player_y.step([gy], state_y, [y])
        x, y = x_new, y + uy
        history.append((x.copy(), y.copy()))
    return history


def library_game(tx_x, tx_y, num_steps, alternating):
    """Both players trained with the library; (x, y, state_x, state_y) after every step."""
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
    history = []
    for _ in range(num_steps):
        x, y, state_x, state_y = step(x, y, state_x, state_y)
        history.append((x, y, state_x, state_y))
    return history


@pytest.mark.parametrize("alternating", [False, True])
def test_two_models_sync_on_the_same_steps(alternating):
    k, alpha, lr, num_steps = 5, 0.5, 0.3, 60
    got = library_game(
        lo.lookahead(optax.sgd(lr), k=k, alpha=alpha),
        lo.lookahead(optax.sgd(lr), k=k, alpha=alpha),
        num_steps,
        alternating,
    )
    expected = game_reference(k, alpha, lr, num_steps, alternating)
    for (x, y, state_x, state_y), (x_ref, y_ref) in zip(got, expected, strict=True):
        assert int(state_x.count) == int(state_y.count)
        assert int(state_x.syncs) == int(state_y.syncs)
        np.testing.assert_allclose(np.asarray(x), x_ref, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(np.asarray(y), y_ref, rtol=1e-4, atol=1e-5)
    assert int(got[-1][2].syncs) == num_steps // k

    # Why one would do this: simultaneous gradient descent spirals out on a bilinear
    # game, Lookahead's averaging pulls it in (Chavdarova et al., 2021). Both runs are
    # the library's: its Lookahead must beat the very SGD it wraps, run alone.
    def distance(x, y):
        return float(np.linalg.norm(np.concatenate([np.asarray(x), np.asarray(y)])))

    plain = library_game(optax.sgd(lr), optax.sgd(lr), num_steps, alternating)
    distance0 = distance(X0, Y0)
    distance_lookahead, distance_plain = distance(*got[-1][:2]), distance(*plain[-1][:2])
    # measured: 0.15 (simultaneous), 0.12 (alternating) of distance0 for Lookahead;
    # plain SGD 3.6 (simultaneous, spiralling out) and 0.98 (alternating).
    assert distance_lookahead < 0.3 * distance0
    assert distance_lookahead < 0.3 * distance_plain
    if not alternating:
        assert distance_plain > distance0

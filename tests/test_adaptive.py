"""adaptive_alpha against closed forms computed here, independently of the library.

With the exact curvature of a quadratic the chosen alpha must be the exact line
search along d = theta_k - phi, alpha* = 1 - grad L(theta_k).d / (d.A d), with
the gradient taken at theta_k itself (the library extrapolates it from theta_{k-1}).
The "ema" and "adam" estimates are checked against the formula written from the spec.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lookahead_optax as lo
from tests import reference
from tests.helpers import SGD_LR, adam_curvature_alpha, model_alpha, sync_direction

K = 4
NUM_SYNCS = 6

# L(x) = 0.5 * sum(a * (x - c)**2) on params {"b": (2,), "w": (3,)} (leaves in that order).
CURVATURE = {"b": np.array([0.5, 10.0]), "w": np.array([1.0, 5.0, 20.0])}
TARGET = {"b": np.array([1.0, -2.0]), "w": np.array([0.5, 0.0, -1.0])}
PARAMS0 = {"b": np.array([0.0, 1.0]), "w": np.array([2.0, -1.0, 1.0])}
A = [CURVATURE["b"], CURVATURE["w"]]
C = [TARGET["b"], TARGET["w"]]


def quadratic_grad(leaves):
    return [a * (x - c) for a, x, c in zip(A, leaves, C)]


def quadratic_loss(leaves):
    return sum(0.5 * np.sum(a * (x - c) ** 2) for a, x, c in zip(A, leaves, C))


def jax_loss(params):
    return sum(
        0.5 * jnp.sum(jnp.asarray(CURVATURE[n]) * (params[n] - jnp.asarray(TARGET[n])) ** 2)
        for n in ("b", "w")
    )


def _to_jax(tree):
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


def library_syncs(tx, params0, loss):
    """(alpha, slow leaves) at every sync of the library."""

    @jax.jit
    def cycle(params, opt_state):
        for _ in range(K):
            updates, opt_state = tx.update(jax.grad(loss)(params), opt_state, params)
            params = optax.apply_updates(params, updates)
        return params, opt_state

    params, opt_state = _to_jax(params0), tx.init(_to_jax(params0))
    history = []
    for _ in range(NUM_SYNCS):
        params, opt_state = cycle(params, opt_state)
        slow = lo.slow_params(opt_state, params)
        history.append((float(opt_state.adaptive.alpha), jax.tree.leaves(slow)))
    return history


def reference_syncs(inner, grad_fn, alpha_rule, inner_state="keep"):
    """(alpha, slow leaves) at every sync of the reference Lookahead with ``alpha_rule``.

    ``alpha_rule(view)`` sees the fast weights theta_k, the slow weights, the gradient
    of the last inner step (at theta_{k-1}), that step's update and the inner state
    after it (a ``reference.SyncView``).
    """
    lookahead = reference.Lookahead(inner, K, inner_state=inner_state, alpha_rule=alpha_rule)
    params0 = jax.tree.leaves(PARAMS0)
    history = reference.run(lookahead, params0, grad_fn, K * NUM_SYNCS)
    return [(step.state.alpha, step.state.slow) for step in history[K - 1 :: K]]


def _dot(xs, ys):
    return sum(float(np.sum(x * y)) for x, y in zip(xs, ys))


def _compare(got, expected, alpha_min):
    for (alpha, slow), (alpha_ref, slow_ref) in zip(got, expected, strict=True):
        np.testing.assert_allclose(alpha, alpha_ref, rtol=2e-5, atol=2e-6)
        for x, r in zip(slow, slow_ref):
            np.testing.assert_allclose(np.asarray(x, np.float64), r, rtol=2e-5, atol=2e-6)
    # Guards: some syncs are clipped and some are not, so both branches are exercised.
    alphas = [a for a, _ in expected]
    assert any(alpha_min < a < 1.0 - 1e-6 for a in alphas), alphas


def exact_alpha(alpha_min):
    """The closed-form alpha* with the exact Hessian and the exact gradient at theta_k."""

    def alpha_rule(view):
        d = sync_direction(view)
        g_k = quadratic_grad(view.fast)
        curvature_d = [a * di for a, di in zip(A, d)]
        alpha = 1.0 - _dot(g_k, d) / _dot(d, curvature_d)
        # It is the minimiser of L along the segment: L is larger on both sides.
        line = lambda t: quadratic_loss([s + t * di for s, di in zip(view.slow, d)])  # noqa: E731
        assert line(alpha) <= min(line(alpha - 1e-3), line(alpha + 1e-3))
        return float(np.clip(alpha, alpha_min, 1.0))

    return alpha_rule


@pytest.mark.parametrize("given_as", ["pytree", "callable"])
def test_exact_curvature_gives_the_closed_form_alpha(given_as):
    alpha_min = 0.05

    def curvature_of(params):
        return jax.tree.map(lambda a, p: a + 0 * p, _to_jax(CURVATURE), params)

    curvature = curvature_of if given_as == "callable" else _to_jax(CURVATURE)
    # Under-damped momentum: the stiff coordinates oscillate, so alpha* < 1.
    tx = lo.lookahead(
        optax.sgd(0.06, momentum=0.9),
        k=K,
        alpha=lo.adaptive_alpha(alpha_min, curvature=curvature),
    )
    got = library_syncs(tx, PARAMS0, jax_loss)
    expected = reference_syncs(
        reference.Momentum(0.06, 0.9), quadratic_grad, exact_alpha(alpha_min)
    )
    _compare(got, expected, alpha_min)


def test_exact_line_search_beats_fixed_alpha_on_the_quadratic():
    """At each sync the slow weights of the exact adaptive run are the best on the segment."""
    expected = reference_syncs(reference.Momentum(0.06, 0.9), quadratic_grad, exact_alpha(1e-3))
    fixed = reference_syncs(reference.Momentum(0.06, 0.9), quadratic_grad, lambda view: 0.5)
    assert quadratic_loss(expected[-1][1]) < quadratic_loss(fixed[-1][1])


def _ema_alpha(alpha_min, decay, trajectory_grads):
    """alpha from a bias-corrected EMA of squared gradients, g_k = g + v_hat * u."""

    def alpha_rule(view):
        t = len(trajectory_grads)
        ema = [np.zeros_like(x) for x in view.slow]
        for grads in trajectory_grads:
            ema = [decay * v + (1 - decay) * g**2 for v, g in zip(ema, grads)]
        return model_alpha(view, [v / (1 - decay**t) for v in ema], alpha_min)

    return alpha_rule


def test_ema_curvature_matches_the_spec():
    alpha_min, decay = 0.1, 0.9
    seen_grads = []

    def recording_grad(leaves):
        grads = quadratic_grad(leaves)
        seen_grads.append(grads)
        return grads

    tx = lo.lookahead(
        optax.sgd(0.09, momentum=0.5),
        k=K,
        alpha=lo.adaptive_alpha(alpha_min, curvature="ema", decay=decay),
    )
    got = library_syncs(tx, PARAMS0, jax_loss)
    expected = reference_syncs(
        reference.Momentum(0.09, 0.5), recording_grad, _ema_alpha(alpha_min, decay, seen_grads)
    )
    _compare(got, expected, alpha_min)


def test_adam_curvature_matches_the_spec():
    alpha_min, b2 = 0.1, 0.95
    tx = lo.lookahead(
        optax.adam(0.3, b2=b2),
        k=K,
        alpha=lo.adaptive_alpha(alpha_min, curvature="adam", b2=b2),
    )
    got = library_syncs(tx, PARAMS0, jax_loss)
    expected = reference_syncs(
        reference.Adam(0.3, b2=b2), quadratic_grad, adam_curvature_alpha(alpha_min, b2)
    )
    _compare(got, expected, alpha_min)


def test_adaptive_alpha_with_pullback_and_in_scan():
    """The adaptive alpha also drives the pullback; state dtypes are stable in lax.scan."""
    tx = lo.lookahead(
        optax.sgd(0.06, momentum=0.9),
        k=K,
        alpha=lo.adaptive_alpha(0.05, curvature=_to_jax(CURVATURE)),
        inner_state="pullback",
    )

    def body(carry, _):
        params, opt_state = carry
        updates, opt_state = tx.update(jax.grad(jax_loss)(params), opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), opt_state.adaptive.alpha

    params0 = _to_jax(PARAMS0)
    (params, _), alphas = jax.jit(lambda carry: jax.lax.scan(body, carry, length=K * NUM_SYNCS))(
        (params0, tx.init(params0))
    )

    expected = reference_syncs(
        reference.Momentum(0.06, 0.9), quadratic_grad, exact_alpha(0.05), inner_state="pullback"
    )
    expected_alphas = [alpha for alpha, _ in expected]
    np.testing.assert_allclose(np.asarray(alphas)[K - 1 :: K], expected_alphas, rtol=2e-5)
    for x, r in zip(jax.tree.leaves(params), expected[-1][1]):
        np.testing.assert_allclose(np.asarray(x, np.float64), r, rtol=2e-5, atol=2e-6)
    # Guard: the pullback changed the run (the same rule without it ends elsewhere).
    kept = reference_syncs(reference.Momentum(0.06, 0.9), quadratic_grad, exact_alpha(0.05))
    assert max(np.max(np.abs(a - b)) for a, b in zip(kept[-1][1], expected[-1][1])) > 1e-3


def test_default_state_is_unchanged():
    """The default configuration gains no leaves: checkpoints keep their contents."""
    params = {"w": jnp.ones(3)}
    state = lo.lookahead(optax.adam(1e-3)).init(params)
    assert state.adaptive is None
    inner_leaves = len(jax.tree.leaves(optax.adam(1e-3).init(params)))
    # + slow + count, syncs, period (new in 0.3.0)
    assert len(jax.tree.leaves(state)) == inner_leaves + 1 + 3
    ema = lo.lookahead(optax.adam(1e-3), alpha=lo.adaptive_alpha()).init(params)
    assert ema.adaptive.grad_sq["w"].shape == (3,)  # "ema": one params-sized buffer
    adam = lo.lookahead(optax.adam(1e-3), alpha=lo.adaptive_alpha(curvature="adam")).init(params)
    assert adam.adaptive.grad_sq is None  # "adam": no extra buffer


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"alpha_min": 0.0}, "alpha_min"),
        ({"alpha_min": 1.5}, "alpha_min"),
        ({"decay": 1.0}, "decay"),
        ({"curvature": "hessian"}, "curvature"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lo.adaptive_alpha(**kwargs)


def test_adam_curvature_needs_an_adam_state():
    tx = lo.lookahead(optax.sgd(0.1), alpha=lo.adaptive_alpha(curvature="adam"))
    with pytest.raises(ValueError, match='curvature="adam"'):
        tx.init({"w": jnp.ones(2)})


# ---- strict promotion with bf16 params ----


def test_adaptive_alpha_under_strict_promotion_with_bf16_params():
    params = {"w": jnp.array([1.0, -2.0, 0.5], jnp.bfloat16)}
    tx = lo.lookahead(optax.sgd(SGD_LR), k=2, alpha=lo.adaptive_alpha(curvature="ema"))
    opt_state = tx.init(params)
    with jax.numpy_dtype_promotion("strict"):  # traced in the loop's first call
        update = jax.jit(tx.update)
        for _ in range(4):
            updates, opt_state = update(params, opt_state, params)
            params = optax.apply_updates(params, updates)
    assert int(opt_state.syncs) == 2 and params["w"].dtype == jnp.bfloat16

"""The paper's quadratic analyses against the library (benchmarks/quadratic.py).

Noisy quadratic: the closed-form steady-state variances of SGD and of
Lookahead's slow weights against a Monte Carlo that drives the library; the
tolerance is a few standard errors computed from the independent chains.
Deterministic quadratic: Lookahead(GD)'s exact contraction, the cycle map T of
Lookahead(momentum) against one library cycle, and the per-step rate measured
on the library's trajectories against rho(T)^(1/k).
"""

import doctest
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lookahead_optax as lo

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import quadratic as qd  # noqa: E402
from tests import reference  # noqa: E402

GAMMA = qd.PAPER_GAMMA
STEPS, CHAINS = 4000, 1024
# |estimate - closed form| < Z standard errors; with 3 coordinates x 4 checks a
# true model fails this with probability ~ 1e-3 (the seed is fixed anyway).
Z = 4.0


def _assert_within_standard_errors(run, closed):
    estimate, error = qd.steady_variance(run)
    # The test has power: the standard error is a small fraction of the value.
    assert np.all(error < 0.05 * closed), (error, closed)
    np.testing.assert_array_less(np.abs(estimate - closed), Z * error)


@pytest.mark.slow  # Monte Carlo: 1024 chains x 4000 steps
def test_sgd_steady_variance_matches_monte_carlo():
    run = qd.steady_state_run(GAMMA, None, steps=STEPS, chains=CHAINS, seed=1)
    _assert_within_standard_errors(run, qd.sgd_variance(GAMMA, qd.PAPER_A, qd.PAPER_SIGMA2))


@pytest.mark.slow  # Monte Carlo
@pytest.mark.parametrize("k, alpha", [(5, 0.5), (10, 0.8)])
def test_lookahead_steady_variance_matches_monte_carlo(k, alpha):
    run = qd.steady_state_run(GAMMA, k, alpha, steps=STEPS, chains=CHAINS, seed=2)
    closed = qd.lookahead_variance(GAMMA, qd.PAPER_A, qd.PAPER_SIGMA2, k, alpha)
    _assert_within_standard_errors(run, closed)
    # ...and the check can tell Lookahead from SGD: the variance really is smaller.
    estimate, error = qd.steady_variance(run)
    sgd = qd.sgd_variance(GAMMA, qd.PAPER_A, qd.PAPER_SIGMA2)
    assert np.all(estimate + Z * error < sgd)


def test_lookahead_variance_recursion_converges_to_closed_form():
    _, var = qd.lookahead_moments(GAMMA, qd.PAPER_A, qd.PAPER_SIGMA2, 5, 0.5, 0.0, 20000)
    closed = qd.lookahead_variance(GAMMA, qd.PAPER_A, qd.PAPER_SIGMA2, 5, 0.5)
    np.testing.assert_allclose(var[-1], closed, rtol=1e-10)


@pytest.mark.slow  # Monte Carlo
def test_alpha_one_is_plain_sgd():
    k = 5
    burn_in = qd.burn_in_steps(GAMMA, k, 1.0)
    lookahead = qd.simulate_lookahead(GAMMA, k, 1.0, steps=STEPS, burn_in=burn_in,
                                      chains=CHAINS, seed=3)  # fmt: skip
    # Same seed: SGD sees the same noise, so the slow weights at the syncs are
    # SGD's iterates at steps k, 2k, ... (up to rounding).
    sgd = qd.simulate_sgd(GAMMA, steps=STEPS, burn_in=burn_in, period=k, chains=CHAINS, seed=3)
    np.testing.assert_allclose(lookahead.second_moment, sgd.second_moment, rtol=1e-4)
    np.testing.assert_allclose(
        lookahead.chain_second_moment, sgd.chain_second_moment, rtol=1e-4, atol=1e-9
    )
    closed = qd.sgd_variance(GAMMA, qd.PAPER_A, qd.PAPER_SIGMA2)
    np.testing.assert_allclose(
        qd.lookahead_variance(GAMMA, qd.PAPER_A, qd.PAPER_SIGMA2, k, 1.0), closed, rtol=1e-12
    )
    _assert_within_standard_errors(lookahead, closed)


@pytest.mark.parametrize("k, alpha", [(1, 0.3), (5, 0.5), (7, 0.8)])
def test_gd_slow_weights_contract_exactly(k, alpha):
    # q = 1 - gamma a covers fast, slow and negative (oscillating) directions.
    curvature = jnp.array([1.0, 0.1, 0.01, 3.0])
    phi0 = jnp.array([1.0, -2.0, 0.5, 1.5])
    tx = lo.lookahead(optax.sgd(GAMMA), k=k, alpha=alpha)

    def step(carry, _):
        params, state = carry
        updates, state = tx.update(curvature * params, state, params)
        params = optax.apply_updates(params, updates)
        return (params, state), lo.slow_params(state, params)

    _, slow = jax.jit(lambda p: jax.lax.scan(step, (p, tx.init(p)), length=12 * k))(phi0)
    slow = np.asarray(slow)[k - 1 :: k]  # after steps k, 2k, ..., 12k
    factor = qd.gd_lookahead_factor(GAMMA, np.asarray(curvature), k, alpha)
    expected = factor ** np.arange(1, 13)[:, None] * np.asarray(phi0)
    np.testing.assert_allclose(slow, expected, rtol=2e-5, atol=1e-7)


def reference_cycle_matrix(gamma, a, beta, k, alpha, inner_state):
    """T from tests/reference.py: one cycle of its Lookahead from (phi, v) = e1 and e2."""
    lookahead = reference.Lookahead(reference.Momentum(gamma, beta), k, alpha, inner_state)
    columns = []
    for phi, velocity in ((1.0, 0.0), (0.0, 1.0)):
        params = [np.array([phi])]
        state = lookahead.init(params)._replace(inner=[np.array([velocity])])
        if inner_state == "pullback":
            state = state._replace(cycle_start=state.inner)
        for _ in range(k):
            updates, state = lookahead.step([a * params[0]], state, params)
            params = [params[0] + updates[0]]
        assert state.count == 0 and state.syncs == 1
        columns.append([params[0][0], state.inner[0][0]])
    return np.array(columns).T


@pytest.mark.parametrize("inner_state", ["keep", "reset", "pullback"])
def test_one_library_cycle_is_the_cycle_matrix(inner_state):
    gamma, a, beta, k, alpha = 0.3, 0.7, 0.9, 6, 0.6
    tx = lo.lookahead(optax.sgd(gamma, momentum=beta), k=k, alpha=alpha, inner_state=inner_state)
    phi, velocity = jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0])  # the two columns of T
    state = tx.init(phi)
    momentum = (optax.TraceState(trace=velocity), state.inner_state[1])
    state = state._replace(inner_state=momentum)
    if inner_state == "pullback":
        state = state._replace(cycle_start=momentum)

    def step(_, carry):
        params, state = carry
        updates, state = tx.update(a * params, state, params)
        return optax.apply_updates(params, updates), state

    params, state = jax.jit(lambda carry: jax.lax.fori_loop(0, k, step, carry))((phi, state))
    library_map = np.stack([np.asarray(params), np.asarray(state.inner_state[0].trace)])
    expected = reference_cycle_matrix(gamma, a, beta, k, alpha, inner_state)
    np.testing.assert_allclose(library_map, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lo.slow_params(state, params), params, rtol=1e-6, atol=1e-7)
    # The closed form the rate analyses use is the same map.
    closed_form = qd.lookahead_cycle_matrix(gamma, a, beta, k, alpha, inner_state)
    np.testing.assert_allclose(closed_form, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "gamma, eigenvalues, beta, k, alpha",
    [
        (0.5, (1.0, 0.2), 0.9, 20, 0.5),  # momentum under-damped in both directions
        (0.05, (1.0, 0.01), 0.5, 20, 0.5),  # over-damped along 0.01
        (1.0, (1.0,), 0.3, 5, 0.8),
    ],
)
def test_measured_rate_is_spectral_radius_of_cycle(gamma, eigenvalues, beta, k, alpha):
    measured = qd.measured_lookahead_rate(gamma, eigenvalues, beta, k, alpha)
    theory = qd.lookahead_rate(gamma, eigenvalues, beta, k, alpha)
    # Compare 1 - rate: the quantity that sets the number of steps.
    np.testing.assert_allclose(1 - measured, 1 - theory, rtol=0.01)
    momentum = qd.momentum_rate(gamma, eigenvalues, beta)
    measured_momentum = qd.measured_momentum_rate(gamma, eigenvalues, beta)
    np.testing.assert_allclose(1 - measured_momentum, 1 - momentum, rtol=0.01)
    assert abs((1 - theory) / (1 - momentum) - 1) > 0.1  # the two rates are told apart


def test_damping_claim_at_tuned_learning_rates():
    beta, k, alpha = 0.9, 20, 0.5
    for kappa in (1, 10, 100):
        eigenvalues = (1.0, float(kappa))
        gamma_max = 2 * (1 + beta) / kappa
        _, momentum = qd.best_learning_rate(
            lambda g: qd.momentum_rate(g, eigenvalues, beta), gamma_max, points=20000
        )
        # Tuned heavy ball is under-damped here and converges at sqrt(beta) per step.
        np.testing.assert_allclose(momentum, np.sqrt(beta), rtol=1e-6)
        _, lookahead = qd.best_learning_rate(
            lambda g: qd.lookahead_rate(g, eigenvalues, beta, k, alpha), gamma_max, points=20000
        )
        assert 1 - lookahead > 1.1 * (1 - momentum), kappa  # Lookahead converges faster
    # Over-damped directions (real eigenvalues of M): Lookahead is slower.
    gamma_a = np.geomspace(1e-5, 0.99 * (1 - np.sqrt(beta)) ** 2, 50)
    assert not any(qd.is_underdamped(g, 1.0, beta) for g in gamma_a)
    assert np.all(qd.lookahead_rate(gamma_a, (1.0,), beta, k, alpha)
                  > qd.momentum_rate(gamma_a, (1.0,), beta))  # fmt: skip


@pytest.mark.slow  # the benchmark module's doctests
def test_module_examples():
    # benchmarks/ is outside pytest's doctest paths: run its examples here.
    results = doctest.testmod(qd)
    assert results.attempted >= 5 and results.failed == 0

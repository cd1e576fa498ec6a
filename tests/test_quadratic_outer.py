"""SNOO (outer Nesterov step) on the paper's quadratics, against the library.

Deterministic quadratic: the cycle map on (x, v, b) (benchmarks/quadratic.py's
snoo_cycle_matrix) against one library cycle, its mu = 0 case against
Lookahead's cycle matrix, and its spectral radius against the contraction
measured on ``lo.lookahead(..., outer=optax.sgd(eta, momentum=mu, nesterov=True))``.
Noisy quadratic: the steady-state covariance of (slow weights, b) from the
discrete Lyapunov equation against the library's Monte Carlo.
"""

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

GAMMA, A, SIGMA2 = qd.PAPER_GAMMA, qd.PAPER_A, qd.PAPER_SIGMA2
STEPS, CHAINS = 4000, 1024
Z = 3.0  # |Monte Carlo - closed form| < Z standard errors (independent chains; fixed seeds)


@pytest.mark.parametrize("inner_state", ["keep", "reset"])
def test_mu_zero_is_lookahead_cycle_matrix(inner_state):
    gamma = np.linspace(0.01, 0.4, 7)
    for a, beta, k, alpha in [(0.7, 0.9, 6, 0.6), (1.0, 0.5, 20, 0.5), (3.0, 0.0, 5, 0.8)]:
        snoo = qd.snoo_cycle_matrix(gamma, a, beta, k, alpha, 0.0, inner_state)
        lookahead = qd.lookahead_cycle_matrix(gamma, a, beta, k, alpha, inner_state)
        # The same map, written differently: 1 - alpha (1 - m00) against (1 - alpha) + alpha m00.
        np.testing.assert_allclose(snoo[..., :2, :2], lookahead, rtol=1e-12, atol=1e-15)
        np.testing.assert_array_equal(snoo[..., :2, 2], 0.0)  # b never feeds back with mu = 0
        np.testing.assert_allclose(
            qd.spectral_radius_eig(snoo), qd.spectral_radius(lookahead), rtol=1e-12
        )
    eigenvalues = (1.0, 10.0)
    np.testing.assert_allclose(
        qd.snoo_rate(gamma, eigenvalues, 0.9, 20, 0.5, 0.0),
        qd.lookahead_rate(gamma, eigenvalues, 0.9, 20, 0.5),
        rtol=1e-12,
    )
    # GD inside: the 2x2 map on (x, b) has the 3x3 map's spectrum (v does not feed back).
    np.testing.assert_allclose(
        qd.snoo_gd_rate(gamma, eigenvalues, 5, 0.7, 0.9),
        qd.snoo_rate(gamma, eigenvalues, 0.0, 5, 0.7, 0.9),
        rtol=1e-10,
    )


@pytest.mark.parametrize("inner_state", ["keep", "reset"])
def test_one_library_cycle_is_the_snoo_cycle_matrix(inner_state):
    gamma, a, beta, k, eta, mu = 0.3, 0.7, 0.9, 6, 0.7, 0.9
    outer = optax.sgd(eta, momentum=mu, nesterov=True)
    tx = lo.lookahead(optax.sgd(gamma, momentum=beta), k=k, outer=outer, inner_state=inner_state)
    phi = jnp.array([1.0, 0.0, 0.0])  # columns: (phi, v, b) = e1, e2, e3
    state = tx.init(phi)
    state = state._replace(
        inner_state=(optax.TraceState(trace=jnp.array([0.0, 1.0, 0.0])), state.inner_state[1]),
        outer_state=(optax.TraceState(trace=jnp.array([0.0, 0.0, 1.0])), state.outer_state[1]),
    )

    def step(_, carry):
        params, state = carry
        updates, state = tx.update(a * params, state, params)
        return optax.apply_updates(params, updates), state

    params, state = jax.jit(lambda carry: jax.lax.fori_loop(0, k, step, carry))((phi, state))
    assert int(state.syncs) == 1
    library_map = np.stack([params, state.inner_state[0].trace, state.outer_state[0].trace])
    expected = qd.snoo_cycle_matrix(gamma, a, beta, k, eta, mu, inner_state)
    np.testing.assert_allclose(library_map, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "gamma, eigenvalues, beta, k, eta, mu",
    [
        (0.5, (1.0, 0.2), 0.9, 20, 0.7, 0.9),  # heavy ball inside, DiLoCo's outer step
        (0.05, (1.0, 0.01), 0.5, 20, 0.68, 0.37),  # SNOO's, inner momentum over-damped along 0.01
        (0.0198, (1.0, 100.0), 0.0, 20, 0.68, 0.37),  # GD inside
    ],
)
def test_measured_snoo_rate_is_spectral_radius_of_cycle(gamma, eigenvalues, beta, k, eta, mu):
    measured = qd.measured_snoo_rate(gamma, eigenvalues, beta, k, eta, mu)
    theory = qd.snoo_rate(gamma, eigenvalues, beta, k, eta, mu)
    np.testing.assert_allclose(1 - measured, 1 - theory, rtol=0.01)  # 1 - rate: the step count
    # The outer momentum matters here: Lookahead with alpha = eta is told apart.
    lookahead = qd.lookahead_rate(gamma, eigenvalues, beta, k, eta)
    assert abs((1 - theory) / (1 - lookahead) - 1) > 0.1


def test_lyapunov_covariance_is_the_recursions_fixed_point():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    for k, eta, mu in [(5, 0.7, 0.9), (10, 0.68, 0.37), (5, 1.5, 0.5)]:
        closed = qd.snoo_covariance(GAMMA, A, SIGMA2, k, eta, mu)
        matrix, noise, scale = qd.snoo_noise_map(GAMMA, A, k, eta, mu)
        for i in range(len(A)):
            source = scale[i] * qd.sgd_variance(GAMMA, A[i], SIGMA2[i]) * np.outer(noise, noise)
            reference = scipy_linalg.solve_discrete_lyapunov(matrix[i], source)
            np.testing.assert_allclose(closed[i], reference, rtol=1e-10, atol=1e-14)
        _, var = qd.snoo_moments(GAMMA, A, SIGMA2, k, eta, mu, 0.0, 20000)
        np.testing.assert_allclose(var[-1], closed[..., 0, 0], rtol=1e-10)
    # mu = 0, eta = alpha: the paper's Lookahead variance.
    np.testing.assert_allclose(
        qd.snoo_variance(GAMMA, A, SIGMA2, 10, 0.8, 0.0),
        qd.lookahead_variance(GAMMA, A, SIGMA2, 10, 0.8),
        rtol=1e-12,
    )


def _assert_within_standard_errors(run, closed_variance):
    estimate, error = qd.steady_variance(run)
    assert np.all(error < 0.05 * closed_variance), (error, closed_variance)  # the test has power
    np.testing.assert_array_less(np.abs(estimate - closed_variance), Z * error)
    loss, loss_error = qd.steady_excess_loss(run, A)
    assert abs(loss - 0.5 * np.sum(A * closed_variance)) < Z * loss_error


@pytest.mark.slow  # Monte Carlo: 1024 chains x 4000 steps, about 5 s
def test_snoo_steady_variance_matches_monte_carlo():
    k, eta, mu = 5, 0.7, 0.9
    run = qd.snoo_steady_state_run(GAMMA, k, eta, mu, steps=STEPS, chains=CHAINS, seed=7)
    closed = qd.snoo_variance(GAMMA, A, SIGMA2, k, eta, mu)
    _assert_within_standard_errors(run, closed)
    # ...and tells SNOO from Lookahead with alpha = eta (no outer momentum).
    estimate, error = qd.steady_variance(run)
    assert np.all(estimate - Z * error > qd.lookahead_variance(GAMMA, A, SIGMA2, k, eta))


@pytest.mark.slow  # Monte Carlo, twice
def test_snoo_without_momentum_is_lookahead():
    k, alpha = 5, 0.5
    burn_in = qd.burn_in_steps(GAMMA, k, alpha)
    kwargs = dict(steps=STEPS, burn_in=burn_in, chains=CHAINS, seed=8)
    snoo = qd.simulate_snoo(GAMMA, k, alpha, 0.0, **kwargs)
    _assert_within_standard_errors(snoo, qd.lookahead_variance(GAMMA, A, SIGMA2, k, alpha))
    # Same noise: outer=optax.sgd(alpha) is alpha=alpha, so the chains agree to rounding.
    lookahead = qd.simulate_lookahead(GAMMA, k, alpha, **kwargs)
    np.testing.assert_allclose(snoo.chain_second_moment, lookahead.chain_second_moment, rtol=1e-5)

"""The paper's quadratic analyses, reproduced with the library.

Two models from Zhang et al. (2019), each with its closed form and a simulation
that drives ``lookahead_optax.lookahead`` (and plain optax) through it:

* Noisy quadratic model: L(x) = 1/2 (x - c)^T A (x - c) with c ~ N(0, Sigma)
  drawn fresh every step, A = diag(a), Sigma = diag(sigma2). Closed-form
  steady-state variance of SGD and of Lookahead's slow weights, the mean and
  variance recursions, and a Monte Carlo over thousands of chains (``jax.vmap``
  over chains, ``lax.scan`` over steps).
* Deterministic quadratic with classical momentum inside: the cycle's linear
  map T on (x, v), its spectral radius, and the contraction rate measured from
  the library's trajectories.

And the same two models with an outer Nesterov step, SNOO (Kallusky et al.
2025), ``lo.lookahead(inner, k, outer=optax.sgd(eta, momentum=mu, nesterov=True))``:
the cycle's linear map on (x, v, b) with the outer momentum buffer b, its
spectral radius against the library's trajectories, and the steady-state
covariance of (slow weights, b) from a discrete Lyapunov equation against the
library's Monte Carlo (``python benchmarks/quadratic.py --outer``).

Used by notebooks/quadratic.ipynb, tests/test_quadratic.py and (SNOO)
tests/test_quadratic_outer.py. Run ``python benchmarks/quadratic.py`` to print
the tables of README "Results"; ``--outer`` adds the SNOO tables (about 3.5
minutes on 2 cores), ``--only-outer`` prints only those.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lookahead_optax as lo

# The noisy-quadratic setting: stiff to flat curvatures, gradient noise per coordinate.
PAPER_A = np.array([1.0, 0.1, 0.01])
PAPER_SIGMA2 = np.array([1.0, 0.5, 2.0])
PAPER_GAMMA = 0.5

# ---------------------------------------------------------------------------
# Noisy quadratic model: closed forms (per coordinate, numpy float64).
# ---------------------------------------------------------------------------


def sgd_variance(gamma, a, sigma2):
    """Steady-state variance of SGD's iterates, gamma^2 a^2 sigma^2 / (1 - q^2), q = 1 - gamma a."""
    a, sigma2 = np.asarray(a, float), np.asarray(sigma2, float)
    q = 1.0 - gamma * a
    return gamma**2 * a**2 * sigma2 / (1.0 - q**2)


def lookahead_variance(gamma, a, sigma2, k, alpha):
    """Steady-state variance of Lookahead(SGD)'s slow weights (the paper's form).

    V_LA = alpha^2 (1 - q^2k) / (alpha^2 (1 - q^2k) + 2 alpha (1 - alpha)(1 - q^k)) V_SGD,
    the fixed point of the per-cycle recursion in :func:`lookahead_moments`.

    >>> float(lookahead_variance(0.5, 1.0, 1.0, k=5, alpha=1.0) / sgd_variance(0.5, 1.0, 1.0))
    1.0
    """
    a = np.asarray(a, float)
    q = 1.0 - gamma * a
    shrink = alpha**2 * (1 - q ** (2 * k))
    return shrink / (shrink + 2 * alpha * (1 - alpha) * (1 - q**k)) * sgd_variance(gamma, a, sigma2)


def sgd_moments(gamma, a, sigma2, x0, steps):
    """Mean and variance of SGD's iterate after 0, 1, ..., steps steps, shape (steps + 1, d).

    x_{t+1} = q x_t + gamma a c_t, so m_{t+1} = q m_t and V_{t+1} = q^2 V_t + gamma^2 a^2 sigma^2.
    """
    a, sigma2 = np.asarray(a, float), np.asarray(sigma2, float)
    q = 1.0 - gamma * a
    mean = [np.asarray(x0, float) * np.ones_like(a)]
    var = [np.zeros_like(a)]
    for _ in range(steps):
        mean.append(q * mean[-1])
        var.append(q**2 * var[-1] + gamma**2 * a**2 * sigma2)
    return np.array(mean), np.array(var)


def lookahead_moments(gamma, a, sigma2, k, alpha, x0, cycles):
    """Mean and variance of the slow weights after 0, 1, ..., cycles syncs, shape (cycles + 1, d).

    A cycle of k SGD steps from phi gives q^k phi plus noise of variance
    (1 - q^2k) V_SGD, so phi' = (1 - alpha + alpha q^k) phi + alpha noise:
    m' = (1 - alpha + alpha q^k) m and V' = (1 - alpha + alpha q^k)^2 V + alpha^2 (1 - q^2k) V_SGD.
    """
    a = np.asarray(a, float)
    q = 1.0 - gamma * a
    contraction = 1 - alpha + alpha * q**k
    cycle_noise = alpha**2 * (1 - q ** (2 * k)) * sgd_variance(gamma, a, sigma2)
    mean = [np.asarray(x0, float) * np.ones_like(a)]
    var = [np.zeros_like(a)]
    for _ in range(cycles):
        mean.append(contraction * mean[-1])
        var.append(contraction**2 * var[-1] + cycle_noise)
    return np.array(mean), np.array(var)


def expected_loss(a, sigma2, mean, var):
    """E[L] = 1/2 sum_i a_i (m_i^2 + V_i + sigma_i^2), over the last axis."""
    a, sigma2 = np.asarray(a, float), np.asarray(sigma2, float)
    return 0.5 * np.sum(a * (np.asarray(mean) ** 2 + np.asarray(var) + sigma2), axis=-1)


def snoo_noise_map(gamma, a, k, eta, mu):
    """One SNOO(SGD) cycle on (phi, b) per coordinate: (phi', b') = F (phi, b) + g n.

    k SGD steps from phi give theta_k = q^k phi + n, n ~ N(0, (1 - q^2k) V_SGD)
    independent of (phi, b); with h = 1 - q^k, Delta = phi - theta_k = h phi - n,
    b' = mu b + Delta and phi' = phi - eta (Delta + mu b'):

        F = [[1 - eta (1 + mu) h, -eta mu^2], [h, mu]],   g = (eta (1 + mu), -1).

    Returns F, shape (*a.shape, 2, 2), g, shape (2,), and the variance of n, shape a.shape.
    """
    a = np.asarray(a, float)
    q = 1.0 - gamma * a
    matrix = snoo_gd_cycle_matrix(gamma, a, k, eta, mu)
    noise = np.array([eta * (1 + mu), -1.0])
    return matrix, noise, 1 - q ** (2 * k)


def snoo_covariance(gamma, a, sigma2, k, eta, mu):
    """Steady-state covariance of (phi, b) under SNOO(SGD), shape (*a.shape, 2, 2).

    The solution of the discrete Lyapunov equation P = F P F^T + Var(n) g g^T
    (:func:`snoo_noise_map`), by one linear solve (I - F (x) F) vec P = vec Q
    per coordinate. With mu = 0 and eta = alpha its [0, 0] entry is
    :func:`lookahead_variance`.

    >>> snoo = snoo_covariance(0.5, [1.0, 0.01], [1.0, 2.0], 5, eta=0.5, mu=0.0)[..., 0, 0]
    >>> np.allclose(snoo, lookahead_variance(0.5, [1.0, 0.01], [1.0, 2.0], 5, 0.5), rtol=1e-12)
    True
    """
    matrix, noise, noise_scale = snoo_noise_map(gamma, a, k, eta, mu)
    a, sigma2 = np.asarray(a, float), np.asarray(sigma2, float)
    q_cov = (noise_scale * sgd_variance(gamma, a, sigma2))[..., None, None] * np.outer(noise, noise)
    kron = np.einsum("...ij,...kl->...ikjl", matrix, matrix).reshape(matrix.shape[:-2] + (4, 4))
    vec = np.linalg.solve(np.eye(4) - kron, q_cov.reshape(q_cov.shape[:-2] + (4, 1)))
    return vec.reshape(q_cov.shape)


def snoo_variance(gamma, a, sigma2, k, eta, mu):
    """Steady-state variance of SNOO(SGD)'s slow weights, per coordinate: P[0, 0]."""
    return snoo_covariance(gamma, a, sigma2, k, eta, mu)[..., 0, 0]


def snoo_moments(gamma, a, sigma2, k, eta, mu, x0, cycles):
    """Mean and variance of SNOO(SGD)'s slow weights after 0, 1, ..., cycles syncs, (cycles + 1, d).

    The recursion (m, P) <- (F m, F P F^T + Var(n) g g^T) on (phi, b) from
    (x0, 0) with zero covariance; its fixed point is :func:`snoo_covariance`.
    """
    matrix, noise, noise_scale = snoo_noise_map(gamma, a, k, eta, mu)
    a, sigma2 = np.asarray(a, float), np.asarray(sigma2, float)
    q_cov = (noise_scale * sgd_variance(gamma, a, sigma2))[..., None, None] * np.outer(noise, noise)
    moment = np.zeros(a.shape + (2,))
    moment[..., 0] = x0
    cov = np.zeros(a.shape + (2, 2))
    mean, var = [moment[..., 0]], [cov[..., 0, 0]]
    for _ in range(cycles):
        moment = np.einsum("...ij,...j->...i", matrix, moment)
        cov = matrix @ cov @ np.swapaxes(matrix, -1, -2) + q_cov
        mean.append(moment[..., 0])
        var.append(cov[..., 0, 0])
    return np.array(mean), np.array(var)


# ---------------------------------------------------------------------------
# Noisy quadratic model: Monte Carlo with the library.
# ---------------------------------------------------------------------------


class NoisyRun(NamedTuple):
    """Monte Carlo of the noisy quadratic, sampled at the syncs (Lookahead) or every period (SGD).

    Attributes:
      steps: Step index of each sample, shape (n_samples,).
      mean: Mean over chains of the evaluated weights, shape (n_samples, d).
      second_moment: Mean over chains of their square, shape (n_samples, d).
      chain_second_moment: Per chain, the time average of the squared weights
        over the samples after burn-in, shape (chains, d). The chains are
        independent, so their spread gives an honest standard error even though
        successive samples of one chain are correlated.
    """

    steps: np.ndarray
    mean: np.ndarray
    second_moment: np.ndarray
    chain_second_moment: np.ndarray


def steady_variance(run: NoisyRun) -> tuple[np.ndarray, np.ndarray]:
    """Steady-state variance estimate and its standard error, per coordinate.

    Valid for runs started at x0 = 0: c has mean 0, so every iterate has mean 0
    exactly and E[x^2] is the variance.
    """
    per_chain = run.chain_second_moment
    return per_chain.mean(0), per_chain.std(0, ddof=1) / np.sqrt(per_chain.shape[0])


def _noisy_scan(tx, evaluate, key, a, sigma2, x0, period, burn_in, *, steps, chains):
    """The Monte Carlo body shared by :func:`_simulate` and :func:`_simulate_snoo`."""
    sigma = jnp.sqrt(sigma2)
    params = jnp.broadcast_to(x0, (chains, a.shape[0]))
    state = jax.vmap(tx.init)(params)
    update = jax.vmap(tx.update)

    def step(carry, inputs):
        step_index, step_key = inputs  # the step just taken is step_index (1-based)
        params, state, chain_sum, chain_count = carry
        centre = sigma * jax.random.normal(step_key, params.shape)
        grads = a * (params - centre)  # gradient of 1/2 (x - c)^T A (x - c)
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
        weights = jax.vmap(evaluate)(state, params)
        keep = (step_index % period == 0) & (step_index > burn_in)
        chain_sum = chain_sum + jnp.where(keep, weights**2, 0.0)
        chain_count = chain_count + keep
        carry = (params, state, chain_sum, chain_count)
        return carry, (weights.mean(0), (weights**2).mean(0))

    inputs = (jnp.arange(1, steps + 1), jax.random.split(key, steps))
    init = (params, state, jnp.zeros_like(params), jnp.zeros([], jnp.int32))
    (_, _, chain_sum, chain_count), (mean, second_moment) = jax.lax.scan(step, init, inputs)
    return mean, second_moment, chain_sum / chain_count


@functools.partial(jax.jit, static_argnames=("use_lookahead", "steps", "chains"))
def _simulate(key, a, sigma2, x0, gamma, alpha, period, burn_in, *, use_lookahead, steps, chains):
    # Everything but the optimizer kind and the array sizes is traced (k too), so
    # a sweep over gamma, k, alpha and the burn-in compiles once.
    if use_lookahead:
        tx, evaluate = lo.lookahead(optax.sgd(gamma), k=period, alpha=alpha), lo.slow_params
    else:
        tx, evaluate = optax.sgd(gamma), lambda state, params: params
    return _noisy_scan(tx, evaluate, key, a, sigma2, x0, period, burn_in, steps=steps,
                       chains=chains)  # fmt: skip


@functools.partial(jax.jit, static_argnames=("steps", "chains"))
def _simulate_snoo(key, a, sigma2, x0, gamma, eta, mu, period, burn_in, *, steps, chains):
    # SNOO(SGD): the slow step is optax's Nesterov SGD on Delta = phi - theta_k.
    outer = optax.sgd(eta, momentum=mu, nesterov=True)
    tx = lo.lookahead(optax.sgd(gamma), k=period, outer=outer)
    return _noisy_scan(tx, lo.slow_params, key, a, sigma2, x0, period, burn_in, steps=steps,
                       chains=chains)  # fmt: skip


def _check_samples(period, steps, burn_in):
    if steps // period - burn_in // period < 2:
        raise ValueError(f"steps must leave samples after the burn-in of {burn_in}, got {steps}")


def _noisy_run(arrays, period, steps) -> NoisyRun:
    mean, second_moment, chain_second_moment = (np.asarray(x, float) for x in arrays)
    sampled = np.arange(period, steps + 1, period)
    return NoisyRun(sampled, mean[sampled - 1], second_moment[sampled - 1], chain_second_moment)


def _run(use_lookahead, gamma, alpha, period, *, a, sigma2, x0, steps, burn_in, chains, seed):
    _check_samples(period, steps, burn_in)
    f32 = functools.partial(np.asarray, dtype=np.float32)
    arrays = _simulate(
        jax.random.key(seed), f32(a), f32(sigma2), f32(x0), gamma, alpha, period, burn_in,
        use_lookahead=use_lookahead, steps=steps, chains=chains,
    )  # fmt: skip
    return _noisy_run(arrays, period, steps)


def simulate_lookahead(
    gamma, k, alpha, *, a=PAPER_A, sigma2=PAPER_SIGMA2, x0=0.0, steps=5000, burn_in=2500,
    chains=1024, seed=0,
) -> NoisyRun:  # fmt: skip
    """Runs ``lo.lookahead(optax.sgd(gamma), k, alpha)`` on many noisy-quadratic chains.

    The slow weights (``lo.slow_params``) are sampled at every sync, after steps
    k, 2k, ...; those up to step ``burn_in`` are left out of ``chain_second_moment``.

    >>> run = simulate_lookahead(0.5, 5, 0.5, a=[1.0], sigma2=[1.0], steps=200, burn_in=50,
    ...                          chains=256)
    >>> run.mean.shape, run.chain_second_moment.shape, run.steps[:2].tolist()
    ((40, 1), (256, 1), [5, 10])
    """
    return _run(True, gamma, alpha, k, a=a, sigma2=sigma2, x0=x0, steps=steps, burn_in=burn_in,
                chains=chains, seed=seed)  # fmt: skip


def simulate_sgd(
    gamma, *, a=PAPER_A, sigma2=PAPER_SIGMA2, x0=0.0, steps=5000, burn_in=2500, period=1,
    chains=1024, seed=0,
) -> NoisyRun:  # fmt: skip
    """Runs ``optax.sgd(gamma)`` on many noisy-quadratic chains, sampled every ``period`` steps.

    With the same seed, the chains see the same noise as :func:`simulate_lookahead`'s.

    >>> run = simulate_sgd(0.5, a=[1.0], sigma2=[1.0], steps=30, burn_in=10, chains=128)
    >>> run.second_moment.shape
    (30, 1)
    """
    return _run(False, gamma, 1.0, period, a=a, sigma2=sigma2, x0=x0, steps=steps,
                burn_in=burn_in, chains=chains, seed=seed)  # fmt: skip


def simulate_snoo(
    gamma, k, eta, mu, *, a=PAPER_A, sigma2=PAPER_SIGMA2, x0=0.0, steps=5000, burn_in=2500,
    chains=1024, seed=0,
) -> NoisyRun:  # fmt: skip
    """Runs SNOO(SGD), ``lo.lookahead(optax.sgd(gamma), k, outer=optax.sgd(eta, momentum=mu,
    nesterov=True))``, on many noisy-quadratic chains, the slow weights sampled at every sync.

    With the same seed, the chains see the same noise as :func:`simulate_lookahead`'s.

    >>> run = simulate_snoo(0.5, 5, 0.7, 0.9, a=[1.0], sigma2=[1.0], steps=100, burn_in=50,
    ...                     chains=64)
    >>> run.mean.shape, run.steps[:2].tolist()
    ((20, 1), [5, 10])
    """
    _check_samples(k, steps, burn_in)
    f32 = functools.partial(np.asarray, dtype=np.float32)
    arrays = _simulate_snoo(
        jax.random.key(seed), f32(a), f32(sigma2), f32(x0), gamma, eta, mu, k, burn_in,
        steps=steps, chains=chains,
    )  # fmt: skip
    return _noisy_run(arrays, k, steps)


def steady_excess_loss(run: NoisyRun, a=PAPER_A) -> tuple[float, float]:
    """Steady-state excess loss 1/2 sum_i a_i E[x_i^2] and its standard error, for runs from 0.

    The expected loss is this plus 1/2 sum_i a_i sigma_i^2 (:func:`expected_loss`).
    From the per-chain time averages: the chains are independent.
    """
    per_chain = 0.5 * np.sum(np.asarray(a, float) * run.chain_second_moment, axis=-1)
    return float(per_chain.mean()), float(per_chain.std(ddof=1) / np.sqrt(per_chain.shape[0]))


# ---------------------------------------------------------------------------
# Deterministic quadratic: closed forms (vectorised over gamma).
# ---------------------------------------------------------------------------


def gd_lookahead_factor(gamma, a, k, alpha):
    """Per-cycle contraction of Lookahead(GD) along curvature a: 1 - alpha + alpha q^k."""
    return 1 - alpha + alpha * (1 - gamma * np.asarray(a, float)) ** k


def momentum_matrix(gamma, a, beta):
    """One step of ``optax.sgd(gamma, momentum=beta)`` along curvature a, on the state (x, v).

    optax's trace: v' = g + beta v with g = a x, then x' = x - gamma v'.
    Broadcasts over an array ``gamma``: shape (*gamma.shape, 2, 2).
    """
    gamma = np.asarray(gamma, float)
    matrix = np.empty(gamma.shape + (2, 2))
    matrix[..., 0, 0] = 1 - gamma * a
    matrix[..., 0, 1] = -gamma * beta
    matrix[..., 1, 0] = a
    matrix[..., 1, 1] = beta
    return matrix


def lookahead_cycle_matrix(gamma, a, beta, k, alpha, inner_state="keep"):
    """The linear map T of one Lookahead cycle on (phi, v), momentum inside.

    k momentum steps from (phi, v) give (x_k, v_k) = M^k (phi, v); the slow step
    sets phi' = (1 - alpha) phi + alpha x_k and the fast weights restart at phi'.
    With ``inner_state="keep"`` the momentum carries on (v' = v_k); with
    ``"reset"`` it restarts at 0; with ``"pullback"`` it is interpolated like the
    weights, v' = (1 - alpha) v + alpha v_k.
    """
    cycle = np.linalg.matrix_power(momentum_matrix(gamma, a, beta), k)
    keep_v = {"keep": 1.0, "reset": 0.0, "pullback": alpha}[inner_state]
    restart_v = 1 - alpha if inner_state == "pullback" else 0.0
    return np.diag([alpha, keep_v]) @ cycle + np.diag([1 - alpha, restart_v])


def spectral_radius(matrix):
    """Largest eigenvalue modulus of 2x2 matrices (over the last two axes), in closed form."""
    matrix = np.asarray(matrix, float)
    trace = matrix[..., 0, 0] + matrix[..., 1, 1]
    det = matrix[..., 0, 0] * matrix[..., 1, 1] - matrix[..., 0, 1] * matrix[..., 1, 0]
    root = np.sqrt((trace**2 - 4 * det).astype(complex))
    return np.maximum(np.abs(trace + root), np.abs(trace - root)) / 2


def momentum_rate(gamma, eigenvalues, beta):
    """Asymptotic per-step contraction of heavy-ball momentum: max over directions of rho(M)."""
    return np.max([spectral_radius(momentum_matrix(gamma, a, beta)) for a in eigenvalues], axis=0)


def lookahead_rate(gamma, eigenvalues, beta, k, alpha):
    """Asymptotic per-step contraction of Lookahead(momentum): max over a of rho(T)^(1/k)."""
    radii = [spectral_radius(lookahead_cycle_matrix(gamma, a, beta, k, alpha)) for a in eigenvalues]
    return np.max(radii, axis=0) ** (1 / k)


def is_underdamped(gamma, a, beta) -> bool:
    """Momentum oscillates along a (complex eigenvalues of M): (1 - sqrt(gamma a))^2 < beta."""
    return bool((1 - np.sqrt(gamma * a)) ** 2 < beta)


def snoo_cycle_matrix(gamma, a, beta, k, eta, mu, inner_state="keep"):
    """The linear map of one SNOO cycle on (phi, v, b): heavy ball inside, Nesterov outside.

    k momentum steps give (x_k, v_k) = M^k (phi, v) =: [[m00, m01], [m10, m11]] (phi, v);
    Delta = phi - x_k; b' = mu b + Delta; phi' = phi - eta (Delta + mu b')
    (``optax.sgd(eta, momentum=mu, nesterov=True)``); v' = v_k (``"keep"``) or 0
    (``"reset"``). With c = eta (1 + mu):

        [[1 - c (1 - m00),  c m01,  -eta mu^2],
         [m10,              m11,     0       ],
         [1 - m00,         -m01,     mu      ]]

    mu = 0, eta = alpha is :func:`lookahead_cycle_matrix` with b decoupled (its
    rows and columns 0 and 1). Broadcasts over ``gamma``: shape (*gamma.shape, 3, 3).
    """
    cycle = np.linalg.matrix_power(momentum_matrix(gamma, a, beta), k)
    m00, m01, m10, m11 = cycle[..., 0, 0], cycle[..., 0, 1], cycle[..., 1, 0], cycle[..., 1, 1]
    keep_v = {"keep": 1.0, "reset": 0.0}[inner_state]
    step = eta * (1 + mu)
    matrix = np.zeros(cycle.shape[:-2] + (3, 3))
    matrix[..., 0, 0] = 1 - step * (1 - m00)
    matrix[..., 0, 1] = step * m01
    matrix[..., 0, 2] = -eta * mu**2
    matrix[..., 1, 0] = keep_v * m10
    matrix[..., 1, 1] = keep_v * m11
    matrix[..., 2, 0] = 1 - m00
    matrix[..., 2, 1] = -m01
    matrix[..., 2, 2] = mu
    return matrix


def snoo_gd_cycle_matrix(gamma, a, k, eta, mu):
    """One SNOO cycle with gradient descent inside, on (phi, b): h = 1 - (1 - gamma a)^k,

        [[1 - eta (1 + mu) h, -eta mu^2], [h, mu]],

    Nesterov's map on a quadratic of curvature h: eigenvalues solve
    lambda^2 - (1 + mu)(1 - eta h) lambda + mu (1 - eta h) = 0. Shape (*gamma.shape, 2, 2).
    """
    h = 1 - (1 - np.asarray(gamma, float) * np.asarray(a, float)) ** k
    matrix = np.empty(h.shape + (2, 2))
    matrix[..., 0, 0] = 1 - eta * (1 + mu) * h
    matrix[..., 0, 1] = -eta * mu**2
    matrix[..., 1, 0] = h
    matrix[..., 1, 1] = mu
    return matrix


def spectral_radius_eig(matrix):
    """Largest eigenvalue modulus of square matrices of any size (over the last two axes)."""
    return np.max(np.abs(np.linalg.eigvals(np.asarray(matrix, float))), axis=-1)


def snoo_rate(gamma, eigenvalues, beta, k, eta, mu, inner_state="keep"):
    """Per-step contraction of SNOO(momentum): max over a of rho(snoo_cycle_matrix)^(1/k)."""
    radii = [
        spectral_radius_eig(snoo_cycle_matrix(gamma, a, beta, k, eta, mu, inner_state))
        for a in eigenvalues
    ]
    return np.max(radii, axis=0) ** (1 / k)


def snoo_gd_rate(gamma, eigenvalues, k, eta, mu):
    """Per-step contraction of SNOO(GD): max over a of rho(snoo_gd_cycle_matrix)^(1/k)."""
    radii = [spectral_radius(snoo_gd_cycle_matrix(gamma, a, k, eta, mu)) for a in eigenvalues]
    return np.max(radii, axis=0) ** (1 / k)


def lookahead_gd_rate(gamma, eigenvalues, k, alpha):
    """Per-step contraction of Lookahead(GD): max over a of |1 - alpha + alpha q^k|^(1/k)."""
    factors = [np.abs(gd_lookahead_factor(gamma, a, k, alpha)) for a in eigenvalues]
    return np.max(factors, axis=0) ** (1 / k)


def gd_rate(gamma, eigenvalues):
    """Per-step contraction of gradient descent: max over a of |1 - gamma a|."""
    return np.max([np.abs(1 - np.asarray(gamma, float) * a) for a in eigenvalues], axis=0)


def tuned_heavy_ball_rate(kappa) -> float:
    """Heavy ball with its optimal (gamma, beta) on curvatures in [1, kappa].

    The rate is (sqrt(kappa) - 1) / (sqrt(kappa) + 1) (Polyak).
    """
    return float((np.sqrt(kappa) - 1) / (np.sqrt(kappa) + 1))


def best_learning_rate(rate: Callable, gamma_max: float, points=100000) -> tuple[float, float]:
    """Minimises the vectorised ``rate(gammas)`` over (0, gamma_max).

    Lookahead's rate has narrow resonance dips in gamma (where k steps of the
    momentum's oscillation line up with the slow step), so: a log grid and a
    linear grid of ``points`` each, then three zooms around each of the 20 best
    grid points.

    >>> gamma, rate = best_learning_rate(lambda g: np.abs(1 - g * 2.0), gamma_max=1.0)
    >>> round(gamma, 6), round(rate, 6)
    (0.5, 0.0)
    """
    grid = np.unique(np.concatenate([
        np.geomspace(1e-6 * gamma_max, gamma_max, points, endpoint=False),
        np.linspace(0.0, gamma_max, points, endpoint=False)[1:],
    ]))  # fmt: skip
    rates = rate(grid)
    best_gamma, best_rate = np.nan, np.inf
    for index in np.argsort(rates)[:20]:
        low, high = grid[max(index - 1, 0)], grid[min(index + 1, len(grid) - 1)]
        for _ in range(3):
            fine = np.linspace(low, high, 201)
            fine_rates = rate(fine)
            best = int(np.nanargmin(fine_rates))
            low, high = fine[max(best - 1, 0)], fine[min(best + 1, 200)]
        if fine_rates[best] < best_rate:
            best_gamma, best_rate = fine[best], fine_rates[best]
    return float(best_gamma), float(best_rate)


# ---------------------------------------------------------------------------
# Deterministic quadratic: contraction measured on the library's trajectories.
# ---------------------------------------------------------------------------


def _floats(tree):
    return [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]


def _rescale(tree, factor):
    return jax.tree.map(lambda x: x * factor if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def _log_growth(tx, eigenvalues, period, periods, burn_in):
    """Mean log growth per block of ``period`` steps of ``tx`` on 1/2 sum_i a_i x_i^2.

    After every block, params and optimizer state are rescaled together to unit
    norm: the dynamics are linear, so this changes nothing but keeps float32
    away from underflow. The mean over blocks telescopes to the log of the total
    contraction, so it converges to log rho with an O(1/periods) error.
    """
    curvature = jnp.asarray(eigenvalues, jnp.float32)

    def norm(tree):
        return jnp.sqrt(sum(jnp.sum(x.astype(jnp.float32) ** 2) for x in _floats(tree)))

    def step(carry, _):
        params, state = carry
        updates, state = tx.update(curvature * params, state, params)
        return (optax.apply_updates(params, updates), state), None

    def block(carry, _):
        carry, _ = jax.lax.scan(step, carry, length=period)
        growth = norm(carry)
        return _rescale(carry, 1.0 / growth), jnp.log(growth)

    params = jnp.ones_like(curvature)
    carry = (params, tx.init(params))
    carry = _rescale(carry, 1.0 / norm(carry))
    _, log_growth = jax.lax.scan(block, carry, length=burn_in + periods)
    return jnp.mean(log_growth[burn_in:])


_RATE_STATIC = ("k", "periods", "burn_in")


@functools.partial(jax.jit, static_argnames=_RATE_STATIC)
def _momentum_log_growth(eigenvalues, gamma, beta, *, k, periods, burn_in):
    return _log_growth(optax.sgd(gamma, momentum=beta), eigenvalues, k, periods, burn_in)


@functools.partial(jax.jit, static_argnames=_RATE_STATIC)
def _lookahead_log_growth(eigenvalues, gamma, beta, alpha, *, k, periods, burn_in):
    tx = lo.lookahead(optax.sgd(gamma, momentum=beta), k=k, alpha=alpha)
    return _log_growth(tx, eigenvalues, k, periods, burn_in)


def measured_momentum_rate(gamma, eigenvalues, beta, *, k=20, periods=1000, burn_in=100):
    """Per-step contraction of ``optax.sgd(gamma, momentum=beta)`` measured on its trajectory.

    Starts at x = 1 on L(x) = 1/2 sum_i a_i x_i^2 and measures over blocks of k steps.
    """
    eigenvalues = np.asarray(eigenvalues, np.float32)
    log_growth = _momentum_log_growth(
        eigenvalues, gamma, beta, k=k, periods=periods, burn_in=burn_in
    )
    return float(np.exp(float(log_growth) / k))


def measured_lookahead_rate(
    gamma, eigenvalues, beta, k, alpha, *, periods=1000, burn_in=100
) -> float:
    """Per-step contraction of ``lo.lookahead(optax.sgd(gamma, momentum=beta), k, alpha)``.

    Measured on the library's trajectory from x = 1, over whole cycles (every
    block ends at a sync, where params equal the slow weights), to the power 1/k.
    """
    eigenvalues = np.asarray(eigenvalues, np.float32)
    log_growth = _lookahead_log_growth(
        eigenvalues, gamma, beta, alpha, k=k, periods=periods, burn_in=burn_in
    )
    return float(np.exp(float(log_growth) / k))


@functools.partial(jax.jit, static_argnames=_RATE_STATIC + ("inner_state",))
def _snoo_log_growth(eigenvalues, gamma, beta, eta, mu, *, k, periods, burn_in, inner_state):
    outer = optax.sgd(eta, momentum=mu, nesterov=True)
    tx = lo.lookahead(optax.sgd(gamma, momentum=beta), k=k, outer=outer, inner_state=inner_state)
    return _log_growth(tx, eigenvalues, k, periods, burn_in)


def measured_snoo_rate(
    gamma, eigenvalues, beta, k, eta, mu, *, inner_state="keep", periods=1000, burn_in=100
) -> float:
    """Per-step contraction of ``lo.lookahead(optax.sgd(gamma, momentum=beta), k,
    outer=optax.sgd(eta, momentum=mu, nesterov=True))``, measured like
    :func:`measured_lookahead_rate`: the norm covers params, inner momentum,
    slow weights and the outer momentum buffer. ``beta=0`` is GD inside.
    """
    eigenvalues = np.asarray(eigenvalues, np.float32)
    log_growth = _snoo_log_growth(
        eigenvalues, gamma, beta, eta, mu, k=k, periods=periods, burn_in=burn_in,
        inner_state=inner_state,
    )  # fmt: skip
    return float(np.exp(float(log_growth) / k))


def momentum_table(
    kappas=(1, 10, 100, 1000, 10000), beta=0.9, k=20, alpha=0.5, periods=1000
) -> list[dict]:
    """Per-step rates with eigenvalues {1, kappa}, each method at its own best learning rate.

    Theory (rho(M), rho(T)^(1/k)) next to the rate measured on the library's
    trajectories with ``optax.sgd(gamma, momentum=beta)`` and
    ``lo.lookahead(optax.sgd(gamma, momentum=beta), k, alpha)``.
    """
    rows = []
    for kappa in kappas:
        eigenvalues = (1.0, float(kappa))
        gamma_max = 2 * (1 + beta) / kappa  # heavy ball diverges beyond
        gamma_cm, rate_cm = best_learning_rate(
            lambda g: momentum_rate(g, eigenvalues, beta), gamma_max
        )
        gamma_la, rate_la = best_learning_rate(
            lambda g: lookahead_rate(g, eigenvalues, beta, k, alpha), gamma_max
        )
        rows.append(
            dict(
                kappa=kappa,
                gamma_cm=gamma_cm,
                rate_cm=rate_cm,
                measured_cm=measured_momentum_rate(gamma_cm, eigenvalues, beta, periods=periods),
                underdamped_cm=is_underdamped(gamma_cm, 1.0, beta),
                gamma_la=gamma_la,
                rate_la=rate_la,
                measured_la=measured_lookahead_rate(
                    gamma_la, eigenvalues, beta, k, alpha, periods=periods
                ),
            )
        )
    return rows


def burn_in_steps(gamma, k, alpha, a=PAPER_A, tol=1e-3) -> int:
    """Steps after which the start has faded to ``tol`` in the variance of every coordinate.

    Both moments forget the start through the per-cycle contraction of the mean,
    1 - alpha + alpha q^k (the variance through its square): the deterministic
    part of the dynamics, not the variance formula under test. SGD is k=1, alpha=1.

    >>> burn_in_steps(0.5, 1, 1.0, a=[1.0, 0.01])  # SGD: 0.995^(2t) < 1e-3
    690
    """
    contraction = np.max(gd_lookahead_factor(gamma, a, k, alpha))
    return k * int(np.ceil(np.log(tol) / (2 * np.log(contraction))))


def steady_state_run(
    gamma, k=None, alpha=None, *, steps=5000, chains=1024, seed=0, a=PAPER_A, sigma2=PAPER_SIGMA2
) -> NoisyRun:
    """Steady-state Monte Carlo from x0 = 0 over ``steps`` steps: Lookahead, or SGD when k is None.

    The burn-in is :func:`burn_in_steps`. Runs with the same ``steps`` and
    ``chains`` share one compilation, whatever gamma, k and alpha.
    """
    if k is None:
        burn_in = burn_in_steps(gamma, 1, 1.0, a)
        return simulate_sgd(gamma, a=a, sigma2=sigma2, steps=steps, burn_in=burn_in,
                            chains=chains, seed=seed)  # fmt: skip
    burn_in = burn_in_steps(gamma, k, alpha, a)
    return simulate_lookahead(gamma, k, alpha, a=a, sigma2=sigma2, steps=steps, burn_in=burn_in,
                              chains=chains, seed=seed)  # fmt: skip


def variance_table(
    configs=((5, 0.5), (10, 0.8), (20, 0.5), (5, 1.0)), steps=5000, chains=1024, seed=0
) -> list[dict]:
    """Closed-form steady-state variance against the library's Monte Carlo.

    At PAPER_A, PAPER_SIGMA2 and PAPER_GAMMA. The last row (k=None) is plain
    ``optax.sgd``. Each row draws its own noise (seed + row index), so the
    rows' Monte Carlo errors are independent.
    """
    rows = []
    for index, (k, alpha) in enumerate(list(configs) + [(None, None)]):
        run = steady_state_run(PAPER_GAMMA, k, alpha, steps=steps, chains=chains, seed=seed + index)
        estimate, error = steady_variance(run)
        if k is None:
            closed = sgd_variance(PAPER_GAMMA, PAPER_A, PAPER_SIGMA2)
        else:
            closed = lookahead_variance(PAPER_GAMMA, PAPER_A, PAPER_SIGMA2, k, alpha)
        rows.append(dict(k=k, alpha=alpha, closed=closed, monte_carlo=estimate, error=error))
    return rows


SNOO_SETTINGS = ((0.68, 0.37), (0.7, 0.9))  # (eta, mu): SNOO's and DiLoCo's
SNOO_ETAS = (0.25, 0.5, 0.7, 1.0, 1.5, 2.0)
SNOO_MUS = (0.0, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95)


def best_snoo(eigenvalues, beta, k, gamma_max, etas=SNOO_ETAS, mus=SNOO_MUS, points=5000):
    """The best (eta, mu) on a grid, each at its best learning rate: (eta, mu, gamma, rate).

    The grid search uses ``points`` learning rates; the winner is searched again with 100000.
    """
    best = None
    for eta in etas:
        for mu in mus:
            gamma, rate = best_learning_rate(
                lambda g: _snoo_rate_any(g, eigenvalues, beta, k, eta, mu), gamma_max, points
            )
            if best is None or rate < best[3]:
                best = (eta, mu, gamma, rate)
    eta, mu = best[:2]
    gamma, rate = best_learning_rate(
        lambda g: _snoo_rate_any(g, eigenvalues, beta, k, eta, mu), gamma_max
    )
    return eta, mu, gamma, rate


def _snoo_rate_any(gamma, eigenvalues, beta, k, eta, mu):
    if beta == 0:  # GD inside: the 2x2 form, closed-form eigenvalues (faster)
        return snoo_gd_rate(gamma, eigenvalues, k, eta, mu)
    return snoo_rate(gamma, eigenvalues, beta, k, eta, mu)


def spectrum(kappa, kind="two", size=16) -> tuple[float, ...]:
    """Curvatures with condition number kappa: {1, kappa} (``"two"``) or ``size`` log-spaced."""
    if kind == "two":
        return (1.0, float(kappa))
    return tuple(float(a) for a in np.geomspace(1.0, kappa, size))


def snoo_rate_table(
    kappas=(1, 10, 100, 1000), beta=0.9, k=20, alpha=0.5, settings=SNOO_SETTINGS, periods=1000,
    grid=True, kind="two", points=100000,
) -> list[dict]:  # fmt: skip
    """Per-step rates on :func:`spectrum` (kappa, kind): heavy ball (or GD when beta = 0),
    Lookahead and SNOO with ``optax.sgd(gamma, momentum=beta)`` inside, each at its best gamma.

    Every rate comes as (gamma, theory, measured on the library's trajectory); SNOO
    at each (eta, mu) of ``settings`` and, with ``grid``, at the best (eta, mu) of
    :func:`best_snoo`. ``tuned_hb`` is heavy ball with its optimal (gamma, beta).
    """
    rows = []
    for kappa in kappas:
        eigenvalues = spectrum(kappa, kind)
        gamma_max = 2 * (1 + beta) / kappa  # the inner optimizer diverges beyond
        best = functools.partial(best_learning_rate, gamma_max=gamma_max, points=points)
        row = dict(kappa=kappa, tuned_hb=tuned_heavy_ball_rate(kappa))
        gamma, rate = best(lambda g: momentum_rate(g, eigenvalues, beta))
        measured = measured_momentum_rate(gamma, eigenvalues, beta, k=k, periods=periods)
        row["inner"] = (gamma, rate, measured)
        gamma, rate = best(lambda g: lookahead_rate(g, eigenvalues, beta, k, alpha))
        measured = measured_lookahead_rate(gamma, eigenvalues, beta, k, alpha, periods=periods)
        row["lookahead"] = (gamma, rate, measured)
        chosen = list(settings)
        if grid:
            eta, mu, _, _ = best_snoo(eigenvalues, beta, k, gamma_max)
            row["best"] = (eta, mu)
            chosen.append((eta, mu))
        for eta, mu in chosen:
            gamma, rate = best(lambda g: _snoo_rate_any(g, eigenvalues, beta, k, eta, mu))
            measured = measured_snoo_rate(gamma, eigenvalues, beta, k, eta, mu, periods=periods)
            row[("snoo", eta, mu)] = (gamma, rate, measured)
        rows.append(row)
    return rows


def snoo_burn_in_steps(gamma, k, eta, mu, a=PAPER_A, tol=1e-3) -> int:
    """Steps after which the start has faded to ``tol`` in SNOO(SGD)'s covariance.

    Like :func:`burn_in_steps`, from the spectral radius of the cycle map F
    (:func:`snoo_noise_map`), squared for the covariance, with a factor 2 of margin
    for F's non-normal transient.
    """
    radius = np.max(spectral_radius(snoo_noise_map(gamma, a, k, eta, mu)[0]))
    return 2 * k * int(np.ceil(np.log(tol) / (2 * np.log(radius))))


def snoo_steady_state_run(gamma, k, eta, mu, *, steps=5000, chains=1024, seed=0, a=PAPER_A,
                          sigma2=PAPER_SIGMA2) -> NoisyRun:  # fmt: skip
    """Steady-state Monte Carlo of SNOO(SGD) from x0 = 0, burn-in :func:`snoo_burn_in_steps`."""
    burn_in = snoo_burn_in_steps(gamma, k, eta, mu, a)
    return simulate_snoo(gamma, k, eta, mu, a=a, sigma2=sigma2, steps=steps, burn_in=burn_in,
                         chains=chains, seed=seed)  # fmt: skip


SNOO_NOISY_CONFIGS = tuple(
    (k, eta, mu) for k in (5, 10) for eta, mu in SNOO_SETTINGS + ((0.5, 0.0),)
)


def snoo_variance_table(
    lookahead_configs=((5, 0.5), (10, 0.8)), snoo_configs=SNOO_NOISY_CONFIGS, steps=5000,
    chains=1024, seed=100,
) -> list[dict]:  # fmt: skip
    """Steady state of SGD, Lookahead(SGD) and SNOO(SGD) at PAPER_A, PAPER_SIGMA2, PAPER_GAMMA.

    Per row: the closed-form variance per coordinate (SNOO: Lyapunov) and the
    library's Monte Carlo with its standard error, and the same for the excess
    loss 1/2 sum_i a_i V_i. Each row draws its own noise (seed + row index).
    """
    configs = [("sgd", None, None, None)]
    configs += [("lookahead", k, alpha, None) for k, alpha in lookahead_configs]
    configs += [("snoo", k, eta, mu) for k, eta, mu in snoo_configs]
    rows = []
    for index, (kind, k, first, mu) in enumerate(configs):
        row_seed = seed + index
        if kind == "sgd":
            run = steady_state_run(PAPER_GAMMA, steps=steps, chains=chains, seed=row_seed)
            closed = sgd_variance(PAPER_GAMMA, PAPER_A, PAPER_SIGMA2)
        elif kind == "lookahead":
            run = steady_state_run(PAPER_GAMMA, k, first, steps=steps, chains=chains, seed=row_seed)
            closed = lookahead_variance(PAPER_GAMMA, PAPER_A, PAPER_SIGMA2, k, first)
        else:
            run = snoo_steady_state_run(PAPER_GAMMA, k, first, mu, steps=steps, chains=chains,
                                        seed=row_seed)  # fmt: skip
            closed = snoo_variance(PAPER_GAMMA, PAPER_A, PAPER_SIGMA2, k, first, mu)
        estimate, error = steady_variance(run)
        loss, loss_error = steady_excess_loss(run)
        rows.append(dict(
            kind=kind, k=k, alpha_or_eta=first, mu=mu, closed=closed, monte_carlo=estimate,
            error=error, closed_loss=float(0.5 * np.sum(PAPER_A * closed)), loss=loss,
            loss_error=loss_error,
        ))  # fmt: skip
    return rows


def _print_outer_tables(chains: int, steps: int) -> None:
    print(f"Noisy quadratic with SNOO(SGD), a={PAPER_A.tolist()}, sigma2={PAPER_SIGMA2.tolist()}, "
          f"gamma={PAPER_GAMMA}, {chains} chains x {steps} steps: steady-state variance of the "
          "slow weights and excess loss 1/2 sum a V, "
          "closed form / Monte Carlo ± standard error")  # fmt: skip
    print("| optimizer | " + " | ".join(f"V, a = {a:g}" for a in PAPER_A) + " | excess loss |")
    print("|---|" + "---|" * (len(PAPER_A) + 1))
    for row in snoo_variance_table(steps=steps, chains=chains):
        if row["kind"] == "sgd":
            name = "SGD"
        elif row["kind"] == "lookahead":
            name = f"Lookahead k={row['k']}, α={row['alpha_or_eta']:g}"
        else:
            name = f"SNOO k={row['k']}, η={row['alpha_or_eta']:g}, μ={row['mu']:g}"
        cells = [
            f"{c:.4g} / {m:.4g} ± {e:.2g}"
            for c, m, e in zip(row["closed"], row["monte_carlo"], row["error"])
        ]
        cells.append(f"{row['closed_loss']:.4g} / {row['loss']:.4g} ± {row['loss_error']:.2g}")
        print(f"| {name} | " + " | ".join(cells) + " |")

    def cell(theory, measured):
        measured = f"{1 - measured:.4f}" if np.isfinite(measured) else "exact"
        return f"{1 - theory:.4f} / {measured}"

    for beta, kind, grid in ((0.9, "two", True), (0.0, "two", True), (0.9, "dense", False),
                             (0.0, "dense", False)):  # fmt: skip
        inner = "heavy ball β=0.9" if beta else "GD"
        rows = snoo_rate_table(beta=beta, kind=kind, grid=grid,
                               points=100000 if kind == "two" else 20000)  # fmt: skip
        where = "eigenvalues {1, κ}" if kind == "two" else "16 eigenvalues log-spaced in [1, κ]"
        print(
            f"\nDeterministic quadratic, {where}, {inner} inside, k=20: 1 - per-step rate, "
            "theory / measured (library), each at its best learning rate"
        )
        names = [("inner", inner), ("lookahead", "Lookahead α=0.5")]
        names += [(("snoo", eta, mu), f"SNOO η={eta:g}, μ={mu:g}") for eta, mu in SNOO_SETTINGS]
        extra = [" SNOO, best (η, μ) on the grid |"] if grid else []
        print("| κ | " + " | ".join(n for _, n in names) + " |" + "".join(extra)
              + " heavy ball, tuned β (theory) |")  # fmt: skip
        print("|---|" + "---|" * (len(names) + 1 + grid))
        for row in rows:
            cells = [cell(*row[key][1:]) for key, _ in names]
            keys = [key for key, _ in names]
            if grid:
                eta, mu = row["best"]
                keys.append(("snoo", eta, mu))
                cells.append(cell(*row[keys[-1]][1:]) + f" (η={eta:g}, μ={mu:g})")
            cells.append(f"{1 - row['tuned_hb']:.4f}")
            print(f"| {row['kappa']:g} | " + " | ".join(cells) + " |")
            row["gammas"] = [row[key][0] for key in keys]
        print("best γ per column: " + "; ".join(
            f"κ={row['kappa']:g}: " + ", ".join(f"{g:.3g}" for g in row["gammas"]) for row in rows
        ))  # fmt: skip


def _print_tables(chains: int, steps: int) -> None:
    print(f"Noisy quadratic, a={PAPER_A.tolist()}, sigma2={PAPER_SIGMA2.tolist()}, "
          f"gamma={PAPER_GAMMA}, {chains} chains x {steps} steps: steady-state variance, "
          "closed form / Monte Carlo ± standard error")  # fmt: skip
    print("| optimizer | " + " | ".join(f"a = {a:g}" for a in PAPER_A) + " |")
    print("|---|" + "---|" * len(PAPER_A))
    for row in variance_table(steps=steps, chains=chains):
        name = "SGD" if row["k"] is None else f"Lookahead k={row['k']}, alpha={row['alpha']:g}"
        cells = [
            f"{c:.4g} / {m:.4g} ± {e:.2g}"
            for c, m, e in zip(row["closed"], row["monte_carlo"], row["error"])
        ]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("\nDeterministic quadratic, eigenvalues {1, kappa}, beta=0.9, k=20, alpha=0.5: "
          "1 - per-step rate, each at its best learning rate")  # fmt: skip
    print("| kappa | momentum: best gamma | momentum: theory / measured | damping along a=1 | "
          "Lookahead: best gamma | Lookahead: theory / measured |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for row in momentum_table():
        damping = "under" if row["underdamped_cm"] else "over"
        print(
            f"| {row['kappa']:g} | {row['gamma_cm']:.3g} | "
            f"{1 - row['rate_cm']:.4f} / {1 - row['measured_cm']:.4f} | {damping} | "
            f"{row['gamma_la']:.3g} | {1 - row['rate_la']:.4f} / {1 - row['measured_la']:.4f} |"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chains", type=int, default=4096, help="Monte Carlo chains")
    parser.add_argument("--steps", type=int, default=20000, help="Monte Carlo steps per chain")
    parser.add_argument("--outer", action="store_true",
                        help="also print the SNOO tables (outer Nesterov step)")  # fmt: skip
    parser.add_argument("--only-outer", action="store_true", help="print only the SNOO tables")
    arguments = parser.parse_args()
    if not arguments.only_outer:
        _print_tables(arguments.chains, arguments.steps)
    if arguments.outer or arguments.only_outer:
        if not arguments.only_outer:
            print()
        _print_outer_tables(arguments.chains, arguments.steps)

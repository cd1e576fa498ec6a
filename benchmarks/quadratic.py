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

Used by notebooks/quadratic.ipynb and tests/test_quadratic.py. Run
``python benchmarks/quadratic.py`` to print the tables of README "Results".
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


@functools.partial(jax.jit, static_argnames=("use_lookahead", "steps", "chains"))
def _simulate(key, a, sigma2, x0, gamma, alpha, period, burn_in, *, use_lookahead, steps, chains):
    # Everything but the optimizer kind and the array sizes is traced (k too), so
    # a sweep over gamma, k, alpha and the burn-in compiles once.
    if use_lookahead:
        tx, evaluate = lo.lookahead(optax.sgd(gamma), k=period, alpha=alpha), lo.slow_params
    else:
        tx, evaluate = optax.sgd(gamma), lambda state, params: params
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


def _run(use_lookahead, gamma, alpha, period, *, a, sigma2, x0, steps, burn_in, chains, seed):
    if steps // period - burn_in // period < 2:
        raise ValueError(f"steps must leave samples after the burn-in of {burn_in}, got {steps}")
    f32 = functools.partial(np.asarray, dtype=np.float32)
    arrays = _simulate(
        jax.random.key(seed), f32(a), f32(sigma2), f32(x0), gamma, alpha, period, burn_in,
        use_lookahead=use_lookahead, steps=steps, chains=chains,
    )  # fmt: skip
    mean, second_moment, chain_second_moment = (np.asarray(x, float) for x in arrays)
    sampled = np.arange(period, steps + 1, period)
    return NoisyRun(sampled, mean[sampled - 1], second_moment[sampled - 1], chain_second_moment)


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
    arguments = parser.parse_args()
    _print_tables(arguments.chains, arguments.steps)

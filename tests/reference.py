"""The one independent reference of Lookahead (Algorithm 1) used by the tests.

Plain numpy, float64, written from the paper's pseudocode and the optimizers'
textbook formulas. It must never import lookahead_optax or optax: the tests
compare the library against it, so sharing code would hide bugs. jax appears
only in the test problem's loss, which the library side differentiates.

Params are lists of numpy arrays (the leaves of a pytree, in tree order).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

Leaves = list[np.ndarray]


def _as_f64(leaves) -> Leaves:
    return [np.array(leaf, dtype=np.float64) for leaf in leaves]


class SGD:
    """theta <- theta - lr * g."""

    def __init__(self, lr: float):
        self.lr = lr

    def init(self, params: Leaves):
        return ()

    def step(self, grads: Leaves, state, params: Leaves):
        return [-self.lr * g for g in grads], state


class Momentum:
    """Heavy ball as in optax.sgd(lr, momentum): m <- g + beta m; theta <- theta - lr m."""

    def __init__(self, lr: float, beta: float):
        self.lr, self.beta = lr, beta

    def init(self, params: Leaves):
        return [np.zeros_like(p) for p in params]

    def step(self, grads: Leaves, state, params: Leaves):
        trace = [g + self.beta * m for g, m in zip(grads, state)]
        return [-self.lr * m for m in trace], trace


class Adam:
    """Kingma & Ba (2015) with bias correction, eps outside the square root."""

    def __init__(self, lr: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8):
        self.lr, self.b1, self.b2, self.eps = lr, b1, b2, eps

    def init(self, params: Leaves):
        zeros = [np.zeros_like(p) for p in params]
        return (0, zeros, list(zeros))

    def step(self, grads: Leaves, state, params: Leaves):
        t, mu, nu = state
        t += 1
        mu = [self.b1 * m + (1 - self.b1) * g for m, g in zip(mu, grads)]
        nu = [self.b2 * v + (1 - self.b2) * g * g for v, g in zip(nu, grads)]
        updates = []
        for m, v in zip(mu, nu):
            m_hat = m / (1 - self.b1**t)
            v_hat = v / (1 - self.b2**t)
            updates.append(-self.lr * m_hat / (np.sqrt(v_hat) + self.eps))
        return updates, (t, mu, nu)


def lookahead_trajectory(
    params0,
    grad_fn: Callable[[Leaves], Leaves],
    inner,
    k: int,
    alpha: float,
    num_steps: int,
) -> tuple[list[Leaves], list[Leaves]]:
    """Runs Algorithm 1 for ``num_steps`` inner steps (need not be a multiple of k).

    Returns ``(fast, slow)``: for every inner step t = 1..num_steps, the fast
    weights (what the params are after the step) and the slow weights phi.
    The inner state is kept across syncs.
    """
    slow = _as_f64(params0)  # phi_0 = theta_0
    inner_state = inner.init(slow)
    fast_history, slow_history = [], []
    step = 0
    while step < num_steps:
        fast = [s.copy() for s in slow]  # theta_{t,0} <- phi_{t-1}
        for i in range(1, k + 1):
            grads = grad_fn(fast)
            updates, inner_state = inner.step(grads, inner_state, fast)
            fast = [p + u for p, u in zip(fast, updates)]
            step += 1
            if i == k:  # phi_t <- phi_{t-1} + alpha (theta_{t,k} - phi_{t-1})
                slow = [s + alpha * (f - s) for s, f in zip(slow, fast)]
                fast = [s.copy() for s in slow]
            fast_history.append([f.copy() for f in fast])
            slow_history.append([s.copy() for s in slow])
            if step == num_steps:
                break
    return fast_history, slow_history


def inner_trajectory(params0, grad_fn, inner, num_steps: int) -> list[Leaves]:
    """The inner optimizer alone: params after every step t = 1..num_steps."""
    params = _as_f64(params0)
    state = inner.init(params)
    history = []
    for _ in range(num_steps):
        updates, state = inner.step(grad_fn(params), state, params)
        params = [p + u for p, u in zip(params, updates)]
        history.append([p.copy() for p in params])
    return history


class LogisticQuadratic:
    """A deterministic test problem on a pytree with several leaves.

    Params ``{"w": (3,), "b": (), "head": {"q": (2, 2)}}``; the loss is the mean
    logistic loss of ``X @ w + b`` on fixed labels plus ``0.5 * sum(a * (q - c)**2)``.
    ``grad`` is the closed-form gradient on the leaves in tree order
    ``[b, q, w]`` (jax sorts dict keys), so it needs no autodiff.
    """

    def __init__(self, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.features = rng.normal(size=(8, 3))
        self.labels = (rng.uniform(size=8) > 0.5).astype(np.float64)
        self.curvature = np.array([[1.0, 2.0], [0.5, 3.0]])
        self.target = np.array([[1.0, -1.0], [2.0, 0.5]])
        self.params0 = {
            "w": np.array([0.3, -0.2, 0.1]),
            "b": np.array(0.05),
            "head": {"q": np.array([[0.0, 0.5], [-0.5, 1.0]])},
        }

    def leaves0(self) -> Leaves:
        p = self.params0
        return _as_f64([p["b"], p["head"]["q"], p["w"]])

    def grad(self, leaves: Leaves) -> Leaves:
        b, q, w = leaves
        logits = self.features @ w + b
        residual = 1.0 / (1.0 + np.exp(-logits)) - self.labels
        n = len(self.labels)
        return [residual.mean(), self.curvature * (q - self.target), self.features.T @ residual / n]

    def loss(self, params):
        """The same loss in jax.numpy, on a params dict of any floating dtype."""
        dtype = params["w"].dtype
        features = jnp.asarray(self.features, dtype)
        logits = features @ params["w"] + params["b"]
        labels = jnp.asarray(self.labels, dtype)
        logistic = jnp.mean(jax.nn.softplus(logits) - labels * logits)
        curvature = jnp.asarray(self.curvature, dtype)
        target = jnp.asarray(self.target, dtype)
        quadratic = 0.5 * jnp.sum(curvature * (params["head"]["q"] - target) ** 2)
        return logistic + quadratic


# --- the outer step (SNOO, DiLoCo): an optimizer on the pseudo-gradient ----------------------


class NesterovSGD:
    """torch.optim.SGD(nesterov=True, dampening=0) on a gradient d: b <- mu b + d; x -= lr (d + mu b)."""

    def __init__(self, lr: float, momentum: float):
        self.lr, self.momentum = lr, momentum

    def init(self, params: Leaves):
        return [np.zeros_like(p) for p in params]

    def step(self, grads: Leaves, state, params: Leaves):
        buffers = [self.momentum * b + d for b, d in zip(state, grads)]
        return [-self.lr * (d + self.momentum * b) for d, b in zip(grads, buffers)], buffers


def outer_trajectory(params0, grad_fn, inner, k: int, outer, num_steps: int):
    """Algorithm 1 with the slow step phi <- phi + outer(Delta), Delta = phi - theta_k.

    Returns ``(fast, slow)`` after every inner step, as ``lookahead_trajectory``.
    The inner state is kept across syncs; ``outer``'s state changes at syncs only.
    """
    slow = _as_f64(params0)
    inner_state, outer_state = inner.init(slow), outer.init(slow)
    fast = [s.copy() for s in slow]
    fast_history, slow_history = [], []
    for step in range(1, num_steps + 1):
        updates, inner_state = inner.step(grad_fn(fast), inner_state, fast)
        fast = [p + u for p, u in zip(fast, updates)]
        if step % k == 0:
            delta = [s - f for s, f in zip(slow, fast)]
            outer_updates, outer_state = outer.step(delta, outer_state, slow)
            slow = [s + u for s, u in zip(slow, outer_updates)]
            fast = [s.copy() for s in slow]
        fast_history.append([f.copy() for f in fast])
        slow_history.append([s.copy() for s in slow])
    return fast_history, slow_history

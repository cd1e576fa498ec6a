"""The one independent reference of Lookahead (Algorithm 1) used by the tests.

Plain numpy, float64, written from the paper's pseudocode and the optimizers'
textbook formulas. It must never import lookahead_optax or optax: the tests
compare the library against it, so sharing code would hide bugs. jax appears
only in the test problem's loss, which the library side differentiates.

Params are lists of numpy arrays (the leaves of a pytree, in tree order). An
optimizer here is any object with ``init(params) -> state`` and
``step(grads, state, params) -> (updates, state)``: the textbook inner
optimizers below, :class:`Lookahead` itself (so it nests), :class:`Partition`,
or an adapter around some other inner step written as a plain function.

:class:`Lookahead` is the only place in tests/ where Algorithm 1 is written
out; :func:`run` drives any optimizer here step by step, and every test that
needs Lookahead's trajectory builds it from these two.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

Leaves = list[np.ndarray]
Path = tuple  # keys, indices and field names from the root of a state to one leaf


def _as_f64(leaves) -> Leaves:
    return [np.array(leaf, dtype=np.float64) for leaf in leaves]


def rounded(x, dtype):
    """``x`` rounded to ``dtype`` (e.g. bfloat16) and back to float64; unchanged for None."""
    if dtype is None:
        return x
    return np.asarray(np.asarray(x, np.float64).astype(dtype), np.float64)


# --- the inner optimizers, from their textbook formulas -------------------------------------


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
    """Kingma & Ba (2015) with bias correction, eps outside the square root.

    State ``(t, mu, nu)``. With ``lr`` a callable, the step size of the n-th step
    (n = 0, 1, ...) is ``lr(n)`` and the state gains a fourth entry, the schedule's
    own step count n, which is not the bias-correction count t (the two differ once
    an inner-state policy re-initialises the moments but keeps the schedule going).
    """

    def __init__(self, lr, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8):
        self.lr, self.b1, self.b2, self.eps = lr, b1, b2, eps

    def init(self, params: Leaves):
        zeros = [np.zeros_like(p) for p in params]
        return (0, zeros, list(zeros)) + ((0,) if callable(self.lr) else ())

    def step(self, grads: Leaves, state, params: Leaves):
        t, mu, nu = state[:3]
        lr = float(self.lr(state[3])) if callable(self.lr) else self.lr
        t += 1
        mu = [self.b1 * m + (1 - self.b1) * g for m, g in zip(mu, grads)]
        nu = [self.b2 * v + (1 - self.b2) * g * g for v, g in zip(nu, grads)]
        updates = []
        for m, v in zip(mu, nu):
            m_hat = m / (1 - self.b1**t)
            v_hat = v / (1 - self.b2**t)
            updates.append(-lr * m_hat / (np.sqrt(v_hat) + self.eps))
        return updates, (t, mu, nu) + ((state[3] + 1,) if callable(self.lr) else ())


class NesterovSGD:
    """torch.optim.SGD(lr, momentum, nesterov=True): b <- mu b + g, theta -= lr (g + mu b)."""

    def __init__(self, lr: float, momentum: float):
        self.lr, self.momentum = lr, momentum

    def init(self, params: Leaves):
        return [np.zeros(np.shape(p), np.result_type(p, np.float64)) for p in params]

    def step(self, grads: Leaves, state, params: Leaves):
        buffers = [self.momentum * b + g for b, g in zip(state, grads)]
        return [-self.lr * (g + self.momentum * b) for g, b in zip(grads, buffers)], buffers


class Partition:
    """Different optimizers on disjoint groups of leaves, one gradient (optax.multi_transform).

    ``groups``: per optimizer, the indices of the leaves it owns; every leaf is owned once.
    """

    def __init__(self, optimizers: Sequence, groups: Sequence[Sequence[int]]):
        self.optimizers, self.groups = list(optimizers), [list(g) for g in groups]
        owned = sorted(i for g in self.groups for i in g)
        assert owned == list(range(len(owned))), "every leaf must be owned exactly once"

    def init(self, params: Leaves):
        return [opt.init([params[i] for i in g]) for opt, g in zip(self.optimizers, self.groups)]

    def step(self, grads: Leaves, state, params: Leaves):
        updates: list = [None] * len(params)
        new_state = []
        for opt, group, opt_state in zip(self.optimizers, self.groups, state):
            u, opt_state = opt.step(
                [grads[i] for i in group], opt_state, [params[i] for i in group]
            )
            for i, u_i in zip(group, u):
                updates[i] = u_i
            new_state.append(opt_state)
        return updates, new_state


# --- inner states as trees: which leaves a policy touches -----------------------------------


def _is_record(node) -> bool:
    return isinstance(node, tuple) and hasattr(node, "_fields")


def map_state(fn: Callable[..., Any], tree, *rest, path: Path = ()):
    """``fn(path, leaf, *other_leaves)`` on every leaf of a nested tuple/list/dict/NamedTuple.

    Anything else (arrays, numbers, None) is a leaf. Written here so that the
    reference needs no pytree library: it also walks the states of optimizers
    given as plain functions (NamedTuples of arrays).
    """
    if _is_record(tree):
        return type(tree)(
            *(
                map_state(fn, *children, path=path + (name,))
                for name, *children in zip(tree._fields, tree, *rest)
            )
        )
    if isinstance(tree, (tuple, list)):
        return type(tree)(
            map_state(fn, *children, path=path + (i,))
            for i, children in enumerate(zip(tree, *rest))
        )
    if isinstance(tree, dict):
        return {
            key: map_state(fn, tree[key], *(r[key] for r in rest), path=path + (key,))
            for key in tree
        }
    return fn(path, tree, *rest)


def is_floating(leaf) -> bool:
    """Floating (or complex) arrays and Python floats; not ints, bools or PRNG keys."""
    if isinstance(leaf, float):
        return True
    dtype = getattr(leaf, "dtype", None)
    if dtype is None:
        return False
    try:
        ml_dtypes.finfo(dtype)  # numpy's floats and complexes, and bfloat16 & co
    except (TypeError, ValueError):
        return False
    return True


ParamsLike = Callable[[Path, Any], bool]


def every_leaf(path: Path, leaf) -> bool:
    return True


def floating_leaves(path: Path, leaf) -> bool:
    return is_floating(leaf)


def under(*prefixes: Path) -> ParamsLike:
    """The leaves whose path starts with one of ``prefixes`` (e.g. ``under((1,), (2,))``)."""
    return lambda path, leaf: any(path[: len(p)] == tuple(p) for p in prefixes)


# --- Algorithm 1 ---------------------------------------------------------------------------


class LookaheadState(NamedTuple):
    inner: Any  # the inner optimizer's state
    slow: Leaves  # phi
    count: int  # inner steps since the last sync, in [0, k)
    syncs: int  # syncs so far; the j-th sync (from 0) uses alpha(j)
    cycle_start: Any = None  # "pullback": the inner state at the start of the cycle
    alpha: float | None = None  # the alpha of the last sync (None before the first)
    outer: Any = None  # the outer optimizer's state, with ``outer=``


class SyncView(NamedTuple):
    """What an ``alpha_rule`` sees at the j-th sync (j from 0)."""

    index: int
    fast: Leaves  # theta_k: params + the k-th inner update
    slow: Leaves  # phi before the sync
    grads: Leaves  # the k-th step's gradient (taken at theta_{k-1})
    updates: Leaves  # the k-th inner update
    inner_state: Any  # the inner state after the k-th step


class Lookahead:
    """Algorithm 1 of Zhang et al. (2019), one inner step per ``step`` call.

    On calls k, 2k, ... the sync happens inside the call: with theta_k = params
    + the inner update, phi <- phi + alpha_j (theta_k - phi), and the update
    returned moves the params to the new phi. Every other call returns the inner
    update. phi starts as the initial params.

    Args:
      inner: the inner optimizer (``init``/``step``).
      k: the sync period, or a callable of the cycle index j = 0, 1, ...: the period
        of each cycle (a k changed in the middle of a cycle applies from the next one).
      alpha: a float, or a schedule: a callable of the sync index j = 0, 1, ...
      inner_state: at a sync, "keep" the inner state; "reset" it to
        ``inner.init(params after the sync)`` on the leaves ``params_like``
        selects (the others keep their values, e.g. a schedule's count); or
        "pullback": ``s <- s0 + alpha_j (s - s0)`` on the floating leaves
        ``params_like`` selects and where both values are finite, ``s0`` the
        inner state at the start of the cycle.
      params_like: ``(path, leaf) -> bool``, which leaves of the inner state the
        policy acts on. Default: every leaf for "reset", every floating leaf for
        "pullback".
      slow_dtype: store phi rounded to this dtype (e.g. bfloat16); None: float64.
      params_dtype: the params' dtype: the params after a sync are phi rounded to
        it (use the same dtype in :func:`run`). None: float64.
      alpha_rule: ``SyncView -> float``, the alpha of each sync computed from what
        the sync sees (an adaptive alpha); overrides ``alpha``.
      outer: an optimizer for the slow step instead of alpha: at a sync it takes a
        step on the pseudo-gradient Delta = phi - theta_k, ``u, outer_state <-
        outer.step(Delta, outer_state, phi)`` and phi <- phi + u (``SGD(alpha)`` is
        alpha). With "pullback", alpha for the inner state is then 1.
    """

    def __init__(
        self,
        inner,
        k: int | Callable[[int], int],
        alpha: float | Callable[[int], float] = 0.5,
        inner_state: str = "keep",
        params_like: ParamsLike | None = None,
        slow_dtype=None,
        params_dtype=None,
        alpha_rule: Callable[[SyncView], float] | None = None,
        outer=None,
    ):
        assert inner_state in ("keep", "reset", "pullback"), inner_state
        self.inner, self.k, self.alpha, self.policy = inner, k, alpha, inner_state
        if params_like is None:
            params_like = every_leaf if inner_state == "reset" else floating_leaves
        self.params_like, self.alpha_rule, self.outer = params_like, alpha_rule, outer
        self.slow_dtype, self.params_dtype = slow_dtype, params_dtype

    def init(self, params: Leaves) -> LookaheadState:
        inner_state = self.inner.init(params)
        return LookaheadState(
            inner=inner_state,
            slow=[rounded(p, self.slow_dtype) for p in _as_f64(params)],  # phi_0 = theta_0
            count=0,
            syncs=0,
            cycle_start=inner_state if self.policy == "pullback" else None,
            outer=None if self.outer is None else self.outer.init(_as_f64(params)),
        )

    def alpha_at(self, view: SyncView) -> float:
        if self.alpha_rule is not None:
            return float(self.alpha_rule(view))
        return float(self.alpha(view.index)) if callable(self.alpha) else float(self.alpha)

    def step(self, grads: Leaves, state: LookaheadState, params: Leaves):
        updates, inner_state = self.inner.step(grads, state.inner, params)
        count = state.count + 1
        if count < (self.k(state.syncs) if callable(self.k) else self.k):
            return updates, state._replace(inner=inner_state, count=count)
        # The sync: phi <- phi + alpha (theta_k - phi); the params move to phi.
        fast = [np.asarray(p, np.float64) + u for p, u in zip(params, updates)]
        outer_state = state.outer
        if self.outer is None:
            view = SyncView(state.syncs, fast, state.slow, grads, updates, inner_state)
            alpha = self.alpha_at(view)
            slow = [s + alpha * (f - s) for s, f in zip(state.slow, fast)]
        else:
            alpha = 1.0
            delta = [s - f for s, f in zip(state.slow, fast)]
            outer_updates, outer_state = self.outer.step(delta, outer_state, state.slow)
            slow = [s + u for s, u in zip(state.slow, outer_updates)]
        slow = [rounded(s, self.slow_dtype) for s in slow]
        new_params = [rounded(s, self.params_dtype) for s in slow]
        updates = [n - np.asarray(p, np.float64) for n, p in zip(new_params, params)]
        cycle_start = state.cycle_start
        if self.policy == "reset":
            fresh = self.inner.init(new_params)
            inner_state = map_state(
                lambda path, now, new: new if self.params_like(path, now) else now,
                inner_state,
                fresh,
            )
        elif self.policy == "pullback":

            def pull(path, start, end):
                if not (self.params_like(path, end) and is_floating(end)):
                    return end
                finite = np.isfinite(np.asarray(start)) & np.isfinite(np.asarray(end))
                pulled = start + alpha * (end - start)
                return pulled if np.all(finite) else np.where(finite, pulled, end)

            inner_state = cycle_start = map_state(pull, cycle_start, inner_state)
        new_state = LookaheadState(
            inner_state, slow, 0, state.syncs + 1, cycle_start, alpha, outer_state
        )
        return updates, new_state


# --- driving an optimizer ------------------------------------------------------------------


class Step(NamedTuple):
    """One step of :func:`run`: the params after it, its gradient, update and new state."""

    params: Leaves
    grads: Leaves
    updates: Leaves
    state: Any


def run(
    optimizer,
    params0,
    grad_fn: Callable[[Leaves], Leaves],
    num_steps: int,
    params_dtype=None,
) -> list[Step]:
    """``num_steps`` steps of ``optimizer`` from ``params0``; the params after each step.

    ``params_dtype``: the params are rounded to it after every step (the params of a
    bfloat16 model); None keeps float64.
    """
    params = [rounded(p, params_dtype) for p in _as_f64(params0)]
    state = optimizer.init(params)
    history = []
    for _ in range(num_steps):
        grads = grad_fn(params)
        updates, state = optimizer.step(grads, state, params)
        params = [rounded(p + u, params_dtype) for p, u in zip(params, updates)]
        history.append(Step([p.copy() for p in params], grads, updates, state))
    return history


def lookahead_trajectory(
    params0,
    grad_fn: Callable[[Leaves], Leaves],
    inner,
    k: int,
    alpha: float,
    num_steps: int,
) -> tuple[list[Leaves], list[Leaves]]:
    """:class:`Lookahead` (inner state kept) for ``num_steps`` steps (need not be a multiple of k).

    Returns ``(fast, slow)``: for every inner step t = 1..num_steps, the fast
    weights (what the params are after the step) and the slow weights phi.
    """
    history = run(Lookahead(inner, k, alpha), params0, grad_fn, num_steps)
    return [s.params for s in history], [list(s.state.slow) for s in history]


def outer_trajectory(params0, grad_fn, inner, k: int, outer, num_steps: int):
    """:class:`Lookahead` with ``outer=``: ``(fast, slow)`` as in :func:`lookahead_trajectory`."""
    history = run(Lookahead(inner, k, outer=outer), params0, grad_fn, num_steps)
    return [s.params for s in history], [list(s.state.slow) for s in history]


def inner_trajectory(params0, grad_fn, inner, num_steps: int) -> list[Leaves]:
    """The inner optimizer alone: params after every step t = 1..num_steps."""
    return [s.params for s in run(inner, params0, grad_fn, num_steps)]


# --- test problems -------------------------------------------------------------------------


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


def diloco_trajectory(
    params0, grad_fns, inner, k: int, outer, num_steps: int, stats=None, groups=None
):
    """Many workers (DiLoCo): :class:`Lookahead`'s sync with the workers' mean pseudo-gradient.

    Worker w starts at ``params0``, takes inner steps with its own ``grad_fns[w]`` and
    its own copy of the inner state; at calls k, 2k, ... Delta = phi - mean_w theta_w,
    one ``outer`` step (``SGD(alpha)`` is Lookahead's), and every worker restarts at
    the new phi. Returns ``(fast, slow)``: per step, the list of every worker's params,
    and phi. ``stats``, a list, receives per sync ``(|Delta|, [|theta_w - mean theta|])``.

    ``groups`` (Streaming DiLoCo): lists of leaf indices, P fragments; fragment j syncs
    only its leaves, with its own outer state, at calls (j + 1) k / P of every cycle.
    """
    workers = len(grad_fns)
    slow = _as_f64(params0)
    groups = [list(range(len(slow)))] if groups is None else [list(g) for g in groups]
    fast = [[s.copy() for s in slow] for _ in range(workers)]
    inner_states = [inner.init(f) for f in fast]
    outer_states = [outer.init([slow[i] for i in g]) for g in groups]
    fast_history, slow_history = [], []
    for step in range(1, num_steps + 1):
        for w in range(workers):
            updates, inner_states[w] = inner.step(grad_fns[w](fast[w]), inner_states[w], fast[w])
            fast[w] = [p + u for p, u in zip(fast[w], updates)]
        for j, group in enumerate(groups):
            if (step - (j + 1) * k // len(groups)) % k != 0:
                continue
            mean = {i: np.mean([f[i] for f in fast], axis=0) for i in group}
            delta = [slow[i] - mean[i] for i in group]
            if stats is not None:
                drift = [np.sqrt(sum(np.sum((f[i] - mean[i]) ** 2) for i in group))
                         for f in fast]  # fmt: skip
                stats.append((np.sqrt(sum(np.sum(d**2) for d in delta)), drift))
            outer_updates, outer_states[j] = outer.step(
                delta, outer_states[j], [slow[i] for i in group]
            )
            for i, u in zip(group, outer_updates):
                slow[i] = slow[i] + u
                for f in fast:
                    f[i] = slow[i].copy()
        fast_history.append([[p.copy() for p in f] for f in fast])
        slow_history.append([s.copy() for s in slow])
    return fast_history, slow_history


# --- the general form: workers, fragments, dtypes, every slow step and policy --------------
#
# Used by tests/test_conformance.py, which runs every combination of the library's options
# against it. Leaves here may be float64, complex128 (complex params), int64, bool or uint32
# (a PRNG key's data); only the floating and complex ones ("kinds" "float") take part in the
# sync, the others are the inner optimizer's business.


def rounded_parts(x, dtype):
    """``x`` rounded to ``dtype``, real and imaginary parts apart when ``x`` is complex.

    A complex ``dtype`` rounds each part to its precision; a real ``dtype`` (bfloat16, float16)
    rounds each part to it, so the imaginary part survives. None: unchanged.
    """
    if dtype is None:
        return x
    x = np.asarray(x)
    if np.iscomplexobj(x):
        part = np.dtype(dtype)
        if part.kind == "c":
            part = np.finfo(part).dtype  # complex64 -> float32
        return rounded(x.real, part) + 1j * rounded(x.imag, part)
    return rounded(x, dtype)


def fragment_groups(sizes: Sequence[int], fragments: int) -> list[list[int]]:
    """Streaming DiLoCo's split: the leaves with ``sizes[i] > 0`` (the synced ones, in tree
    order) cut into ``fragments`` contiguous groups of about equal sizes: leaf i goes to
    fragment ``min(P - 1, floor(P (start_i + size_i / 2) / total))``, start_i the elements
    before it. Leaves of size 0 (and non-floating leaves, given as 0) are in no group."""
    total, start, groups = max(sum(sizes), 1), 0, [[] for _ in range(fragments)]
    for i, size in enumerate(sizes):
        if size:
            groups[min(fragments - 1, int(fragments * (start + size / 2) / total))].append(i)
        start += size
    return groups


class Mixed:
    """Heavy-ball momentum (optax.sgd(lr, momentum=beta)) on the floating leaves; on the others
    (int, bool, PRNG keys) the update is the gradient itself: the test decides what it means
    (``p + u`` for ints, ``p | u`` for bools, ``u`` replaces a key)."""

    def __init__(self, lr: float, beta: float, kinds: Sequence[str]):
        self.lr, self.beta, self.kinds = lr, beta, list(kinds)

    def init(self, params: Leaves):
        return [
            np.zeros_like(p) if kind == "float" else None for p, kind in zip(params, self.kinds)
        ]

    def step(self, grads: Leaves, state, params: Leaves):
        trace = [
            g + self.beta * m if kind == "float" else None
            for g, m, kind in zip(grads, state, self.kinds)
        ]
        updates = [
            -self.lr * t if kind == "float" else g for g, t, kind in zip(grads, trace, self.kinds)
        ]
        return updates, trace


class EveryK:
    """optax.MultiSteps(inner, k): ``inner`` steps on every k-th call, on the mean of the k
    calls' gradients; the other calls return zero updates. State ``(mini_step, mean, inner)``."""

    def __init__(self, inner, k: int):
        self.inner, self.k = inner, k

    def init(self, params: Leaves):
        return (0, [np.zeros_like(np.asarray(p)) for p in params], self.inner.init(params))

    def step(self, grads: Leaves, state, params: Leaves):
        mini_step, mean, inner = state
        mean = [(g + mini_step * m) / (mini_step + 1) for g, m in zip(grads, mean)]
        if mini_step + 1 < self.k:
            return [np.zeros_like(np.asarray(g)) for g in grads], (mini_step + 1, mean, inner)
        updates, inner = self.inner.step(mean, inner, params)
        return updates, (0, [np.zeros_like(m) for m in mean], inner)


class ComplexAdam(Adam):
    """Adam with nu from |g|^2 (what optax.adam does on complex leaves; Adam on real ones)."""

    def step(self, grads: Leaves, state, params: Leaves):
        t, mu, nu = state[:3]
        t += 1
        mu = [self.b1 * m + (1 - self.b1) * g for m, g in zip(mu, grads)]
        nu = [self.b2 * v + (1 - self.b2) * np.abs(g) ** 2 for v, g in zip(nu, grads)]
        updates = [
            -self.lr * (m / (1 - self.b1**t)) / (np.sqrt(v / (1 - self.b2**t)) + self.eps)
            for m, v in zip(mu, nu)
        ]
        return updates, (t, mu, nu)


def diagonal_line_search(curvature: Leaves, alpha_min: float) -> Callable[[SyncView], float]:
    """The paper's adaptive alpha with a known diagonal curvature A, as an ``alpha_rule``:
    ``clip(1 - g_k.d / (d.A d), alpha_min, 1)``, ``d = theta_k - phi``, ``g_k = g + A u``
    (the model's gradient at theta_k, g taken at theta_{k-1}); 1 where ``d.A d <= 0``.
    ``curvature`` has None on the leaves that are not synced."""

    def rule(view: SyncView) -> float:
        numerator = denominator = 0.0
        for a, g, u, f, s in zip(curvature, view.grads, view.updates, view.fast, view.slow):
            if a is None:
                continue
            d = f - s  # complex leaves as pairs of reals: <x, y> = Re(conj(x) y)
            numerator += float(np.sum(np.real(np.conj(g + a * u) * d)))
            denominator += float(np.sum(a * np.abs(d) ** 2))
        if denominator <= 0:
            return 1.0
        return float(np.clip(1.0 - numerator / denominator, alpha_min, 1.0))

    return rule


class WorkersState(NamedTuple):
    inner: list  # per worker: the inner optimizer's state
    slow: list  # phi on the synced leaves, None on the others
    count: int  # inner steps since the cycle started
    syncs: int  # full cycles so far
    cycle_start: list | None  # "pullback": per worker, the inner state at the cycle's start
    outer: list  # per fragment: the outer optimizer's state (None with alpha)
    stats: tuple | None  # the latest sync's (|Delta|, [|theta_w - mean theta|])
    alpha: float | None  # the alpha of the latest sync


class Workers:
    """Algorithm 1 in its general form: W workers, P fragments, any slow step and dtypes.

    Every worker w runs ``inner`` on its own params with its own inner state. Fragment j
    (``groups[j]``, leaf indices; one group of every synced leaf by default) syncs at calls
    (j + 1) k / P of every cycle (P = 1: calls k, 2k, ...). At its sync, with theta_w the
    worker's params plus its inner update:

    - Delta_w = phi - theta_w per worker; with ``communication_dtype`` each Delta_w is rounded
      to it (both parts of a complex one), averaged exactly, and the mean rounded to it once;
      Delta = mean_w Delta_w (exact, no rounding, with ``communication_dtype`` None).
    - phi <- phi - alpha_j Delta (``alpha``, or ``alpha_rule``'s value at this sync), or with
      ``outer``: ``u, s <- outer.step(Delta, s_j, phi); phi <- phi + u`` (fragment j's own s_j).
    - phi is rounded to ``slow_dtypes[i]`` (per leaf; None keeps float64/complex128).
    - every worker's params on those leaves become phi rounded to ``params_dtypes[i]``.
    - P = 1 only: the inner-state policy on every worker ("reset": ``inner.init`` of the new
      params; "pullback": ``s <- s0 + alpha (s - s0)`` on floating leaves where both are finite,
      alpha = 1 with ``outer``).
    - ``stats``: |Delta| and per worker |theta_w - mean_v theta_v| over the fragment's leaves.

    phi starts at worker 0's params (``start="first"``) or their mean (``start="mean"``).
    The slow weights are never read on other calls.
    """

    def __init__(
        self,
        inner,
        k: int,
        *,
        kinds: Sequence[str],
        alpha: float = 0.5,
        outer=None,
        alpha_rule: Callable[[SyncView], float] | None = None,
        inner_state: str = "keep",
        params_dtypes: Sequence[Any] | None = None,
        slow_dtypes: Sequence[Any] | None = None,
        communication_dtype=None,
        groups: Sequence[Sequence[int]] | None = None,
        start: str = "first",
    ):
        assert inner_state in ("keep", "reset", "pullback"), inner_state
        assert start in ("first", "mean"), start
        n = len(kinds)
        self.inner, self.k, self.kinds, self.alpha = inner, k, list(kinds), alpha
        self.outer, self.alpha_rule, self.policy, self.start = outer, alpha_rule, inner_state, start
        self.params_dtypes = list(params_dtypes or [None] * n)
        self.slow_dtypes = list(slow_dtypes or [None] * n)
        self.communication_dtype = communication_dtype
        synced = [i for i in range(n) if kinds[i] == "float"]
        self.groups = [synced] if groups is None else [list(g) for g in groups]
        assert self.policy == "keep" or len(self.groups) == 1, "policies need P = 1"

    def init(self, params: list[Leaves]) -> WorkersState:
        first = params[0]
        if self.start == "mean":
            first = [
                np.mean(np.stack(leaves), axis=0) if kind == "float" else leaves[0]
                for kind, leaves in zip(self.kinds, zip(*params))
            ]
        slow = [
            rounded_parts(np.asarray(p), d) if kind == "float" else None
            for p, kind, d in zip(first, self.kinds, self.slow_dtypes)
        ]
        inner = [self.inner.init(p) for p in params]
        outer = [
            None if self.outer is None else self.outer.init([slow[i] for i in group])
            for group in self.groups
        ]
        cycle_start = list(inner) if self.policy == "pullback" else None
        return WorkersState(inner, slow, 0, 0, cycle_start, outer, None, None)

    def _mean(self, deltas: list) -> np.ndarray:
        sent = [rounded_parts(d, self.communication_dtype) for d in deltas]
        return rounded_parts(np.mean(np.stack(sent), axis=0), self.communication_dtype)

    def step(self, grads: list[Leaves], state: WorkersState, params: list[Leaves]):
        steps = [self.inner.step(g, s, p) for g, s, p in zip(grads, state.inner, params)]
        updates = [list(u) for u, _ in steps]
        inner = [s for _, s in steps]
        count = state.count + 1
        period = len(self.groups)
        slow, outer, stats, alpha = list(state.slow), list(state.outer), state.stats, state.alpha
        synced_now = []
        for j, group in enumerate(self.groups):
            if count != (j + 1) * (self.k // period) or not group:
                continue  # a fragment without leaves has nothing to sync (stats unchanged)
            fast = [[np.asarray(p[i]) + u[i] for i in group] for p, u in zip(params, updates)]
            phi = [slow[i] for i in group]
            mean_fast = [np.mean(np.stack(leaves), axis=0) for leaves in zip(*fast)]
            delta = [self._mean([s - f[n] for f in fast]) for n, s in enumerate(phi)]
            norm = np.sqrt(sum(np.sum(np.abs(d) ** 2) for d in delta))
            drift = [
                np.sqrt(sum(np.sum(np.abs(x - m) ** 2) for x, m in zip(f, mean_fast))) for f in fast
            ]
            stats = (float(norm), [float(d) for d in drift])
            if self.outer is None:
                if self.alpha_rule is not None:
                    assert len(params) == 1, "adaptive alpha: one worker"
                    view = SyncView(
                        state.syncs,
                        [np.asarray(p) + u if i in group else None
                         for i, (p, u) in enumerate(zip(params[0], updates[0]))],
                        slow, grads[0], updates[0], inner[0],
                    )  # fmt: skip
                    alpha = self.alpha_rule(view)
                else:
                    alpha = float(self.alpha)
                moved = [s - alpha * d for s, d in zip(phi, delta)]
            else:
                alpha = 1.0
                steps_j, outer[j] = self.outer.step(delta, outer[j], phi)
                moved = [s + u for s, u in zip(phi, steps_j)]
            for i, m in zip(group, moved):
                slow[i] = rounded_parts(m, self.slow_dtypes[i])
                synced_now.append(i)
        for w, p in enumerate(params):
            for i in synced_now:
                updates[w][i] = rounded_parts(slow[i], self.params_dtypes[i]) - np.asarray(p[i])
        cycle_start = state.cycle_start
        if synced_now and self.policy == "reset":
            new_params = [
                [np.asarray(x) + u for x, u in zip(p, upd)] for p, upd in zip(params, updates)
            ]
            inner = [self.inner.init(p) for p in new_params]
        elif synced_now and self.policy == "pullback":

            def pull(path, start, end):
                if not is_floating(end):
                    return end
                finite = np.isfinite(np.asarray(start)) & np.isfinite(np.asarray(end))
                return np.where(finite, start + alpha * (end - start), end)

            inner = cycle_start = [map_state(pull, s0, s) for s0, s in zip(cycle_start, inner)]
        syncs = state.syncs
        if count == self.k:
            count, syncs = 0, syncs + 1
        new_state = WorkersState(inner, slow, count, syncs, cycle_start, outer, stats, alpha)
        return updates, new_state


# --- overlapped fragments and the quantized exchange (torchft's DiLoCo, step by step) ------
#
# Written from torchft's ``DiLoCo(fragment_sync_delay=tau, fragment_update_alpha=a)``
# (torchft/local_sgd.py) and the quantized exchange as the issue describes it; used by
# tests/test_overlap.py and tests/test_quantized.py.


def quantize_blocks(x: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """float32 blocks along the last axis of ``x`` to int8 / int4 / int2 / fp8, one float32
    scale each: scale = max|x| / qmax (1 for an all-zero block); the integer types: round
    half to even, clip to [-qmax, qmax] with qmax = 127, 7, 1 (held as int8); fp8: round to
    nearest (ml_dtypes)."""
    x = np.asarray(x, np.float32)
    fp8 = {"float8_e4m3fn": ml_dtypes.float8_e4m3fn, "float8_e5m2": ml_dtypes.float8_e5m2}
    integer = {"int8": 127.0, "int4": 7.0, "int2": 1.0}
    qmax = np.float32(integer[dtype] if dtype in integer else ml_dtypes.finfo(fp8[dtype]).max)
    top = np.max(np.abs(x), axis=-1)
    scale = np.where(top > 0, top / qmax, np.float32(1.0)).astype(np.float32)
    scaled = (x / scale[..., None]).astype(np.float32)
    if dtype in integer:
        return np.clip(np.round(scaled), -qmax, qmax).astype(np.int8), scale
    return scaled.astype(fp8[dtype]), scale


def dequantize_blocks(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return (q.astype(np.float32) * scale[..., None]).astype(np.float32)


def quantized_exchange(xs: Sequence[np.ndarray], dtype: str, block: int):
    """The workers' mean of the float32 vectors ``xs`` (one per worker), exchanged quantized.

    Every vector is padded with zeros to N chunks of C values, C = ceil(T / N) rounded up to
    m = ceil(ceil(T / N) / block) equal blocks of b = ceil(ceil(T / N) / m) values (rounded up
    to a multiple of the values a byte packs: 2 for int4, 4 for int2), and quantized in blocks
    of b; worker c receives chunk c of
    everyone (all-to-all), dequantizes, sums in float32 in worker order, divides by N,
    requantizes; everyone receives every requantized chunk (all-gather) and dequantizes.
    Returns ``(mean, residuals)``: the mean (length T, float32) and per worker what its own
    quantization lost, ``x_w - dequantize(quantize(x_w))`` (length T).
    """
    n, total = len(xs), len(xs[0])
    per_worker = max(1, -(-total // n))
    m = -(-per_worker // block)
    per_byte = {"int4": 2, "int2": 4}.get(dtype, 1)
    b = -(-(-(-per_worker // m)) // per_byte) * per_byte
    chunk = m * b
    padded = [np.concatenate([np.asarray(x, np.float32), np.zeros(n * chunk - total, np.float32)])
              for x in xs]  # fmt: skip
    sent = [quantize_blocks(x.reshape(n, chunk // b, b), dtype) for x in padded]
    residuals = [(x - dequantize_blocks(*qs).reshape(-1))[:total] for x, qs in zip(padded, sent)]
    gathered = []
    for c in range(n):  # worker c owns chunk c
        acc = dequantize_blocks(sent[0][0][c], sent[0][1][c])
        for w in range(1, n):
            acc = (acc + dequantize_blocks(sent[w][0][c], sent[w][1][c])).astype(np.float32)
        gathered.append(quantize_blocks((acc / np.float32(n)).astype(np.float32), dtype))
    mean = np.concatenate([dequantize_blocks(q, s).reshape(-1) for q, s in gathered])
    return mean[:total], residuals


def streaming_trajectory(
    params0, grad_fns, inner, k: int, outer, num_steps: int, *, groups=None, overlap: int = 0,
    mixing: float = 0.0, quantized: tuple[str, int] | None = None, error_feedback: bool = False,
):  # fmt: skip
    """torchft's DiLoCo with fragment_sync_delay = ``overlap``, fragment_update_alpha =
    ``mixing``; optionally the quantized exchange (``quantized=(dtype, block)``, float32).

    P fragments (``groups``); fragment j syncs at calls s_j = (j + 1) k / P of every cycle.
    At call s_j - overlap, after the inner step, its pseudo-gradient phi - theta_w is taken
    per worker and averaged (with ``error_feedback`` each worker first adds its residual
    and keeps what quantizing lost). At call s_j, after the inner step: ``local`` = theta_w;
    one ``outer`` step with the stored average moves phi; theta_w <- phi + mixing (local -
    phi). Returns per step every worker's params and phi (float64, float32 if quantized).
    """
    workers = len(grad_fns)
    ftype = np.float32 if quantized else np.float64
    slow = [np.asarray(p, ftype) for p in params0]
    groups = [list(range(len(slow)))] if groups is None else [list(g) for g in groups]
    fast = [[s.copy() for s in slow] for _ in range(workers)]
    inner_states = [inner.init(f) for f in fast]
    outer_states = [outer.init([slow[i] for i in g]) for g in groups]
    pending: dict[int, list] = {}
    residual = [[np.zeros_like(s) for s in slow] for _ in range(workers)]
    fast_history, slow_history = [], []
    for step in range(1, num_steps + 1):
        for w in range(workers):
            updates, inner_states[w] = inner.step(grad_fns[w](fast[w]), inner_states[w], fast[w])
            fast[w] = [(p + u).astype(ftype) for p, u in zip(fast[w], updates)]
        for j, group in enumerate(groups):
            at = (j + 1) * k // len(groups)
            if (step - at + overlap) % k == 0:  # send: the pseudo-gradient of these weights
                deltas = [[(slow[i] - f[i]).astype(ftype) for i in group] for f in fast]
                if quantized is None:
                    pending[j] = [np.mean(leaves, axis=0) for leaves in zip(*deltas)]
                    continue
                sizes = [slow[i].size for i in group]
                xs = []
                for w, d in enumerate(deltas):
                    flat = np.concatenate([x.reshape(-1) for x in d]).astype(np.float32)
                    if error_feedback:
                        flat = flat + np.concatenate([residual[w][i].reshape(-1) for i in group])
                    xs.append(flat)
                mean, lost = quantized_exchange(xs, *quantized)
                cuts = np.cumsum([0] + sizes)
                pending[j] = [mean[a:b].reshape(slow[i].shape) for i, a, b in
                              zip(group, cuts[:-1], cuts[1:])]  # fmt: skip
                if error_feedback:
                    for w in range(workers):
                        for i, a, b in zip(group, cuts[:-1], cuts[1:]):
                            residual[w][i] = lost[w][a:b].reshape(slow[i].shape)
        for j, group in enumerate(groups):
            at = (j + 1) * k // len(groups)
            if (step - at) % k != 0:
                continue
            phi = [slow[i] for i in group]
            moves, outer_states[j] = outer.step(pending.pop(j), outer_states[j], phi)
            for i, u in zip(group, moves):
                slow[i] = (slow[i] + u).astype(ftype)
                for f in fast:
                    f[i] = (slow[i] + ftype(mixing) * (f[i] - slow[i])).astype(ftype)
        fast_history.append([[p.copy() for p in f] for f in fast])
        slow_history.append([s.copy() for s in slow])
    return fast_history, slow_history

"""lookahead composed with optax's wrappers, in both directions, against the plain reference."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lookahead_optax as lo
from tests import helpers
from tests import reference as ref
from tests.helpers import SGD_LR, standard_promotion_test

PROBLEM = ref.LogisticQuadratic()
TOL = dict(rtol=2e-5, atol=2e-5)
loss_grad = jax.jit(jax.grad(PROBLEM.loss))


pytestmark = pytest.mark.usefixtures("strict_promotion")


def initial_params():
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), PROBLEM.params0)


def poison(grads):
    """The gradient with one leaf set to inf."""
    return {**grads, "w": grads["w"].at[0].set(jnp.inf)}


def run(tx, num_steps, inf_steps=(), state_edit=None):
    """Python loop over a jitted update; params and slow_params after every step.

    ``inf_steps``: 1-based steps whose gradient gets an inf. ``state_edit``: applied
    to the state after init (to change an injected hyperparameter).
    """
    update = jax.jit(tx.update)
    params = initial_params()
    state = tx.init(params)
    if state_edit is not None:
        state = state_edit(state)
    history = []
    for step in range(1, num_steps + 1):
        grads = loss_grad(params)
        if step in inf_steps:
            grads = poison(grads)
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
        history.append((params, lo.slow_params(state, params)))
    return history, state


def assert_close(tree, expected_leaves, **tol):
    for got, want in zip(jax.tree.leaves(tree), expected_leaves, strict=True):
        np.testing.assert_allclose(np.asarray(got, np.float64), want, **(tol or TOL))


def assert_matches(history, fast, slow):
    assert len(history) == len(fast)
    for (params, slow_params), fast_ref, slow_ref in zip(history, fast, slow):
        assert_close(params, fast_ref)
        assert_close(slow_params, slow_ref)


def reference_lookahead(inner, k, alpha, num_steps, grad_fn=PROBLEM.grad):
    return ref.lookahead_trajectory(PROBLEM.leaves0(), grad_fn, inner, k, alpha, num_steps)


# ---- reference inner optimizers for the wrappers (numpy, from their definitions) ----


class ClippedSGD:
    """clip_by_global_norm(max_norm) then SGD."""

    def __init__(self, lr, max_norm):
        self.sgd, self.max_norm = ref.SGD(lr), max_norm

    def init(self, params):
        return ()

    def step(self, grads, state, params):
        norm = np.sqrt(sum(np.sum(g**2) for g in grads))
        scale = min(1.0, self.max_norm / norm)
        return self.sgd.step([g * scale for g in grads], state, params)


class Accumulate:
    """MultiSteps: average m micro-gradients, step on the m-th, zero updates otherwise."""

    def __init__(self, inner, m):
        self.inner, self.m = inner, m

    def init(self, params):
        return (0, [np.zeros_like(p) for p in params], self.inner.init(params))

    def step(self, grads, state, params):
        micro, total, inner_state = state
        total = [t + g for t, g in zip(total, grads)]
        if micro + 1 < self.m:
            return [np.zeros_like(p) for p in params], (micro + 1, total, inner_state)
        updates, inner_state = self.inner.step([t / self.m for t in total], inner_state, params)
        return updates, (0, [np.zeros_like(p) for p in params], inner_state)


class SkipNonFinite:
    """apply_if_finite: a non-finite gradient gives a zero update and leaves the state alone."""

    def __init__(self, inner):
        self.inner = inner

    def init(self, params):
        return self.inner.init(params)

    def step(self, grads, state, params):
        if not all(np.all(np.isfinite(g)) for g in grads):
            return [np.zeros_like(p) for p in params], state
        return self.inner.step(grads, state, params)


def grads_with_inf_at(inf_steps):
    """PROBLEM.grad with leaf w[0] set to inf on the given 1-based calls."""
    calls = 0

    def grad_fn(leaves):
        nonlocal calls
        calls += 1
        grads = PROBLEM.grad(leaves)
        if calls in inf_steps:
            grads[2] = grads[2].copy()
            grads[2][0] = np.inf
        return grads

    return grad_fn


# ---- optax.chain ----


def test_lookahead_inside_chain_after_clipping():
    tx = optax.chain(optax.clip_by_global_norm(0.3), lo.lookahead(optax.sgd(0.5), k=3, alpha=0.6))
    history, _ = run(tx, 8)
    assert_matches(history, *reference_lookahead(ClippedSGD(0.5, 0.3), 3, 0.6, 8))


def test_chain_inside_lookahead():
    inner = optax.chain(optax.clip_by_global_norm(0.3), optax.sgd(0.5))
    history, _ = run(lo.lookahead(inner, k=3, alpha=0.6), 8)
    assert_matches(history, *reference_lookahead(ClippedSGD(0.5, 0.3), 3, 0.6, 8))


# ---- optax.MultiSteps ----


def test_multisteps_around_lookahead():
    """Lookahead sees one averaged gradient every m calls; micro steps move nothing."""
    m, k = 3, 2
    tx = helpers.multi_steps(lo.lookahead(optax.sgd(0.2, momentum=0.9), k=k, alpha=0.5), m)
    history, _ = run(tx, 4 * m)
    # Params do not move during micro steps, so the averaged gradient is the gradient.
    fast, slow = reference_lookahead(ref.Momentum(0.2, 0.9), k, 0.5, 4)
    previous = (initial_params(), initial_params())
    for call, (params, slow_params) in enumerate(history, start=1):
        if call % m:
            for got, before in zip(
                jax.tree.leaves((params, slow_params)), jax.tree.leaves(previous)
            ):
                np.testing.assert_array_equal(got, before)
        else:
            assert_close(params, fast[call // m - 1])
            assert_close(slow_params, slow[call // m - 1])
        previous = (params, slow_params)


def test_lookahead_around_multisteps():
    """Every call counts as an inner step, including the accumulating ones."""
    m, k = 2, 3
    inner = helpers.multi_steps(optax.sgd(0.3, momentum=0.9), m)
    history, _ = run(lo.lookahead(inner, k=k, alpha=0.5), 12)
    assert_matches(history, *reference_lookahead(Accumulate(ref.Momentum(0.3, 0.9), m), k, 0.5, 12))


# ---- optax.apply_if_finite: a non-finite gradient never reaches params or slow weights ----

# Inside lookahead (k=3), call 2 is a non-sync step and call 6 a sync step.
INF_STEPS = (2, 6)
# Around lookahead the skipped calls are not counted: with infs on calls 2 and 7,
# lookahead's calls are 1, -, 2, 3 (sync), 4, 5, - (would have been its sync call 6), 6, ...
OUTER_INF_STEPS = (2, 7)


def _all_finite(history):
    return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(history))


def test_apply_if_finite_around_lookahead():
    """A skipped call does not count: the run equals the reference on the finite calls only."""
    tx = optax.apply_if_finite(lo.lookahead(optax.sgd(0.3), k=3, alpha=0.5), 5)
    history, state = run(tx, 10, inf_steps=OUTER_INF_STEPS)
    assert _all_finite(history)
    fast, slow = reference_lookahead(ref.SGD(0.3), 3, 0.5, 10 - len(OUTER_INF_STEPS))
    finite = 0
    for call, (params, slow_params) in enumerate(history, start=1):
        if call not in OUTER_INF_STEPS:
            finite += 1
        expected = (fast[finite - 1], slow[finite - 1]) if finite else (PROBLEM.leaves0(),) * 2
        assert_close(params, expected[0])
        assert_close(slow_params, expected[1])
    assert int(state.total_notfinite) == len(OUTER_INF_STEPS)
    assert int(state.inner_state.syncs) == 2 and int(state.inner_state.count) == 2


def test_lookahead_around_apply_if_finite():
    """The inner step is skipped (zero update) but counted; a sync still happens on call 6."""
    tx = lo.lookahead(optax.apply_if_finite(optax.sgd(0.3), 5), k=3, alpha=0.5)
    history, state = run(tx, 10, inf_steps=INF_STEPS)
    assert _all_finite(history)
    fast, slow = reference_lookahead(
        SkipNonFinite(ref.SGD(0.3)), 3, 0.5, 10, grad_fn=grads_with_inf_at(INF_STEPS)
    )
    assert_matches(history, fast, slow)
    assert int(state.syncs) == 3


def test_inf_gradient_without_a_guard_does_poison():
    """Guards the two tests above: the injected inf really is harmful when unguarded."""
    history, _ = run(lo.lookahead(optax.sgd(0.3), k=3, alpha=0.5), 3, inf_steps=(2,))
    assert not _all_finite(history[-1])


# ---- optax.inject_hyperparams ----


@pytest.mark.parametrize("static_args", [(), ("k",)], ids=["k-traced", "k-static"])
def test_inject_hyperparams_equals_the_plain_transform(static_args):
    make = optax.inject_hyperparams(lo.lookahead, static_args=static_args)
    injected, _ = run(make(optax.sgd(0.2, momentum=0.9), k=3, alpha=0.5), 8)
    plain, _ = run(lo.lookahead(optax.sgd(0.2, momentum=0.9), k=3, alpha=0.5), 8)
    for got, want in zip(jax.tree.leaves(injected), jax.tree.leaves(plain)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert_matches(injected, *reference_lookahead(ref.Momentum(0.2, 0.9), 3, 0.5, 8))


def _set_hyperparam(name, value, dtype):
    def edit(state):
        return state._replace(hyperparams={**state.hyperparams, name: jnp.asarray(value, dtype)})

    return edit


def test_alpha_is_live_under_jit():
    """Changing state.hyperparams['alpha'] changes the result, without a retrace."""
    traces = 0
    tx = optax.inject_hyperparams(lo.lookahead)(optax.sgd(0.2), k=2, alpha=0.5)

    @jax.jit
    def step(params, state):
        nonlocal traces
        traces += 1
        updates, state = tx.update(loss_grad(params), state, params)
        return optax.apply_updates(params, updates), state

    for alpha in (0.5, 0.8):
        params = initial_params()
        state = _set_hyperparam("alpha", alpha, jnp.float32)(tx.init(params))
        for _ in range(5):
            params, state = step(params, state)
        fast, slow = reference_lookahead(ref.SGD(0.2), 2, alpha, 5)
        assert_close(params, fast[-1])
        assert_close(lo.slow_params(state, params), slow[-1])
    assert traces == 1


def test_traced_k_is_live_under_jit():
    """A k changed under inject_hyperparams applies from the next cycle (LookaheadState.period).

    The state was initialised with k=5, so the first cycle still syncs on call 5; the
    cycles after it have k=2.
    """
    tx = optax.inject_hyperparams(lo.lookahead)(optax.sgd(0.2), k=5, alpha=0.5)
    history, state = run(tx, 9, state_edit=_set_hyperparam("k", 2, jnp.int32))
    periods = ref.Lookahead(ref.SGD(0.2), k=lambda cycle: 5 if cycle == 0 else 2, alpha=0.5)
    expected = ref.run(periods, PROBLEM.leaves0(), PROBLEM.grad, 9)
    assert_matches(history, [s.params for s in expected], [s.state.slow for s in expected])
    assert int(state.inner_state.syncs) == 3  # calls 5, 7 and 9


# ---- optax.tree.map_params, masked, multi_transform ----


def test_tree_map_params_maps_the_slow_weights():
    tx = lo.lookahead(helpers.adam(0.1), k=3)
    params = initial_params()
    state = tx.init(params)
    _, state = tx.update(loss_grad(params), state, params)
    mapped = optax.tree.map_params(tx, lambda v: v.astype(jnp.bfloat16), state)
    for slow, before in zip(jax.tree.leaves(mapped.slow), jax.tree.leaves(state.slow)):
        assert slow.dtype == jnp.bfloat16
        np.testing.assert_array_equal(slow, before.astype(jnp.bfloat16))
    assert mapped.count.dtype == jnp.int32 and int(mapped.count) == 1
    mu = optax.tree_utils.tree_get(mapped.inner_state, "mu")
    assert {x.dtype for x in jax.tree.leaves(mu)} == {jnp.dtype(jnp.bfloat16)}
    assert optax.tree_utils.tree_get(mapped.inner_state, "count").dtype == jnp.int32


MASK = {"b": False, "w": False, "head": {"q": True}}
# In PROBLEM the quadratic head q and the logistic leaves (b, w) do not interact,
# so each group can be checked against its own reference run. Leaves: [b, q, w].
HEAD, LOGISTIC = [1], [0, 2]


def _assert_groups(history, head_fast, head_slow, logistic_fast):
    for (params, slow_params), hf, hs, lf in zip(history, head_fast, head_slow, logistic_fast):
        leaves, slow_leaves = jax.tree.leaves(params), jax.tree.leaves(slow_params)
        for i in HEAD:
            np.testing.assert_allclose(leaves[i], hf[i], **TOL)
            np.testing.assert_allclose(slow_leaves[i], hs[i], **TOL)
        for i in LOGISTIC:  # no lookahead here: slow_params gives the params back
            np.testing.assert_allclose(leaves[i], lf[i], **TOL)
            np.testing.assert_array_equal(slow_leaves[i], leaves[i])


def test_masked():
    not_mask = jax.tree.map(lambda m: not m, MASK)
    tx = optax.chain(
        optax.masked(lo.lookahead(optax.sgd(0.2), k=3, alpha=0.5), MASK),
        optax.masked(optax.sgd(0.2, momentum=0.9), not_mask),
    )
    history, _ = run(tx, 7)
    head_fast, head_slow = reference_lookahead(ref.SGD(0.2), 3, 0.5, 7)
    logistic = ref.inner_trajectory(PROBLEM.leaves0(), PROBLEM.grad, ref.Momentum(0.2, 0.9), 7)
    _assert_groups(history, head_fast, head_slow, logistic)


def test_multi_transform():
    labels = jax.tree.map(lambda m: "lookahead" if m else "plain", MASK)
    tx = optax.multi_transform(
        {
            "lookahead": lo.lookahead(optax.sgd(0.2), k=3, alpha=0.5),
            "plain": optax.sgd(0.2, momentum=0.9),
        },
        labels,
    )
    history, _ = run(tx, 7)
    head_fast, head_slow = reference_lookahead(ref.SGD(0.2), 3, 0.5, 7)
    logistic = ref.inner_trajectory(PROBLEM.leaves0(), PROBLEM.grad, ref.Momentum(0.2, 0.9), 7)
    _assert_groups(history, head_fast, head_slow, logistic)


# ---- slow_params finds the state everywhere ----


def _lookahead_sgd():
    return lo.lookahead(optax.sgd(0.2), k=3, alpha=0.5)


ALL_LEAVES = jax.tree.map(lambda _: True, MASK)
WRAPPED = {
    "plain": _lookahead_sgd,
    "chain": lambda: optax.chain(optax.identity(), _lookahead_sgd()),
    "inject_hyperparams": lambda: optax.inject_hyperparams(lo.lookahead)(
        optax.sgd(0.2), k=3, alpha=0.5
    ),
    "inject_hyperparams-chain": lambda: optax.inject_hyperparams(
        lambda learning_rate: optax.chain(optax.scale(learning_rate), _lookahead_sgd())
    )(learning_rate=1.0),
    "multisteps": lambda: helpers.multi_steps(_lookahead_sgd(), 1),
    "apply_if_finite": lambda: optax.apply_if_finite(_lookahead_sgd(), 3),
    "masked": lambda: optax.masked(_lookahead_sgd(), ALL_LEAVES),
    "multi_transform": lambda: optax.multi_transform(
        {"a": _lookahead_sgd()}, jax.tree.map(lambda _: "a", MASK)
    ),
}


@pytest.mark.parametrize("wrapped", WRAPPED)
def test_slow_params_finds_the_state(wrapped):
    history, state = run(WRAPPED[wrapped](), 4)
    _, slow = reference_lookahead(ref.SGD(0.2), 3, 0.5, 4)
    for (params, slow_params), want in zip(history, slow):
        assert_close(slow_params, want)
        assert jax.tree.structure(slow_params) == jax.tree.structure(params)
    # Pure: the same under jit.
    params = history[-1][0]
    assert_close(jax.jit(lo.slow_params)(state, params), slow[-1])


# ---- optax.lbfgs: value, grad and value_fn reach the inner optimizer ----


def _lbfgs():
    # A backtracking line search compiles much faster than the default zoom one
    # and needs the same extra arguments (value, grad, value_fn).
    linesearch = optax.scale_by_backtracking_linesearch(max_backtracking_steps=10, store_grad=True)
    return optax.lbfgs(linesearch=linesearch)


def _lbfgs_step(tx):
    value_and_grad = jax.value_and_grad(PROBLEM.loss)

    @jax.jit
    def step(params, state):
        value, grads = value_and_grad(params)
        updates, state = tx.update(
            grads, state, params, value=value, grad=grads, value_fn=PROBLEM.loss
        )
        return optax.apply_updates(params, updates), state

    return step


@pytest.mark.slow  # compiles lbfgs and its line search twice
def test_lookahead_of_lbfgs():
    k, alpha = 3, 0.5
    tx = lo.lookahead(_lbfgs(), k=k, alpha=alpha)
    step = _lbfgs_step(tx)
    params = initial_params()
    state = tx.init(params)
    # The reference runs Algorithm 1 around optax's own lbfgs step (in float32, given the
    # value, gradient and value_fn): the test is about the extra arguments reaching the
    # inner optimizer through Lookahead, not about lbfgs.
    lbfgs = _lbfgs()

    def lbfgs_update(grads, lbfgs_state, params):
        return lbfgs.update(
            grads,
            lbfgs_state,
            params,
            value=PROBLEM.loss(params),
            grad=grads,
            value_fn=PROBLEM.loss,
        )

    inner = helpers.JaxInner(lbfgs, jax.tree.structure(params), update=lbfgs_update)
    expected = ref.run(
        ref.Lookahead(inner, k, alpha, slow_dtype=np.float32, params_dtype=np.float32),
        PROBLEM.leaves0(),
        PROBLEM.grad,
        7,
        params_dtype=np.float32,
    )
    for want in expected:
        params, state = step(params, state)
        assert_close(params, want.params, rtol=1e-5, atol=1e-5)
        assert_close(lo.slow_params(state, params), want.state.slow, rtol=1e-5, atol=1e-5)
    # lbfgs really moved (the extra arguments reached it): the loss went down.
    assert float(PROBLEM.loss(params)) < 0.5 * float(PROBLEM.loss(initial_params()))


# ---- check_composition: what changes the updates after the lookahead ----


MISUSE = {
    "scale_by_learning_rate after": optax.chain(
        lo.lookahead(optax.scale_by_adam(), k=3), optax.scale_by_learning_rate(0.1)
    ),
    "weight decay after": optax.chain(
        lo.lookahead(optax.sgd(SGD_LR), k=3), optax.add_decayed_weights(1e-2)
    ),
    "clip after": optax.chain(lo.lookahead(optax.sgd(10.0), k=3), optax.clip(1e-3)),
}


GOOD = {
    "inside": lo.lookahead(
        optax.chain(optax.scale_by_adam(), optax.scale_by_learning_rate(0.1)), k=3
    ),
    "clip before": optax.chain(optax.clip_by_global_norm(1.0), lo.lookahead(optax.adam(0.1), k=3)),
    "decay inside": lo.lookahead(optax.adamw(0.1, weight_decay=1e-2), k=3),
    "MultiSteps around": optax.MultiSteps(lo.lookahead(optax.sgd(SGD_LR), k=3), every_k_schedule=3),
    "slow_dtype": lo.lookahead(optax.sgd(SGD_LR), k=3, slow_dtype=jnp.float32),
}


@pytest.mark.parametrize("name", MISUSE)
@standard_promotion_test
def test_check_composition_detects_what_changes_updates_after_lookahead(name):
    params = {"w": jnp.array([1.0, -2.0])}
    with pytest.raises(ValueError, match="something after the lookahead changed its updates"):
        lo.check_composition(MISUSE[name], params)


@pytest.mark.parametrize("name", GOOD)
@standard_promotion_test
def test_check_composition_accepts_the_correct_layouts(name):
    dtype = jnp.bfloat16 if name == "slow_dtype" else jnp.float32
    lo.check_composition(GOOD[name], {"w": jnp.array([1.0, -2.0], dtype)})


@standard_promotion_test
def test_the_silent_misuse_is_real():
    # What check_composition guards against: the slow weights climb while params fall.
    tx = MISUSE["scale_by_learning_rate after"]
    params = {"w": jnp.array([1.0, -2.0])}
    opt_state = tx.init(params)
    update = jax.jit(tx.update)
    for _ in range(6):  # two syncs
        updates, opt_state = update(params, opt_state, params)
        params = optax.apply_updates(params, updates)
    slow = lo.slow_params(opt_state, params)["w"]
    assert np.all(np.abs(slow) > np.array([1.0, 2.0]))  # climbed away from the minimum
    assert np.all(np.abs(params["w"]) < np.array([1.0, 2.0]))  # while the params fell


# ---- the same schedule as optax.lookahead ----


@pytest.mark.parametrize(("k", "alpha"), [(1, 0.5), (3, 0.5), (4, 0.8)])
def test_same_trajectory_as_optax_lookahead(k, alpha):
    """optax.lookahead keeps fast and slow weights in LookaheadParams; ours in the state."""
    theirs = helpers.standard_promotion(  # optax.lookahead is not strict-promotion clean
        optax.lookahead(optax.sgd(0.2, momentum=0.9), sync_period=k, slow_step_size=alpha)
    )
    wrapped = optax.LookaheadParams(fast=initial_params(), slow=initial_params())
    their_state = theirs.init(wrapped)
    their_update = jax.jit(theirs.update)
    history, _ = run(lo.lookahead(optax.sgd(0.2, momentum=0.9), k=k, alpha=alpha), 9)
    for params, slow in history:
        updates, their_state = their_update(loss_grad(wrapped.fast), their_state, wrapped)
        wrapped = optax.apply_updates(wrapped, updates)
        for got, want in zip(
            jax.tree.leaves((params, slow)), jax.tree.leaves((wrapped.fast, wrapped.slow))
        ):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# ---- check_composition's tolerance ----


@pytest.mark.parametrize("factor", [1 + 1e-4, 1 - 1e-4])
def test_check_composition_rejects_a_change_of_one_part_in_ten_thousand(factor):
    """A scale by 1 +- 1e-4 after the lookahead moves the params a few dozen ulps off the slow
    weights at a sync: rejected (a tolerance loosened to thousands of ulps, or 1e9, misses it),
    while the same lookahead alone lands within the tolerance."""
    params = initial_params()
    tx = lo.lookahead(optax.sgd(0.5), k=3)
    lo.check_composition(tx, params)
    with pytest.raises(ValueError, match=r"changed its updates: .* by [0-9.e+]+ ulps"):
        lo.check_composition(optax.chain(tx, optax.scale(factor)), params)

"""lookahead against the plain reference of Algorithm 1, and its behaviour under jax transforms."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lookahead_optax as lo
from tests import helpers
from tests import reference as ref
from tests.helpers import (
    F32_TOL,
    NUM_STEPS,
    PROBLEM,
    SGD_LR,
    assert_history_close,
    check_against_reference,
    initial_params,
    loss_grad,
    reference_sgd,
    standard_promotion_test,
)

pytestmark = pytest.mark.usefixtures("strict_promotion")
INNERS = helpers.REFERENCE_INNERS


def train_step(tx, params, state):
    updates, state = tx.update(loss_grad(params), state, params)
    return optax.apply_updates(params, updates), state


def run_history(tx, params, num_steps=NUM_STEPS):
    """Params, slow_params and state.slow after every step (stacked), one jit with lax.scan."""

    @jax.jit
    def run(params):
        def step(carry, _):
            params, state = train_step(tx, *carry)
            slow = state.slow if isinstance(state, lo.LookaheadState) else None
            return (params, state), (params, lo.slow_params(state, params), slow)

        _, history = jax.lax.scan(step, (params, tx.init(params)), length=num_steps)
        return history

    return run(params)


def run_inner_history(tx, params, num_steps=NUM_STEPS):
    @jax.jit
    def run(params):
        def step(carry, _):
            params, state = train_step(tx, *carry)
            return (params, state), params

        return jax.lax.scan(step, (params, tx.init(params)), length=num_steps)[1]

    return run(params)


@functools.partial(jax.jit, static_argnums=0)
def run_traced_history(inner_name, k, alpha, params):
    """run_history with k and alpha as traced arguments: one compile per inner optimizer."""
    tx = lo.lookahead(INNERS[inner_name][0](), k=k, alpha=alpha)

    def step(carry, _):
        params, state = train_step(tx, *carry)
        return (params, state), (params, lo.slow_params(state, params), state.slow)

    return jax.lax.scan(step, (params, tx.init(params)), length=NUM_STEPS)[1]


@pytest.mark.parametrize("alpha", [0.5, 0.8, 1.0])
@pytest.mark.parametrize("k", [1, 2, 3, 5])
@pytest.mark.parametrize("inner_name", INNERS)
def test_trajectory_matches_reference(inner_name, k, alpha):
    """The full grid, k and alpha traced (as under inject_hyperparams)."""
    history = run_traced_history(
        inner_name, jnp.asarray(k, jnp.int32), jnp.asarray(alpha, jnp.float32), initial_params()
    )
    check_against_reference(inner_name, k, alpha, history)


# The traced-k test above runs every (k, alpha) with one compile per inner optimizer; with
# static ones each case compiles: the quick set keeps one per inner optimizer.
@pytest.mark.parametrize(("k", "alpha"), [(3, 0.8), pytest.param(5, 0.5, marks=pytest.mark.slow)])
@pytest.mark.parametrize("inner_name", INNERS)
def test_trajectory_matches_reference_with_static_k_and_alpha(inner_name, k, alpha):
    """The usual call: k and alpha plain Python numbers."""
    tx = lo.lookahead(INNERS[inner_name][0](), k=k, alpha=alpha)
    check_against_reference(inner_name, k, alpha, run_history(tx, initial_params()))


def test_slow_weights_lag_between_syncs():
    """Before the first sync the slow weights are the initial params; the fast ones moved."""
    k = 5
    params, slow, _ = run_history(lo.lookahead(optax.sgd(0.1), k=k, alpha=0.5), initial_params())
    for p0, p, s in zip(
        jax.tree.leaves(initial_params()), jax.tree.leaves(params), jax.tree.leaves(slow)
    ):
        for step in range(k - 1):
            np.testing.assert_array_equal(s[step], p0)
            assert not np.allclose(p[step], p0)


@pytest.mark.parametrize("inner_name", INNERS)
def test_alpha_one_is_the_inner_optimizer(inner_name):
    k = 3
    make_inner, make_reference = INNERS[inner_name]
    params, _, _ = run_history(lo.lookahead(make_inner(), k=k, alpha=1.0), initial_params())
    alone = run_inner_history(make_inner(), initial_params())
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(alone)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    expected = ref.inner_trajectory(PROBLEM.leaves0(), PROBLEM.grad, make_reference(), NUM_STEPS)
    assert_history_close(params, expected, **F32_TOL)


@pytest.mark.parametrize(
    "alpha",
    [pytest.param(0.3, marks=pytest.mark.slow), 0.5, pytest.param(0.8, marks=pytest.mark.slow)],
)
def test_k_one_with_sgd_is_sgd_with_scaled_learning_rate(alpha):
    lr = 0.2
    params, slow, _ = run_history(lo.lookahead(optax.sgd(lr), k=1, alpha=alpha), initial_params())
    scaled = run_inner_history(optax.sgd(alpha * lr), initial_params())
    for got, got_slow, want in zip(*map(jax.tree.leaves, (params, slow, scaled))):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(got_slow, want, rtol=1e-6, atol=1e-6)
    expected = ref.inner_trajectory(PROBLEM.leaves0(), PROBLEM.grad, ref.SGD(alpha * lr), NUM_STEPS)
    assert_history_close(params, expected, **F32_TOL)


def test_non_sync_updates_are_exactly_the_inner_updates():
    k = 4
    inner = helpers.adam(0.05)
    tx = lo.lookahead(inner, k=k, alpha=0.5)
    params = initial_params()
    state = tx.init(params)
    update = jax.jit(tx.update)
    inner_update = jax.jit(inner.update)
    for step in range(1, 2 * k + 1):
        grads = loss_grad(params)
        expected, _ = inner_update(grads, state.inner_state, params)
        updates, state = update(grads, state, params)
        if step % k:
            for got, want in zip(jax.tree.leaves(updates), jax.tree.leaves(expected)):
                np.testing.assert_array_equal(got, want)
        params = optax.apply_updates(params, updates)
        assert int(state.count) == step % k
        assert int(state.syncs) == step // k


def test_initial_slow_weights_are_a_copy():
    params = initial_params()
    state = lo.lookahead(optax.sgd(0.1)).init(params)
    for p, s in zip(jax.tree.leaves(params), jax.tree.leaves(state.slow)):
        np.testing.assert_array_equal(p, s)
        assert s.dtype == p.dtype
        assert s.unsafe_buffer_pointer() != p.unsafe_buffer_pointer()
    assert jax.tree.structure(state.slow) == jax.tree.structure(params)


# ---- jax transforms: one trace, donation, scan, vmap ----


def test_one_trace_for_many_steps():
    traces = 0
    tx = lo.lookahead(helpers.adam(0.05), k=3, alpha=0.5)

    @jax.jit
    def step(params, state):
        nonlocal traces
        traces += 1  # runs only while tracing
        return train_step(tx, params, state)

    params = initial_params()
    state = tx.init(params)
    for _ in range(11):
        params, state = step(params, state)
    assert traces == 1
    assert int(state.syncs) == 3 and int(state.count) == 2


def test_donating_params_and_state():
    tx = lo.lookahead(optax.sgd(0.1, momentum=0.9), k=3, alpha=0.5)
    donated_step = jax.jit(lambda p, s: train_step(tx, p, s), donate_argnums=(0, 1))
    params = initial_params()
    state = tx.init(params)
    for _ in range(7):
        old_leaves = jax.tree.leaves((params, state))
        params, state = donated_step(params, state)
    # Donation really happened (the inputs were consumed), and without
    # "Attempt to donate the same buffer twice".
    assert any(leaf.is_deleted() for leaf in old_leaves)
    fast, slow = ref.lookahead_trajectory(
        PROBLEM.leaves0(), PROBLEM.grad, ref.Momentum(0.1, 0.9), 3, 0.5, 7
    )
    for got, want in zip(jax.tree.leaves(params), fast[-1]):
        np.testing.assert_allclose(got, want, **F32_TOL)
    for got, want in zip(jax.tree.leaves(state.slow), slow[-1]):
        np.testing.assert_allclose(got, want, **F32_TOL)


def test_donating_a_freshly_initialised_state():
    """init's slow weights must not alias params, or donation fails on the first step."""
    tx = lo.lookahead(optax.sgd(0.1), k=2)
    donated_step = jax.jit(lambda p, s: train_step(tx, p, s), donate_argnums=(0, 1))
    params = jax.tree.map(jnp.array, initial_params())
    params, state = donated_step(params, jax.jit(tx.init)(params))
    assert int(state.count) == 1


def test_scan_equals_python_loop():
    tx = lo.lookahead(helpers.adam(0.05), k=3, alpha=0.8)
    scanned, scanned_slow, _ = run_history(tx, initial_params())
    step = jax.jit(lambda p, s: train_step(tx, p, s))
    params = initial_params()
    state = tx.init(params)
    for t in range(NUM_STEPS):
        params, state = step(params, state)
        for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(scanned)):
            np.testing.assert_allclose(got, want[t], rtol=1e-6, atol=1e-7)
        for got, want in zip(jax.tree.leaves(state.slow), jax.tree.leaves(scanned_slow)):
            np.testing.assert_allclose(got, want[t], rtol=1e-6, atol=1e-7)


def test_vmap_over_an_ensemble_equals_separate_runs():
    tx = lo.lookahead(optax.sgd(0.1, momentum=0.9), k=3, alpha=0.5)
    offsets = jnp.array([0.0, 0.5, -1.0])
    ensemble = jax.tree.map(
        lambda p: p[None] + offsets.reshape((-1,) + (1,) * p.ndim), initial_params()
    )
    step = jax.jit(jax.vmap(lambda p, s: train_step(tx, p, s)))
    params, state = ensemble, jax.vmap(tx.init)(ensemble)
    for _ in range(8):
        params, state = step(params, state)
    slow = jax.vmap(lo.slow_params)(state, params)
    for member in range(len(offsets)):
        start = jax.tree.map(lambda p: p[member], ensemble)
        leaves0 = [np.asarray(x, np.float64) for x in jax.tree.leaves(start)]
        fast_ref, slow_ref = ref.lookahead_trajectory(
            leaves0, PROBLEM.grad, ref.Momentum(0.1, 0.9), 3, 0.5, 8
        )
        for got, want in zip(jax.tree.leaves(params), fast_ref[-1]):
            np.testing.assert_allclose(got[member], want, **F32_TOL)
        for got, want in zip(jax.tree.leaves(slow), slow_ref[-1]):
            np.testing.assert_allclose(got[member], want, **F32_TOL)


# ---- dtypes and non-float leaves ----


@pytest.mark.parametrize(  # 16-bit params are the case a promotion would change: float32 slow
    "dtype",
    [
        jnp.bfloat16,
        pytest.param(jnp.float16, marks=pytest.mark.slow),
        pytest.param(jnp.float32, marks=pytest.mark.slow),
    ],
)
@pytest.mark.parametrize("inner_name", INNERS)
def test_dtypes_are_preserved(inner_name, dtype):
    tx = lo.lookahead(INNERS[inner_name][0](), k=2, alpha=0.5)
    params = initial_params(dtype)
    state = tx.init(params)
    step = jax.jit(tx.update)
    for _ in range(3):  # a non-sync step, a sync step, a non-sync step
        grads = loss_grad(params)
        updates, state = step(grads, state, params)
        params = optax.apply_updates(params, updates)
        for tree in (updates, params, state.slow, lo.slow_params(state, params)):
            assert {leaf.dtype for leaf in jax.tree.leaves(tree)} == {jnp.dtype(dtype)}
        assert state.count.dtype == jnp.int32 and state.syncs.dtype == jnp.int32


def _noisy_guarded_sgd():
    """An inner optimizer whose state holds int, bool and typed PRNG-key leaves."""
    noise = helpers.standard_promotion(optax.add_noise(0.01, 0.55, jax.random.key(0)))
    return optax.apply_if_finite(optax.chain(noise, optax.sgd(0.1)), max_consecutive_errors=3)


def _non_float_leaves(tree):
    def is_non_float(x):
        return hasattr(x, "dtype") and not jnp.issubdtype(x.dtype, jnp.inexact)

    return [x for x in jax.tree.leaves(tree) if is_non_float(x)]


def test_int_bool_and_key_leaves_of_the_inner_state_are_untouched():
    """(tests/test_policies.py checks the same for the "reset" and "pullback" policies.)"""
    tx = lo.lookahead(_noisy_guarded_sgd(), k=2, alpha=0.5)
    inner = _noisy_guarded_sgd()
    params = initial_params()
    state, inner_alone = tx.init(params), inner.init(params)
    step, inner_step = jax.jit(tx.update), jax.jit(inner.update)
    for _ in range(5):
        grads = loss_grad(params)
        updates, state = step(grads, state, params)
        _, inner_alone = inner_step(grads, inner_alone, params)
        params = optax.apply_updates(params, updates)
    got, want = _non_float_leaves(state.inner_state), _non_float_leaves(inner_alone)
    dtypes = {str(x.dtype) for x in got}
    assert "bool" in dtypes and "int32" in dtypes and any("key" in d for d in dtypes)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype
        if jnp.issubdtype(g.dtype, jax.dtypes.prng_key):
            g, w = jax.random.key_data(g), jax.random.key_data(w)
        np.testing.assert_array_equal(g, w)


def test_counters_never_overflow():
    k = 3
    int32_max = np.iinfo(np.int32).max
    tx = lo.lookahead(optax.sgd(0.1), k=k, alpha=0.5)
    params = initial_params()
    state = tx.init(params)._replace(syncs=jnp.asarray(int32_max - 1, jnp.int32))
    step = jax.jit(lambda p, s: train_step(tx, p, s))
    for t in range(1, 4 * k + 1):
        params, state = step(params, state)
        assert 0 <= int(state.count) < k
        assert int(state.syncs) == (int32_max - 1 if t < k else int32_max)  # saturates
        assert state.syncs.dtype == jnp.int32
    # Syncing still happens at the saturated count.
    for p, s in zip(jax.tree.leaves(params), jax.tree.leaves(state.slow)):
        np.testing.assert_allclose(p, s, rtol=1e-6, atol=1e-6)


def test_a_count_beyond_k_syncs_on_the_next_step():
    """E.g. after k was lowered through inject_hyperparams: the next call syncs and wraps."""
    tx = lo.lookahead(optax.sgd(0.1), k=3, alpha=0.5)
    params = initial_params()
    state = tx.init(params)._replace(count=jnp.asarray(7, jnp.int32))
    params, state = train_step(tx, params, state)
    assert int(state.count) == 0 and int(state.syncs) == 1


# ---- leaves the lookahead leaves alone, and the period (0.2.0's defects) ----


def _add_one_to_integers():
    """SGD on floating leaves; integer leaves count up by one per step, bool leaves flip."""

    def update(updates, state, params=None):
        def leaf(u):
            if jnp.issubdtype(u.dtype, jnp.inexact):
                return -SGD_LR * u
            if u.dtype == jnp.bool_:
                return jnp.ones_like(u)  # apply_updates: p + 1 on a bool is a logical or
            return jnp.ones_like(u)

        return jax.tree.map(leaf, updates), state

    return optax.GradientTransformation(lambda p: optax.EmptyState(), update)


@standard_promotion_test
def test_non_floating_leaves_are_the_inner_optimizers_business():
    params = {"w": jnp.array([1.0, -2.0]), "n": jnp.array([0, 5], jnp.int32)}
    tx = lo.lookahead(_add_one_to_integers(), k=2, alpha=0.5)
    opt_state = tx.init(params)
    update = jax.jit(tx.update)
    for _ in range(5):
        updates, opt_state = update(params, opt_state, params)
        params = optax.apply_updates(params, updates)
    np.testing.assert_array_equal(params["n"], [5, 10])  # never snapped back
    np.testing.assert_array_equal(lo.slow_params(opt_state, params)["n"], [5, 10])
    fast, slow = reference_sgd(jnp.array([1.0, -2.0]), 2, 0.5, 5)
    np.testing.assert_allclose(params["w"], fast[-1], rtol=1e-6)
    # bool leaves with plain optax.sgd, which passes them through, do not crash.
    params = {"w": jnp.array([1.0, -2.0]), "flag": jnp.array([True, False])}
    tx = lo.lookahead(optax.sgd(SGD_LR), k=2)
    opt_state = tx.init(params)
    grads = {"w": params["w"], "flag": jnp.array([False, False])}
    for _ in range(3):
        updates, opt_state = jax.jit(tx.update)(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    np.testing.assert_array_equal(params["flag"], [True, False])


def test_python_float_params():
    tx = lo.lookahead(optax.sgd(SGD_LR), k=2, alpha=0.5)
    params = {"w": 1.5, "v": jnp.array([-2.0])}
    opt_state = tx.init(params)
    for _ in range(3):
        updates, opt_state = tx.update(params, opt_state, params)
        params = optax.apply_updates(params, updates)
    fast, slow = reference_sgd(np.array(1.5), 2, 0.5, 3)
    np.testing.assert_allclose(params["w"], fast[-1], rtol=1e-6)
    np.testing.assert_allclose(lo.slow_params(opt_state, params)["w"], slow[-1], rtol=1e-6)


@pytest.mark.parametrize("fused", [False, True])
def test_a_changed_k_takes_effect_from_the_next_cycle(fused):
    tx = optax.inject_hyperparams(lo.lookahead, static_args=("inner",))(
        optax.sgd(SGD_LR), k=2, alpha=0.5
    )
    params = {"w": jnp.array([1.0, -2.0])}
    opt_state = tx.init(params)
    sync_steps = []
    step = jax.jit(
        lambda p, s: (
            lo.update_and_apply(tx, p, s, p)
            if fused
            else (lambda u, s2: (optax.apply_updates(p, u), s2))(*tx.update(p, s, p))
        )
    )
    for n in range(1, 10):
        if n == 2:  # in the middle of the first cycle
            opt_state.hyperparams["k"] = jnp.asarray(3, jnp.int32)
        params, opt_state = step(params, opt_state)
        if int(opt_state.inner_state.count) == 0:
            sync_steps.append(n)
    assert sync_steps == [2, 5, 8]

"""outer=: the slow step as any optax transformation on the pseudo-gradient phi - theta_k."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lookahead_optax as lo
from tests import reference as ref

PROBLEM = ref.LogisticQuadratic()
NUM_STEPS = 13


def initial_params():
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), PROBLEM.params0)


def run(tx, fused=False, num_steps=NUM_STEPS, params=None):
    """(params, opt_state) after every step, one jitted step."""

    def step(params, opt_state):
        grads = jax.grad(PROBLEM.loss)(params)
        if fused:
            return lo.update_and_apply(tx, grads, opt_state, params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    step = jax.jit(step)
    params = initial_params() if params is None else params
    opt_state = tx.init(params)
    history = []
    for _ in range(num_steps):
        params, opt_state = step(params, opt_state)
        history.append((params, opt_state))
    return history


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize(
    "alpha", [0.5, 0.8, lambda j: 0.9 ** j.astype(jnp.float32)], ids=["0.5", "0.8", "schedule"]
)
def test_outer_sgd_is_alpha_bit_for_bit(alpha, fused):
    inner = lambda: optax.sgd(0.1, momentum=0.9)  # noqa: E731
    with_alpha = run(lo.lookahead(inner(), k=3, alpha=alpha), fused)
    with_outer = run(lo.lookahead(inner(), k=3, outer=optax.sgd(alpha)), fused)
    for (p_a, s_a), (p_o, s_o) in zip(with_alpha, with_outer):
        assert_trees_equal(p_a, p_o)
        assert_trees_equal(s_a.slow, s_o.slow)
        assert_trees_equal(s_a.inner_state, s_o.inner_state)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("inner_name", ["sgd", "adam"])
def test_nesterov_outer_matches_the_reference(inner_name, fused):
    """SNOO / DiLoCo's outer step: torch.optim.SGD(nesterov=True) on Delta = phi - theta_k."""
    lr, momentum, k = 0.7, 0.9, 3
    inner, ref_inner = {
        "sgd": (lambda: optax.sgd(0.1), ref.SGD(0.1)),
        "adam": (lambda: optax.adam(0.05), ref.Adam(0.05)),
    }[inner_name]
    tx = lo.lookahead(inner(), k=k, outer=optax.sgd(lr, momentum=momentum, nesterov=True))
    history = run(tx, fused)
    fast, slow = ref.outer_trajectory(
        PROBLEM.leaves0(), PROBLEM.grad, ref_inner, k, ref.NesterovSGD(lr, momentum), NUM_STEPS
    )
    for step, ((params, state), f, s) in enumerate(zip(history, fast, slow), start=1):
        for got, want in zip(jax.tree.leaves(params), f):
            np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5, err_msg=f"step {step}")
        for got, want in zip(jax.tree.leaves(lo.slow_params(state, params)), s):
            np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5, err_msg=f"step {step}")


def test_outer_state_changes_on_sync_steps_only():
    tx = lo.lookahead(optax.sgd(0.1), k=3, outer=optax.sgd(0.7, momentum=0.9, nesterov=True))
    history = run(tx)
    previous = tx.init(initial_params()).outer_state
    for step, (_, state) in enumerate(history, start=1):
        changed = any(
            not np.array_equal(a, b)
            for a, b in zip(jax.tree.leaves(state.outer_state), jax.tree.leaves(previous))
        )
        assert changed == (step % 3 == 0), f"step {step}"
        previous = state.outer_state


def test_any_optax_chain_is_an_outer_optimizer():
    outer = optax.chain(optax.clip_by_global_norm(0.05), optax.adam(0.1))
    tx = lo.lookahead(optax.sgd(0.1), k=2, outer=outer)
    params, state = run(tx, num_steps=6)[-1]
    # Right after a sync the params are the slow weights, which moved (Adam on clipped Delta).
    assert int(state.syncs) == 3
    assert_trees_equal(params, lo.slow_params(state, params))
    assert int(state.outer_state[1][0].count) == 3  # Adam's count counts syncs


def test_fused_equals_two_calls_with_a_nesterov_outer():
    make = lambda: lo.lookahead(  # noqa: E731
        optax.adam(0.05), k=3, outer=optax.sgd(0.7, momentum=0.9, nesterov=True)
    )
    for (p_f, s_f), (p_t, s_t) in zip(run(make(), fused=True), run(make())):
        for a, b in zip(jax.tree.leaves((p_f, s_f)), jax.tree.leaves((p_t, s_t))):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_outer_state_in_the_slow_dtype():
    params = {"w": jnp.array([1.0, -2.0], jnp.bfloat16)}
    tx = lo.lookahead(
        optax.sgd(0.1), k=2, outer=optax.sgd(0.7, momentum=0.9), slow_dtype=jnp.float32
    )
    state = tx.init(params)
    assert state.outer_state[0].trace["w"].dtype == jnp.float32
    for _ in range(4):
        updates, state = tx.update(params, state, params)
        params = optax.apply_updates(params, updates)
    assert state.outer_state[0].trace["w"].dtype == jnp.float32
    assert params["w"].dtype == jnp.bfloat16


def test_reset_and_inject_hyperparams_with_an_outer_optimizer():
    tx = optax.inject_hyperparams(lo.lookahead, static_args=("inner", "outer"))(
        optax.adam(0.05), k=2, outer=optax.sgd(0.7, momentum=0.5), inner_state="reset"
    )
    params, state = run(tx, num_steps=4)[-1]
    assert int(state.inner_state.syncs) == 2
    assert int(state.inner_state.inner_state[0].count) == 0  # Adam reset at the sync


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(outer="sgd"), TypeError, "outer must be an optax GradientTransformation"),
        (dict(outer=optax.sgd), TypeError, "outer must be .* call it"),
        (dict(outer=optax.sgd(0.7), alpha=0.5), ValueError, "outer replaces alpha"),
        (dict(outer=optax.sgd(0.7), inner_state="pullback"), ValueError, "pullback.*outer"),
    ],
)
def test_bad_outer_is_named(kwargs, error, message):
    with pytest.raises(error, match=message):
        lo.lookahead(optax.sgd(0.1), k=2, **kwargs)

"""outer=: the slow step as any optax transformation on the pseudo-gradient phi - theta_k."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lookahead_optax as lo
from tests import reference as ref
from tests.helpers import run_steps

PROBLEM = ref.LogisticQuadratic()
NUM_STEPS = 13


def initial_params():
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), PROBLEM.params0)


def run(tx, fused=False, num_steps=NUM_STEPS, params=None):
    """(params, opt_state) after every step, one jitted step."""
    params = initial_params() if params is None else params
    return run_steps(tx, params, jax.grad(PROBLEM.loss), num_steps, fused)


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


ALPHAS = {"0.5": 0.5, "0.8": 0.8, "schedule": lambda j: 0.9 ** j.astype(jnp.float32)}
# The quick set: a constant on the fused path and the schedule on tx.update; the rest slow.
QUICK_BIT_FOR_BIT = {("0.8", True), ("schedule", False)}


@pytest.mark.parametrize(
    ("alpha_name", "fused"),
    [
        case if case in QUICK_BIT_FOR_BIT else pytest.param(*case, marks=pytest.mark.slow)
        for case in [(name, fused) for name in ALPHAS for fused in (False, True)]
    ],
)
def test_outer_sgd_is_alpha_bit_for_bit(alpha_name, fused):
    alpha = ALPHAS[alpha_name]
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
    update = jax.jit(tx.update)
    for _ in range(4):
        updates, state = update(params, state, params)
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


# ---- everything that works with alpha works with outer= ----

NESTEROV = dict(outer=optax.sgd(0.7, momentum=0.9, nesterov=True))


def test_masked_and_multi_transform_with_an_outer_optimizer():
    """On 0.5 ||p||^2 (grads = params) the covered leaf moves as with the lookahead alone."""
    params = initial_params()
    make = lambda: lo.lookahead(optax.sgd(0.1), k=3, **NESTEROV)  # noqa: E731
    labels = {"w": "la", "b": "plain", "head": "plain"}
    runs = {
        "alone": (make(), {"w": params["w"]}),
        "masked": (optax.masked(make(), {k: v == "la" for k, v in labels.items()}), params),
        "multi_transform": (
            optax.multi_transform({"la": make(), "plain": optax.sgd(0.1)}, labels),
            params,
        ),
    }
    results = {}
    for name, (tx, p) in runs.items():
        s, update = tx.init(p), jax.jit(tx.update)
        for _ in range(7):
            u, s = update(p, s, p)
            p = optax.apply_updates(p, u)
        results[name] = (p, s)
    w_alone, state_alone = results.pop("alone")
    for name, (p, s) in results.items():
        np.testing.assert_array_equal(p["w"], w_alone["w"], err_msg=name)
        slow = lo.slow_params(s, p)
        np.testing.assert_array_equal(slow["w"], lo.slow_params(state_alone, w_alone)["w"])
        assert_trees_equal(slow["b"], p["b"])  # not covered: the params themselves


@pytest.mark.slow
def test_flax_train_state_and_nnx_optimizer_with_an_outer_optimizer():
    from flax import nnx
    from flax.training import train_state

    def make_tx():
        return lo.lookahead(optax.adam(0.05), k=2, **NESTEROV)

    model = nnx.Linear(3, 1, rngs=nnx.Rngs(0))
    x = jnp.linspace(-1.0, 1.0, 12).reshape(4, 3)

    def loss(model):
        return jnp.mean((model(x) - 1.0) ** 2)

    graphdef, params = nnx.split(model, nnx.Param)
    # Linen-style: a TrainState over the same weights as a plain dict.
    state = train_state.TrainState.create(
        apply_fn=None, params=nnx.to_pure_dict(params), tx=make_tx()
    )
    optimizer = nnx.Optimizer(model, make_tx(), wrt=nnx.Param)

    def pure_loss(values):
        weights = jax.tree.map(lambda v: v, params)
        nnx.replace_by_pure_dict(weights, values)
        return loss(nnx.merge(graphdef, weights))

    for _ in range(5):
        state = state.apply_gradients(grads=jax.grad(pure_loss)(state.params))
        optimizer.update(model, nnx.grad(loss)(model))
    assert int(state.opt_state.syncs) == 2
    slow_linen = lo.slow_params(state.opt_state, state.params)
    slow_nnx = lo.flax.nnx_slow_model(model, optimizer)
    np.testing.assert_allclose(slow_nnx.kernel[...], slow_linen["kernel"], rtol=1e-6)
    np.testing.assert_allclose(model.kernel[...], state.params["kernel"], rtol=1e-6)
    # Right after the sync at step 4 plus one step: the outer momentum is not zero.
    assert float(jnp.abs(state.opt_state.outer_state[0].trace["kernel"]).max()) > 0

"""The checks every optax.contrib optimizer must pass (optax/contrib/_common_test.py), for us.

Ported to pytest for lookahead wrapping SGD, SGD with momentum and Adam.
"""

import contextlib
import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lookahead_optax as lo
from tests import helpers

# Learning rates chosen so that 10_000 steps reach the contrib tests' tolerance
# on every target (Rosenbrock bounds the SGD step: its curvature is about 1000).
INNERS = {
    "sgd": lambda: optax.sgd(2e-3),
    "momentum": lambda: optax.sgd(5e-4, momentum=0.9),
    "adam": lambda: helpers.adam(5e-2),
}
NUM_STEPS = 10_000


pytestmark = pytest.mark.usefixtures("strict_promotion")


def make_lookahead(inner_name, **kwargs):
    return lo.lookahead(INNERS[inner_name](), k=5, alpha=0.5, **kwargs)


def parabola(dtype):
    final = jnp.array([1.0, -1.0, 1.0], dtype)
    return jnp.array([-1.0, 10.0, 1.0], dtype), final, lambda p: jnp.sum((p - final) ** 2)


def rosenbrock(dtype):
    def objective(p):
        return (1.0 - p[0]) ** 2 + 100.0 * (p[1] - p[0] ** 2) ** 2

    return jnp.zeros(2, dtype), jnp.ones(2, dtype), objective


def matrix_parabola(dtype):
    final = jnp.array([[3.0, -2.0], [1.0, 4.0]], dtype)
    return jnp.zeros((2, 2), dtype), final, lambda p: jnp.sum((p - final) ** 2)


def mixed_tensor_target(dtype):
    final = (jnp.array([1.0, -1.0, 2.0], dtype), jnp.array([[1.0, 0.0], [-1.0, 1.0]], dtype))

    def objective(p):
        return jnp.sum((p[0] - final[0]) ** 2) + jnp.sum((p[1] - final[1]) ** 2)

    return (jnp.zeros(3, dtype), jnp.zeros((2, 2), dtype)), final, objective


@contextlib.contextmanager
def compilations():
    """Collects jax's "Finished ... compilation" log messages inside the block."""
    messages = []

    class Collect(logging.Handler):
        def emit(self, record):
            if re.search(r"Finished .* compilation", record.getMessage()):
                messages.append(record.getMessage())

    handler = Collect()
    logger = logging.getLogger("jax")
    logger.addHandler(handler)
    try:
        with jax.log_compiles():
            yield messages
    finally:
        logger.removeHandler(handler)


@pytest.mark.parametrize("inner_name", INNERS)
def test_accepts_extra_args_and_does_not_recompile(inner_name):
    opt = make_lookahead(inner_name)
    initial_params, _, objective = rosenbrock(jnp.float32)

    @jax.jit
    def step(params, state):
        value, grads = jax.value_and_grad(objective)(params)
        updates, state = opt.update(
            grads, state, params, value=value, unexpected_extra_args_your_optimizer_doesnt_expect=1
        )
        return optax.apply_updates(params, updates), state

    params, state = initial_params, opt.init(initial_params)
    with compilations() as first_call:
        params, state = step(params, state)
    assert first_call, "the compilation log is not being captured"
    with compilations() as later_calls:
        for _ in range(6):  # across a sync
            params, state = step(params, state)
    assert later_calls == [], "lookahead recompiles on later calls to update"
    assert int(state.syncs) == 1


@pytest.mark.parametrize("target", [parabola, rosenbrock, matrix_parabola, mixed_tensor_target])
@pytest.mark.parametrize("inner_name", INNERS)
def test_converges_inside_scan(inner_name, target):
    opt = make_lookahead(inner_name)
    initial_params, final_params, objective = target(jnp.float32)
    state = opt.init(initial_params)
    # A no-op change, to check that tree_map_params works on the state.
    state = optax.tree.map_params(opt, lambda v: v, state)

    @jax.jit
    def run(params, state):
        def step(carry, _):
            params, state = carry
            updates, state = opt.update(jax.grad(objective)(params), state, params)
            return (optax.apply_updates(params, updates), state), None

        (params, state), _ = jax.lax.scan(step, (params, state), length=NUM_STEPS)
        return lo.slow_params(state, params)

    slow = run(initial_params, state)
    for got, want in zip(jax.tree.leaves(slow), jax.tree.leaves(final_params)):
        np.testing.assert_allclose(got, want, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("k", [pytest.param(1, marks=pytest.mark.slow), 5])
@pytest.mark.parametrize("inner_name", INNERS)
def test_inject_hyperparams_gives_the_same_updates(inner_name, k):
    opt = lo.lookahead(INNERS[inner_name](), k=k, alpha=0.5)
    opt_inject = optax.inject_hyperparams(lo.lookahead)(INNERS[inner_name](), k=k, alpha=0.5)
    params = [-jnp.ones((2, 3)), jnp.ones((2, 5, 2))]
    grads = [jnp.ones((2, 3)), -jnp.ones((2, 5, 2))]

    updates, new_state = jax.jit(opt.update)(grads, jax.jit(opt.init)(params), params)
    updates_inject, new_state_inject = jax.jit(opt_inject.update)(
        grads, jax.jit(opt_inject.init)(params), params
    )
    for got, want in zip(jax.tree.leaves(updates_inject), jax.tree.leaves(updates)):
        np.testing.assert_allclose(got, want, rtol=1e-5)
    assert jax.tree.structure(new_state_inject.inner_state) == jax.tree.structure(new_state)
    for got, want in zip(jax.tree.leaves(new_state_inject.inner_state), jax.tree.leaves(new_state)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("inner_name", INNERS)
def test_preserves_dtype(inner_name, dtype):
    opt = make_lookahead(inner_name)
    params = jnp.array([1.0, 2.0], dtype)
    grads = jax.grad(lambda x: jnp.sum(x**2))(params)
    updates, state = jax.jit(opt.update)(grads, jax.jit(opt.init)(params), params)
    assert updates.dtype == params.dtype
    assert lo.slow_params(state, params).dtype == params.dtype


@pytest.mark.parametrize("dtype", ["bfloat16", pytest.param("float32", marks=pytest.mark.slow)])
@pytest.mark.parametrize("inner_name", INNERS)
def test_gradient_accumulation_gives_zero_updates_on_micro_steps(inner_name, dtype):
    opt = helpers.multi_steps(make_lookahead(inner_name), every_k_schedule=4)
    params = jnp.array([1.0, 2.0], dtype)
    grads = jax.grad(lambda x: jnp.sum(x**2))(params)
    updates, _ = jax.jit(opt.update)(grads, jax.jit(opt.init)(params), params)
    assert updates.dtype == params.dtype
    np.testing.assert_array_equal(updates, jnp.zeros_like(grads))


@pytest.mark.parametrize(
    "dtype",
    [
        pytest.param(jnp.float16, marks=pytest.mark.slow),  # the quick set: bf16 and f32
        jnp.bfloat16,
        jnp.float32,
        pytest.param(jnp.float64, marks=pytest.mark.slow),
    ],
)
@pytest.mark.parametrize("inner_name", INNERS)
def test_state_dtypes_are_stable_under_cond(inner_name, dtype):
    with jax.enable_x64(dtype == jnp.float64):
        opt = lo.lookahead(INNERS[inner_name](), k=2, alpha=0.5)
        initial_params, _, objective = parabola(dtype)

        @jax.jit
        def step(params, state):
            grads = jax.grad(objective)(params)
            # lax.cond needs both branches to return the same types: the
            # updated state must have exactly the dtypes of the old one.
            cond = jax.random.randint(jax.random.key(0), (), 0, 2) == 0
            updates, state = jax.lax.cond(
                cond, lambda: opt.update(grads, state, params), lambda: (params, state)
            )
            return optax.apply_updates(params, updates), state

        params, state = initial_params, opt.init(initial_params)
        for _ in range(3):  # across a sync
            params, new_state = step(params, state)
            assert params.dtype == dtype
            cond = jax.random.randint(jax.random.key(0), (), 0, 2) == 0
            state = jax.lax.cond(cond, lambda s=state: s, lambda s=new_state: s)


def test_alpha_schedule_equals_the_constant():
    """The contrib "accepts a learning-rate schedule" check, for lookahead's alpha."""
    initial_params, _, objective = parabola(jnp.float32)
    trajectories = []
    for alpha in (optax.constant_schedule(0.5), 0.5):
        opt = lo.lookahead(optax.sgd(1e-2, momentum=0.9), k=3, alpha=alpha)
        params, state = initial_params, opt.init(initial_params)
        step = jax.jit(opt.update)
        for _ in range(10):
            updates, state = step(jax.grad(objective)(params), state, params)
            params = optax.apply_updates(params, updates)
        trajectories.append(params)
    np.testing.assert_allclose(trajectories[0], trajectories[1], rtol=1e-6)
    assert not np.allclose(trajectories[0], initial_params)

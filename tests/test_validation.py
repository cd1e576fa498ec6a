"""Bad input gets a ValueError naming the argument and the allowed values; traced values pass."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lookahead_optax as lo
from tests.helpers import SGD_LR

PARAMS = {"w": jnp.array([1.0, -2.0]), "b": jnp.array(0.5)}
K_MESSAGE = re.escape("k must be a positive int (1, 2, ..., 2**31 - 1)")
ALPHA_MESSAGE = re.escape("alpha must be a float in (0, 1], a schedule")


pytestmark = pytest.mark.usefixtures("strict_promotion")


@pytest.mark.parametrize("k", [0, -2, 2.5, 5.0, True, "5", None, jnp.array([2, 3])])
def test_bad_k(k):
    with pytest.raises(ValueError, match=K_MESSAGE) as error:
        lo.lookahead(optax.sgd(0.1), k=k)
    if not isinstance(k, jax.Array):
        assert f"got {k!r}" in str(error.value)


@pytest.mark.parametrize("alpha", [0, 0.0, -0.1, 1.5, math.nan, math.inf, "0.5", True, [0.5]])
def test_bad_alpha(alpha):
    with pytest.raises(ValueError, match=ALPHA_MESSAGE) as error:
        lo.lookahead(optax.sgd(0.1), alpha=alpha)
    assert f"got {alpha!r}" in str(error.value)


def test_bad_inner_state_names_the_choices():
    with pytest.raises(ValueError, match="inner_state must be one of") as error:
        lo.lookahead(optax.sgd(0.1), inner_state="bogus")
    for choice in ("keep", "reset", "pullback", "bogus"):
        assert choice in str(error.value)


def test_bad_slow_dtype():
    with pytest.raises(ValueError, match="slow_dtype must be a floating dtype"):
        lo.lookahead(optax.sgd(0.1), slow_dtype=jnp.int32)


@pytest.mark.parametrize(
    ("k", "alpha"),
    [
        (1, 1.0),
        (1, 1),
        (7, 1e-6),
        (np.int32(3), np.float32(0.5)),
        (jnp.asarray(4), jnp.asarray(0.8)),
    ],
)
def test_good_values_are_accepted(k, alpha):
    tx = lo.lookahead(optax.sgd(0.1), k=k, alpha=alpha)
    updates, _ = tx.update(PARAMS, tx.init(PARAMS), PARAMS)
    assert jax.tree.structure(updates) == jax.tree.structure(PARAMS)


def test_update_without_params():
    tx = lo.lookahead(optax.sgd(0.1))
    state = tx.init(PARAMS)
    with pytest.raises(ValueError, match=r"needs params.*tx\.update\(grads, opt_state, params\)"):
        tx.update(PARAMS, state)
    with pytest.raises(ValueError, match="needs params"):
        jax.jit(tx.update)(PARAMS, state)


@pytest.mark.parametrize(
    "params",
    [
        {"w": jnp.array([1.0, -2.0])},  # a leaf missing
        {"w": jnp.array([1.0, -2.0]), "bias": jnp.array(0.5)},  # a key renamed
        [jnp.array([1.0, -2.0]), jnp.array(0.5)],  # another container
    ],
)
def test_params_structure_differs_from_the_state(params):
    tx = lo.lookahead(optax.sgd(0.1))
    state = tx.init(PARAMS)
    with pytest.raises(ValueError, match="params must have the structure the state was"):
        tx.update(PARAMS, state, params)


def test_traced_k_and_alpha_skip_the_checks_and_work():
    """Under jit, k and alpha may be tracers: the Python-side checks must not crash."""

    @jax.jit
    def two_steps(k, alpha):
        tx = lo.lookahead(optax.sgd(0.5), k=k, alpha=alpha)
        params, state = PARAMS, tx.init(PARAMS)
        for _ in range(2):
            updates, state = tx.update(params, state, params)  # grads of 0.5 ||p||^2
            params = optax.apply_updates(params, updates)
        return params

    # k=2: two SGD steps scale params by 0.5**2, then the slow step keeps
    # 1 - alpha + alpha * 0.25 of the initial params.
    for k, alpha in [(2, 0.5), (2, 0.8)]:
        params = two_steps(jnp.asarray(k, jnp.int32), jnp.asarray(alpha, jnp.float32))
        for got, start in zip(jax.tree.leaves(params), jax.tree.leaves(PARAMS)):
            np.testing.assert_allclose(got, (1 - alpha + alpha * 0.25) * start, rtol=1e-6)
    # k=3: no sync yet, plain SGD.
    params = two_steps(jnp.asarray(3, jnp.int32), jnp.asarray(0.5, jnp.float32))
    for got, start in zip(jax.tree.leaves(params), jax.tree.leaves(PARAMS)):
        np.testing.assert_allclose(got, 0.25 * start, rtol=1e-6)


def test_traced_k_must_be_an_integer_scalar():
    with pytest.raises(ValueError, match="k must be a positive int, got a traced float32"):
        jax.jit(lambda k: lo.lookahead(optax.sgd(0.1), k=k).init(PARAMS))(jnp.asarray(2.0))


def test_inject_hyperparams_under_jit():
    tx = optax.inject_hyperparams(lo.lookahead)(optax.sgd(0.1), k=3, alpha=0.5)
    state = jax.jit(tx.init)(PARAMS)
    updates, state = jax.jit(tx.update)(PARAMS, state, PARAMS)
    assert int(state.inner_state.count) == 1
    assert jax.tree.structure(updates) == jax.tree.structure(PARAMS)


def test_slow_params_without_a_lookahead_state():
    state = optax.adam(0.1).init(PARAMS)
    with pytest.raises(ValueError, match="slow_params found no LookaheadState in opt_state"):
        lo.slow_params(state, PARAMS)
    with pytest.raises(ValueError, match="no LookaheadState"):
        lo.slow_params((), PARAMS)


# ---- errors that name the mistake (0.2.0's defects) ----


@pytest.mark.parametrize(
    "k", [2**31, np.int64(np.iinfo(np.int64).max), np.uint32(2**32 - 1), 10**12]
)
def test_k_beyond_int32_is_an_error(k):
    with pytest.raises(ValueError, match=r"k must be a positive int \(1, 2, \.\.\., 2\*\*31 - 1\)"):
        lo.lookahead(optax.sgd(SGD_LR), k=k)


@pytest.mark.parametrize("k", [np.int64(3), np.uint32(3), 2**31 - 1])
def test_k_numpy_and_largest_ints_work(k):
    tx = lo.lookahead(optax.sgd(SGD_LR), k=k)
    params = {"w": jnp.array([1.0, -2.0])}
    opt_state = tx.init(params)
    for _ in range(3):
        updates, opt_state = tx.update(params, opt_state, params)
    assert int(opt_state.syncs) == (1 if int(k) == 3 else 0)


@pytest.mark.parametrize("inner", [optax.adam, None, "adam", 0.1])
def test_inner_must_be_a_transformation(inner):
    with pytest.raises(TypeError, match="inner must be an optax GradientTransformation") as error:
        lo.lookahead(inner)
    if inner is optax.adam:
        assert "call it" in str(error.value)


@pytest.mark.parametrize(
    ("alpha", "message"),
    [
        (lambda: 0.5, r"alpha\(0\) raised"),
        (lambda j: 2.0, r"alpha\(0\) returned 2.0"),
        (lambda j: jnp.where(j > 0, 1.5, 0.5), r"alpha\(1\) returned"),
        (lambda j: jnp.ones(3), r"alpha\(0\) returned"),
    ],
)
def test_a_callable_alpha_must_be_a_schedule_into_the_unit_interval(alpha, message):
    with pytest.raises(ValueError, match=message):
        lo.lookahead(optax.sgd(SGD_LR), alpha=alpha)


def test_grads_or_params_of_other_shapes_are_named():
    tx = lo.lookahead(optax.sgd(SGD_LR), k=2)
    params = {"w": jnp.ones(3)}
    opt_state = tx.init(params)
    with pytest.raises(ValueError, match=r"grads \(updates\) must have the leaf shapes.*\(4,\)"):
        tx.update({"w": jnp.ones(4)}, opt_state, params)
    with pytest.raises(ValueError, match=r"params must have the leaf shapes.*\['w'\].*\(4,\)"):
        tx.update(params, opt_state, {"w": jnp.ones(4)})
    with pytest.raises(ValueError, match="params must have the structure"):
        tx.update(params, opt_state, {"v": jnp.ones(3)})


def test_a_state_of_another_transformation_is_named():
    tx = lo.lookahead(optax.sgd(SGD_LR))
    params = {"w": jnp.ones(3)}
    with pytest.raises(ValueError, match="opt_state must be the LookaheadState.*got tuple"):
        tx.update(params, optax.adam(0.1).init(params), params)


def test_slow_params_with_other_shapes_is_an_error():
    tx = lo.lookahead(optax.sgd(SGD_LR))
    opt_state = tx.init({"w": jnp.ones(3)})
    with pytest.raises(ValueError, match=r"leaf shapes.*\(4,\)"):
        lo.slow_params(opt_state, {"w": jnp.ones(4)})
    with pytest.raises(ValueError, match="structure"):
        lo.slow_params(opt_state, {"v": jnp.ones(3)})


def test_adaptive_alpha_accepts_numpy_scalars():
    assert lo.adaptive_alpha(np.float32(0.1)).alpha_min == pytest.approx(0.1)
    with pytest.raises(ValueError, match="alpha_min"):
        lo.adaptive_alpha(True)

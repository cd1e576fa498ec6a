"""What new users broke in 0.2.0: each test failed there and guards the fix.

Trajectories are compared with the one reference, tests/reference.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lookahead_optax as lo
from tests import reference as ref

LR = 0.1


def quadratic_grads(params):
    """Gradient of 0.5 * ||w||^2 on every floating leaf: the params themselves."""
    return params


def reference_sgd(w0, k, alpha, num_steps):
    """(fast, slow) after every step for SGD(LR) on 0.5 ||w||^2, from tests/reference.py."""
    fast, slow = ref.lookahead_trajectory(
        [np.asarray(w0)], lambda leaves: leaves, ref.SGD(LR), k, alpha, num_steps
    )
    return [f[0] for f in fast], [s[0] for s in slow]


# ---- 1. the fused path: data through arguments, effects once ----


def _jit_wrapped(la):
    """A wrapper that jits the update it wraps (and forwards no extra arguments)."""
    jitted = jax.jit(la.update)
    return optax.GradientTransformationExtraArgs(
        la.init, lambda u, s, p=None, **kw: jitted(u, s, p)
    )


def test_a_nested_jit_neither_stops_the_syncs_nor_poisons_tx_update():
    la = lo.lookahead(optax.sgd(LR), k=2, alpha=0.5)
    tx = _jit_wrapped(la)
    w0 = jnp.array([1.0, -2.0])
    fast, slow = reference_sgd(w0, 2, 0.5, 8)
    params = {"w": w0}
    opt_state = tx.init(params)
    for step in range(4):
        params, opt_state = lo.update_and_apply(tx, params, opt_state, params)
        np.testing.assert_allclose(params["w"], fast[step], rtol=1e-6)
    assert int(opt_state.syncs) == 2
    for step in range(4, 8):  # plain tx.update in the same process, same jit cache
        updates, opt_state = tx.update(params, opt_state, params)
        params = optax.apply_updates(params, updates)
        np.testing.assert_allclose(params["w"], fast[step], rtol=1e-6)
        np.testing.assert_allclose(lo.slow_params(opt_state, params)["w"], slow[step], rtol=1e-6)
    assert int(opt_state.syncs) == 4
    # The plain lookahead traced in the same process is unaffected too.
    opt_state = la.init({"w": w0})
    params = {"w": w0}
    for _ in range(4):
        updates, opt_state = jax.jit(la.update)(params, opt_state, params)
        params = optax.apply_updates(params, updates)
    assert int(opt_state.syncs) == 2


def _counting(calls):
    """A stateless transformation that records each executed update with a callback."""

    def update(updates, state, params=None):
        jax.debug.callback(lambda: calls.append(1))
        return updates, state

    return optax.GradientTransformation(lambda p: optax.EmptyState(), update)


@pytest.mark.parametrize("where", ["inside", "outside"])
@pytest.mark.parametrize("path", ["update_and_apply", "tx.update", "eager update_and_apply"])
def test_effects_run_once_per_step(where, path):
    calls = []
    counter = _counting(calls)
    if where == "inside":
        tx = lo.lookahead(optax.chain(counter, optax.sgd(LR)), k=2)
    else:
        tx = optax.chain(counter, lo.lookahead(optax.sgd(LR), k=2))

    def step(params, opt_state):
        if path == "tx.update":
            updates, opt_state = tx.update(params, opt_state, params)
            return optax.apply_updates(params, updates), opt_state
        return lo.update_and_apply(tx, params, opt_state, params)

    if path != "eager update_and_apply":
        step = jax.jit(step)
    params = {"w": jnp.array([1.0, -2.0])}
    opt_state = tx.init(params)
    for n in range(1, 6):  # syncs at 2 and 4
        params, opt_state = step(params, opt_state)
        jax.effects_barrier()
        assert len(calls) == n
    fast, _ = reference_sgd(jnp.array([1.0, -2.0]), 2, 0.5, 5)
    np.testing.assert_allclose(params["w"], fast[-1], rtol=1e-6)


def _two_lookaheads():
    return optax.multi_transform(
        {"a": lo.lookahead(optax.sgd(LR), k=2), "b": lo.lookahead(optax.sgd(LR), k=3)},
        {"w": "a", "v": "b"},
    )


FUSED = {
    "lookahead": (lambda: lo.lookahead(optax.sgd(LR), k=2), True),
    "chain": (lambda: optax.chain(optax.clip(1.0), lo.lookahead(optax.sgd(LR), k=2)), True),
    "inject_hyperparams": (
        lambda: optax.inject_hyperparams(lo.lookahead, static_args=("inner",))(
            optax.sgd(LR), k=2, alpha=0.5
        ),
        True,
    ),
    "apply_if_finite": (lambda: optax.apply_if_finite(lo.lookahead(optax.sgd(LR), k=2), 3), True),
    "masked": (
        lambda: optax.masked(lo.lookahead(optax.sgd(LR), k=2), {"w": True, "v": False}),
        True,
    ),
    "nested lookaheads": (lambda: lo.lookahead(lo.lookahead(optax.sgd(LR), k=2), k=3), True),
    "MultiSteps": (lambda: optax.MultiSteps(lo.lookahead(optax.sgd(LR), k=2), 2), False),
    "two lookaheads": (_two_lookaheads, False),
    "jitted wrapper": (lambda: _jit_wrapped(lo.lookahead(optax.sgd(LR), k=2)), False),
    "no lookahead": (lambda: optax.sgd(LR), False),
}


@pytest.mark.parametrize("name", FUSED)
def test_which_compositions_take_the_fused_path(name):
    make, expected = FUSED[name]
    tx = make()
    params = {"w": jnp.array([1.0, -2.0]), "v": jnp.array([0.5])}
    opt_state = tx.init(params)
    assert lo.fused_path_taken(tx, params, opt_state, params) is expected

    # The fallback is exactly the two calls; the fused path is another program.
    def two_calls(p, s):
        updates, s = tx.update(p, s, p)
        return optax.apply_updates(p, updates), s

    fused = jax.make_jaxpr(lambda p, s: lo.update_and_apply(tx, p, s, p))(params, opt_state)
    plain = jax.make_jaxpr(two_calls)(params, opt_state)
    assert (str(fused) != str(plain)) == expected


# ---- 2. wrong results without an error ----


def test_pullback_leaves_scalars_alone_reduce_on_plateau():
    inner = optax.chain(optax.sgd(LR), optax.contrib.reduce_on_plateau(patience=2))
    tx = lo.lookahead(inner, k=2, inner_state="pullback")
    params = {"w": jnp.array([1.0, -2.0])}
    opt_state = tx.init(params)
    for _ in range(6):
        value = 0.5 * jnp.sum(params["w"] ** 2)
        updates, opt_state = tx.update(params, opt_state, params, value=value)
        params = optax.apply_updates(params, updates)
    plateau = opt_state.inner_state[1]
    assert np.isfinite(plateau.best_value) and float(plateau.best_value) > 0
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(opt_state))


def test_pullback_keeps_an_injected_learning_rate_the_user_set():
    inner = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.9)
    tx = lo.lookahead(inner, k=2, alpha=0.5, inner_state="pullback")
    params = {"w": jnp.array([1.0, -2.0])}
    opt_state = tx.init(params)
    hyperparams = opt_state.inner_state.hyperparams
    hyperparams["learning_rate"] = jnp.asarray(0.01, hyperparams["learning_rate"].dtype)
    for _ in range(4):
        updates, opt_state = tx.update(params, opt_state, params)
        params = optax.apply_updates(params, updates)
    assert int(opt_state.syncs) == 2
    assert float(opt_state.inner_state.hyperparams["learning_rate"]) == pytest.approx(0.01)
    # ... while the momentum trace (params-shaped) is pulled back: it differs from "keep".
    keep = lo.lookahead(inner, k=2, alpha=0.5)
    keep_state = keep.init({"w": jnp.array([1.0, -2.0])})
    keep_state.inner_state.hyperparams["learning_rate"] = jnp.asarray(0.01, jnp.float32)
    p = {"w": jnp.array([1.0, -2.0])}
    for _ in range(4):
        updates, keep_state = keep.update(p, keep_state, p)
        p = optax.apply_updates(p, updates)
    trace, keep_trace = (
        opt_state.inner_state.inner_state[0].trace,
        keep_state.inner_state.inner_state[0].trace,
    )
    assert not np.allclose(trace["w"], keep_trace["w"])


@pytest.mark.parametrize("policy", ["pullback", "reset"])
def test_a_policy_that_cannot_find_the_params_shaped_leaves_says_so(policy):
    tx = lo.lookahead(optax.lbfgs(), k=2, inner_state=policy)
    with pytest.raises(ValueError, match=f'inner_state="{policy}".*tree_map_params.*"keep"'):
        tx.init({"w": jnp.array([1.0, -2.0])})


def test_reset_keeps_the_schedule_and_restarts_the_moments():
    schedule = optax.linear_schedule(0.1, 0.0, 20)
    tx = lo.lookahead(optax.adam(schedule), k=3, inner_state="reset")
    params = {"w": jnp.array([1.0, -2.0])}
    opt_state = tx.init(params)
    for _ in range(7):
        updates, opt_state = tx.update(params, opt_state, params)
        params = optax.apply_updates(params, updates)
    adam_state, schedule_state = opt_state.inner_state
    assert int(schedule_state.count) == 7  # the learning rate keeps decaying across syncs
    assert int(adam_state.count) == 1  # Adam restarted at the sync after step 6
    # Injected hyperparameters the user changed survive a reset.
    tx = lo.lookahead(
        optax.inject_hyperparams(optax.sgd)(learning_rate=0.1), k=2, inner_state="reset"
    )
    opt_state = tx.init(params)
    opt_state.inner_state.hyperparams["learning_rate"] = jnp.asarray(0.01, jnp.float32)
    for _ in range(4):
        updates, opt_state = tx.update(params, opt_state, params)
    assert float(opt_state.inner_state.hyperparams["learning_rate"]) == pytest.approx(0.01)
    assert int(opt_state.inner_state.count) == 4


MISUSE = {
    "scale_by_learning_rate after": optax.chain(
        lo.lookahead(optax.scale_by_adam(), k=3), optax.scale_by_learning_rate(0.1)
    ),
    "weight decay after": optax.chain(
        lo.lookahead(optax.sgd(LR), k=3), optax.add_decayed_weights(1e-2)
    ),
    "clip after": optax.chain(lo.lookahead(optax.sgd(10.0), k=3), optax.clip(1e-3)),
}
GOOD = {
    "inside": lo.lookahead(
        optax.chain(optax.scale_by_adam(), optax.scale_by_learning_rate(0.1)), k=3
    ),
    "clip before": optax.chain(optax.clip_by_global_norm(1.0), lo.lookahead(optax.adam(0.1), k=3)),
    "decay inside": lo.lookahead(optax.adamw(0.1, weight_decay=1e-2), k=3),
    "MultiSteps around": optax.MultiSteps(lo.lookahead(optax.sgd(LR), k=3), every_k_schedule=3),
    "slow_dtype": lo.lookahead(optax.sgd(LR), k=3, slow_dtype=jnp.float32),
}


@pytest.mark.parametrize("name", MISUSE)
def test_check_composition_detects_what_changes_updates_after_lookahead(name):
    params = {"w": jnp.array([1.0, -2.0])}
    with pytest.raises(ValueError, match="something after the lookahead changed its updates"):
        lo.check_composition(MISUSE[name], params)


@pytest.mark.parametrize("name", GOOD)
def test_check_composition_accepts_the_correct_layouts(name):
    dtype = jnp.bfloat16 if name == "slow_dtype" else jnp.float32
    lo.check_composition(GOOD[name], {"w": jnp.array([1.0, -2.0], dtype)})


def test_the_silent_misuse_is_real():
    # What check_composition guards against: the slow weights climb while params fall.
    tx = MISUSE["scale_by_learning_rate after"]
    params = {"w": jnp.array([1.0, -2.0])}
    opt_state = tx.init(params)
    for _ in range(6):  # two syncs
        updates, opt_state = tx.update(params, opt_state, params)
        params = optax.apply_updates(params, updates)
    slow = lo.slow_params(opt_state, params)["w"]
    assert np.all(np.abs(slow) > np.array([1.0, 2.0]))  # climbed away from the minimum
    assert np.all(np.abs(params["w"]) < np.array([1.0, 2.0]))  # while the params fell


def test_inject_hyperparams_with_a_slow_dtype_is_an_error_unless_static():
    params = {"w": jnp.array([1.0, -2.0], jnp.bfloat16)}
    tx = optax.inject_hyperparams(lo.lookahead)(optax.sgd(LR), slow_dtype=jnp.float32)
    with pytest.raises(ValueError, match="slow_dtype.*static_args"):
        tx.init(params)
    tx = optax.inject_hyperparams(lo.lookahead, static_args=("slow_dtype",))(
        optax.sgd(LR), slow_dtype=jnp.float32
    )
    assert tx.init(params).inner_state.slow["w"].dtype == jnp.float32


def test_complex_params_keep_their_imaginary_part():
    w0 = jnp.array([1.0 + 2.0j, -0.5j], jnp.complex64)
    tx = lo.lookahead(optax.sgd(LR), k=2, alpha=0.5, slow_dtype=jnp.float32)
    params = {"w": w0}
    opt_state = tx.init(params)
    assert opt_state.slow["w"].dtype == jnp.complex64
    for _ in range(2):
        updates, opt_state = tx.update(params, opt_state, params)
        params = optax.apply_updates(params, updates)
    # SGD on 0.5 |w|^2 has real coefficients: real and imaginary parts evolve apart.
    real, imag = (reference_sgd(np.asarray(part(w0)), 2, 0.5, 2) for part in (jnp.real, jnp.imag))
    fast = [r + 1j * i for r, i in zip(real[0], imag[0])]
    slow = [r + 1j * i for r, i in zip(real[1], imag[1])]
    np.testing.assert_allclose(lo.slow_params(opt_state, params)["w"], slow[-1], rtol=1e-6)
    np.testing.assert_allclose(params["w"], fast[-1], rtol=1e-6)


def _add_one_to_integers():
    """SGD on floating leaves; integer leaves count up by one per step, bool leaves flip."""

    def update(updates, state, params=None):
        def leaf(u):
            if jnp.issubdtype(u.dtype, jnp.inexact):
                return -LR * u
            if u.dtype == jnp.bool_:
                return jnp.ones_like(u)  # apply_updates: p + 1 on a bool is a logical or
            return jnp.ones_like(u)

        return jax.tree.map(leaf, updates), state

    return optax.GradientTransformation(lambda p: optax.EmptyState(), update)


def test_non_floating_leaves_are_the_inner_optimizers_business():
    params = {"w": jnp.array([1.0, -2.0]), "n": jnp.array([0, 5], jnp.int32)}
    tx = lo.lookahead(_add_one_to_integers(), k=2, alpha=0.5)
    opt_state = tx.init(params)
    for _ in range(5):
        updates, opt_state = tx.update(params, opt_state, params)
        params = optax.apply_updates(params, updates)
    np.testing.assert_array_equal(params["n"], [5, 10])  # never snapped back
    np.testing.assert_array_equal(lo.slow_params(opt_state, params)["n"], [5, 10])
    fast, slow = reference_sgd(jnp.array([1.0, -2.0]), 2, 0.5, 5)
    np.testing.assert_allclose(params["w"], fast[-1], rtol=1e-6)
    # bool leaves with plain optax.sgd, which passes them through, do not crash.
    params = {"w": jnp.array([1.0, -2.0]), "flag": jnp.array([True, False])}
    tx = lo.lookahead(optax.sgd(LR), k=2)
    opt_state = tx.init(params)
    grads = {"w": params["w"], "flag": jnp.array([False, False])}
    for _ in range(3):
        updates, opt_state = jax.jit(tx.update)(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    np.testing.assert_array_equal(params["flag"], [True, False])


@pytest.mark.parametrize(
    "k", [2**31, np.int64(np.iinfo(np.int64).max), np.uint32(2**32 - 1), 10**12]
)
def test_k_beyond_int32_is_an_error(k):
    with pytest.raises(ValueError, match=r"k must be a positive int \(1, 2, \.\.\., 2\*\*31 - 1\)"):
        lo.lookahead(optax.sgd(LR), k=k)


@pytest.mark.parametrize("k", [np.int64(3), np.uint32(3), 2**31 - 1])
def test_k_numpy_and_largest_ints_work(k):
    tx = lo.lookahead(optax.sgd(LR), k=k)
    params = {"w": jnp.array([1.0, -2.0])}
    opt_state = tx.init(params)
    for _ in range(3):
        updates, opt_state = tx.update(params, opt_state, params)
    assert int(opt_state.syncs) == (1 if int(k) == 3 else 0)


def test_adaptive_alpha_under_strict_promotion_with_bf16_params():
    params = {"w": jnp.array([1.0, -2.0, 0.5], jnp.bfloat16)}
    tx = lo.lookahead(optax.sgd(LR), k=2, alpha=lo.adaptive_alpha(curvature="ema"))
    opt_state = tx.init(params)
    with jax.numpy_dtype_promotion("strict"):
        for _ in range(4):
            updates, opt_state = tx.update(params, opt_state, params)
            params = optax.apply_updates(params, updates)
    assert int(opt_state.syncs) == 2 and params["w"].dtype == jnp.bfloat16


@pytest.mark.parametrize("fused", [False, True])
def test_f32_params_with_bf16_grads_land_exactly_on_the_slow_weights(fused):
    params = {"w": jnp.array([1.0, -2.0, 0.3], jnp.float32)}
    tx = lo.lookahead(optax.sgd(LR), k=3, alpha=0.5)
    opt_state = tx.init(params)
    for _ in range(3):
        grads = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
        if fused:
            params, opt_state = lo.update_and_apply(tx, grads, opt_state, params)
        else:
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
    assert int(opt_state.syncs) == 1
    np.testing.assert_array_equal(params["w"], lo.slow_params(opt_state, params)["w"])


# ---- the period: a new k takes effect from the next cycle, on both paths ----


@pytest.mark.parametrize("fused", [False, True])
def test_a_changed_k_takes_effect_from_the_next_cycle(fused):
    tx = optax.inject_hyperparams(lo.lookahead, static_args=("inner",))(
        optax.sgd(LR), k=2, alpha=0.5
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


# ---- 3. errors that name the mistake ----


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
        lo.lookahead(optax.sgd(LR), alpha=alpha)


def test_grads_or_params_of_other_shapes_are_named():
    tx = lo.lookahead(optax.sgd(LR), k=2)
    params = {"w": jnp.ones(3)}
    opt_state = tx.init(params)
    with pytest.raises(ValueError, match=r"grads \(updates\) must have the leaf shapes.*\(4,\)"):
        tx.update({"w": jnp.ones(4)}, opt_state, params)
    with pytest.raises(ValueError, match=r"params must have the leaf shapes.*\['w'\].*\(4,\)"):
        tx.update(params, opt_state, {"w": jnp.ones(4)})
    with pytest.raises(ValueError, match="params must have the structure"):
        tx.update(params, opt_state, {"v": jnp.ones(3)})


def test_a_state_of_another_transformation_is_named():
    tx = lo.lookahead(optax.sgd(LR))
    params = {"w": jnp.ones(3)}
    with pytest.raises(ValueError, match="opt_state must be the LookaheadState.*got tuple"):
        tx.update(params, optax.adam(0.1).init(params), params)


def test_slow_params_with_other_shapes_is_an_error():
    tx = lo.lookahead(optax.sgd(LR))
    opt_state = tx.init({"w": jnp.ones(3)})
    with pytest.raises(ValueError, match=r"leaf shapes.*\(4,\)"):
        lo.slow_params(opt_state, {"w": jnp.ones(4)})
    with pytest.raises(ValueError, match="structure"):
        lo.slow_params(opt_state, {"v": jnp.ones(3)})


def test_adaptive_alpha_accepts_numpy_scalars():
    assert lo.adaptive_alpha(np.float32(0.1)).alpha_min == pytest.approx(0.1)
    with pytest.raises(ValueError, match="alpha_min"):
        lo.adaptive_alpha(True)


def test_python_float_params():
    tx = lo.lookahead(optax.sgd(LR), k=2, alpha=0.5)
    params = {"w": 1.5, "v": jnp.array([-2.0])}
    opt_state = tx.init(params)
    for _ in range(3):
        updates, opt_state = tx.update(params, opt_state, params)
        params = optax.apply_updates(params, updates)
    fast, slow = reference_sgd(np.array(1.5), 2, 0.5, 3)
    np.testing.assert_allclose(params["w"], fast[-1], rtol=1e-6)
    np.testing.assert_allclose(lo.slow_params(opt_state, params)["w"], slow[-1], rtol=1e-6)

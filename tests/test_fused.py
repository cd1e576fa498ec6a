"""update_and_apply: the same steps as tx.update + apply_updates, one fused program per case."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lookahead_optax as lo
from benchmarks import _hlo
from tests.helpers import (
    CONFIGURATIONS,
    LEAF_SIZES,
    MEMORY_INNERS,
    PROBLEM,
    SGD_LR,
    SHARDED_INNERS,
    check_against_reference,
    configuration_history,
    fused_step,
    initial_params,
    loss_grad,
    make_params,
    quick_few,
    reference_sgd,
    run_steps,
    shard,
    standard_promotion_test,
    temp_bytes,
    tree_bytes,
    two_call_step,
)
from tests.helpers import REFERENCE_INNERS as INNERS

pytestmark = pytest.mark.usefixtures("strict_promotion")


@pytest.mark.parametrize(
    ("k", "alpha"),
    # test_lookahead.py checks every k and alpha through tx.update; here one of them runs quick.
    [
        pytest.param(1, 0.5, marks=pytest.mark.slow),
        (3, 0.8),
        pytest.param(5, 0.5, marks=pytest.mark.slow),
    ],
)
@pytest.mark.parametrize("inner_name", INNERS)
def test_trajectory_matches_reference(inner_name, k, alpha):
    tx = lo.lookahead(INNERS[inner_name][0](), k=k, alpha=alpha)
    history = run_steps(tx, initial_params(), fused=True)
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *history)
    params, state = stacked
    slow = jax.vmap(lo.slow_params)(state, params)
    check_against_reference(inner_name, k, alpha, (params, slow, state.slow))


# The quick set: one of each path through update_and_apply (the plain and adaptive syncs, the
# inner-state policies, a wrapper that forwards the hint, one that discards a step, a masked
# lookahead, the refused MultiSteps and no lookahead); the whole suite runs all.
QUICK_EQUALS = [
    "adam", "pullback", "adaptive_alpha", "slow_dtype", "inject_hyperparams",
    "apply_if_finite", "masked", "multi_steps", "no_lookahead",
]  # fmt: skip


@pytest.mark.parametrize("name", quick_few(CONFIGURATIONS, QUICK_EQUALS))
def test_equals_update_then_apply(name):
    # Equal up to rounding: XLA fuses the two programs differently, which can move a
    # result by an ulp (the global norm's sum, a multiply-add).
    fused = run_steps(CONFIGURATIONS[name](), initial_params(), fused=True)
    two_calls = configuration_history(name)
    for step, (got, want) in enumerate(zip(fused, two_calls), start=1):
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            if jnp.issubdtype(a.dtype, jnp.inexact):
                np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7, err_msg=f"step {step}")
            else:  # counters: exactly
                np.testing.assert_array_equal(a, b, err_msg=f"step {step}")


def test_vmap_over_an_ensemble_equals_separate_runs():
    # Under vmap the step count is batched, so both branches run and a select picks: slower,
    # still the same steps.
    tx = lo.lookahead(optax.sgd(0.1, momentum=0.9), k=2)
    starts = [initial_params(), jax.tree.map(lambda x: 0.5 * x, initial_params())]

    def steps(params, num_steps=5):
        def body(_, carry):
            params, opt_state = carry
            return fused_step(params, opt_state, loss_grad(params), tx)

        return jax.lax.fori_loop(0, num_steps, body, (params, tx.init(params)))[0]

    batched = jax.jit(jax.vmap(steps))(jax.tree.map(lambda *xs: jnp.stack(xs), *starts))
    for i, start in enumerate(starts):
        for a, b in zip(jax.tree.leaves(batched), jax.tree.leaves(jax.jit(steps)(start))):
            np.testing.assert_allclose(a[i], b, rtol=1e-6, atol=1e-7)


def _sgd_scaled_by_the_value():
    """SGD whose step is scaled by the loss value, an extra argument it requires."""

    def update(updates, state, params=None, *, value, grad, value_fn):
        del params, value_fn
        return jax.tree.map(lambda u, g: -0.1 * value * (u + g) / 2, updates, grad), state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)


def _lbfgs():
    linesearch = optax.scale_by_backtracking_linesearch(max_backtracking_steps=10, store_grad=True)
    return optax.lbfgs(linesearch=linesearch)


@pytest.mark.parametrize(
    "inner",
    [
        _sgd_scaled_by_the_value,
        pytest.param(_lbfgs, marks=pytest.mark.slow),  # compiles lbfgs and its line search twice
    ],
    ids=["scaled_by_value", "lbfgs"],
)
def test_extra_args_reach_the_inner_optimizer(inner):
    tx = lo.lookahead(inner(), k=3)
    value_and_grad = jax.value_and_grad(PROBLEM.loss)

    def steps(step_fn):
        @jax.jit
        def step(params, opt_state):
            value, grads = value_and_grad(params)
            extra = dict(value=value, grad=grads, value_fn=PROBLEM.loss)
            return step_fn(params, opt_state, grads, tx, **extra)

        params = initial_params()
        opt_state = tx.init(params)
        for _ in range(7):
            params, opt_state = step(params, opt_state)
        return params

    with jax.numpy_dtype_promotion("standard"):  # optax's line search is not strict-clean
        got, want = steps(fused_step), steps(two_call_step)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


# ---- the compiled program ----


def _slow_uses_per_branch(tx, params):
    """Per branch of the step's top-level cond, how many equations read the slow weights."""
    opt_state = tx.init(params)
    closed = jax.make_jaxpr(fused_step, static_argnums=3)(params, opt_state, params, tx)
    jaxpr = closed.jaxpr
    paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(opt_state)[0]]
    first_state_var = len(jax.tree.leaves(params))
    slow_vars = {
        jaxpr.invars[first_state_var + i]
        for i, path in enumerate(paths)
        if any(getattr(key, "name", None) == "slow" for key in path)
    }
    assert len(slow_vars) == len(LEAF_SIZES)
    (cond,) = [eqn for eqn in jaxpr.eqns if eqn.primitive.name == "cond"]
    operands = cond.invars[1:]
    uses = []
    for branch in cond.params["branches"]:
        slow_in_branch = {
            var for var, operand in zip(branch.jaxpr.invars, operands) if operand in slow_vars
        }
        uses.append(
            sum(
                any(var in slow_in_branch for var in eqn.invars if type(var).__name__ != "Literal")
                for eqn in branch.jaxpr.eqns
            )
        )
    return uses


@pytest.mark.parametrize("inner_name", ["adam", "sgd_momentum"])
def test_a_non_sync_step_never_reads_the_slow_weights(inner_name):
    tx = lo.lookahead(SHARDED_INNERS[inner_name](), k=4)
    with jax.numpy_dtype_promotion("standard"):
        not_synced, synced = _slow_uses_per_branch(tx, make_params())
    assert not_synced == 0
    assert synced >= len(LEAF_SIZES)  # the sync reads every slow leaf


@pytest.mark.parametrize("inner_name", ["adam", "sgd_momentum", "clip_adamw"])
def test_no_temp_buffer_and_no_params_sized_copy(inner_name):
    params = make_params()
    tx = lo.lookahead(MEMORY_INNERS[inner_name](), k=4)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.01), params)
    with jax.numpy_dtype_promotion("standard"):  # optax's adam is not strict-clean
        compiled = (
            jax.jit(fused_step, static_argnums=3, donate_argnums=(0, 1))
            .lower(params, tx.init(params), grads, tx)
            .compile()
        )
        inner_temp = temp_bytes(inner_name, False)
    extra_temp = compiled.memory_analysis().temp_size_in_bytes - inner_temp
    assert extra_temp <= 0.01 * tree_bytes(params)
    assert _hlo.large_copies(compiled.as_text(), min(LEAF_SIZES.values())) == []


def test_a_collective_inside_the_inner_optimizer_runs_once_per_step(mesh):
    # tx.update repeats it in its sync branch (test_sharding); here each branch of the one
    # cond is a whole step, so either branch holds the inner optimizer's collectives once.
    inner = SHARDED_INNERS["clip_adam"]
    params = shard(make_params(), mesh)
    compiled_text = {}
    for name, tx in [("inner", inner()), ("lookahead", lo.lookahead(inner(), k=3))]:
        opt_state = jax.jit(tx.init)(params)
        with jax.numpy_dtype_promotion("standard"):
            lowered = jax.jit(fused_step, static_argnums=3).lower(params, opt_state, params, tx)
        compiled_text[name] = lowered.compile().as_text()
    inner_counts = _hlo.count_collectives(compiled_text["inner"])
    assert inner_counts["all-reduce"] > 0
    text = compiled_text["lookahead"]
    (branch_names,) = _hlo.branches(text)
    computations = _hlo.computations(text)
    per_branch = [_hlo.count_collectives(computations[name]) for name in branch_names]
    assert per_branch == [inner_counts, inner_counts]
    assert _hlo.count_collectives(text) == inner_counts + inner_counts
    assert collections.Counter() not in per_branch


# ---- through wrappers: data through arguments, effects once (0.2.0's defects) ----


def _jit_wrapped(la):
    """A wrapper that jits the update it wraps (and forwards no extra arguments)."""
    jitted = jax.jit(la.update)
    return optax.GradientTransformationExtraArgs(
        la.init, lambda u, s, p=None, **kw: jitted(u, s, p)
    )


def test_a_nested_jit_neither_stops_the_syncs_nor_poisons_tx_update():
    la = lo.lookahead(optax.sgd(SGD_LR), k=2, alpha=0.5)
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


@pytest.mark.parametrize(
    ("where", "path"),
    [
        (where, path)
        if (where, path) != ("outside", "eager update_and_apply")
        # Eagerly every op compiles on its own: the quick set runs the eager path once.
        else pytest.param(where, path, marks=pytest.mark.slow)
        for path in ["update_and_apply", "tx.update", "eager update_and_apply"]
        for where in ["inside", "outside"]
    ],
)
def test_effects_run_once_per_step(where, path):
    calls = []
    counter = _counting(calls)
    if where == "inside":
        tx = lo.lookahead(optax.chain(counter, optax.sgd(SGD_LR)), k=2)
    else:
        tx = optax.chain(counter, lo.lookahead(optax.sgd(SGD_LR), k=2))

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


@pytest.mark.parametrize(("sync", "traces"), [(None, 2), (True, 1), (False, 2)])
def test_update_and_apply_traces_the_inner_update_once_per_case(sync, traces):
    # The fused path's probe trace is replayed as the synced case, not traced again.
    traced = []
    sgd = optax.sgd(SGD_LR)

    def update(updates, state, params=None):
        traced.append(1)
        return sgd.update(updates, state, params)

    tx = optax.chain(optax.clip(1.0), lo.lookahead(optax.GradientTransformation(sgd.init, update)))
    params = {"w": jnp.array([1.0, -2.0])}
    jax.jit(lambda p, s: lo.update_and_apply(tx, p, s, p, sync=sync)).lower(params, tx.init(params))
    assert len(traced) == traces


def _two_lookaheads():
    return optax.multi_transform(
        {"a": lo.lookahead(optax.sgd(SGD_LR), k=2), "b": lo.lookahead(optax.sgd(SGD_LR), k=3)},
        {"w": "a", "v": "b"},
    )


FUSED = {
    "lookahead": (lambda: lo.lookahead(optax.sgd(SGD_LR), k=2), True),
    "chain": (lambda: optax.chain(optax.clip(1.0), lo.lookahead(optax.sgd(SGD_LR), k=2)), True),
    "inject_hyperparams": (
        lambda: optax.inject_hyperparams(lo.lookahead, static_args=("inner",))(
            optax.sgd(SGD_LR), k=2, alpha=0.5
        ),
        True,
    ),
    "apply_if_finite": (
        lambda: optax.apply_if_finite(lo.lookahead(optax.sgd(SGD_LR), k=2), 3),
        True,
    ),
    "masked": (
        lambda: optax.masked(lo.lookahead(optax.sgd(SGD_LR), k=2), {"w": True, "v": False}),
        True,
    ),
    "nested lookaheads": (lambda: lo.lookahead(lo.lookahead(optax.sgd(SGD_LR), k=2), k=3), True),
    "MultiSteps": (lambda: optax.MultiSteps(lo.lookahead(optax.sgd(SGD_LR), k=2), 2), False),
    "two lookaheads": (_two_lookaheads, False),
    "jitted wrapper": (lambda: _jit_wrapped(lo.lookahead(optax.sgd(SGD_LR), k=2)), False),
    "no lookahead": (lambda: optax.sgd(SGD_LR), False),
}


@pytest.mark.parametrize("name", FUSED)
@standard_promotion_test
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


@pytest.mark.parametrize("workers", [None, 3])
@pytest.mark.parametrize("outer", [None, "nesterov"])
def test_update_and_apply_lands_exactly_on_the_slow_weights(workers, outer):
    """After a sync, params == slow weights bit for bit (MaxText sets replicas to the global
    weights); tx.update's p + (phi - p) only gets within half an ulp of |phi - p|."""
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(41, 20)), jnp.float32)}
    if workers:
        params = jax.tree.map(
            lambda p: p + jnp.arange(workers, dtype=p.dtype).reshape(-1, 1, 1),
            lo.replicate(params, workers),
        )
    kwargs = {} if outer is None else dict(outer=optax.sgd(0.7, momentum=0.9, nesterov=True))
    tx = lo.lookahead(optax.sgd(0.3, momentum=0.9), k=2, workers=workers, **kwargs)
    state = tx.init(params)
    step = jax.jit(lambda p, s: lo.update_and_apply(tx, jax.tree.map(jnp.cos, p), s, p))
    for n in range(4):
        params, state = step(params, state)
        if n % 2 == 1:
            slow = lo.slow_params(state, params)["w"]
            expected = np.broadcast_to(np.asarray(slow), params["w"].shape)
            np.testing.assert_array_equal(np.asarray(params["w"]), expected)


def test_update_and_apply_does_not_land_when_a_wrapper_discards_the_sync():
    tx = optax.apply_if_finite(lo.lookahead(optax.sgd(0.1), k=1), max_consecutive_errors=5)
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    bad = {"w": jnp.asarray([jnp.nan, 1.0, 1.0])}
    params = {"w": 2 * jnp.ones(3)}  # away from the slow weights (ones)
    new_params, state = lo.update_and_apply(tx, bad, state, params)
    np.testing.assert_array_equal(new_params["w"], 2 * np.ones(3))

"""update_and_apply: the same steps as tx.update + apply_updates, one fused program per case."""

import collections
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lookahead_optax as lo
from tests import helpers
from tests.test_lookahead import (
    INNERS,
    NUM_STEPS,
    PROBLEM,
    check_against_reference,
    initial_params,
    loss_grad,
)
from tests.test_memory import LEAF_SIZES, large_copies, make_params, temp_bytes, tree_bytes
from tests.test_sharding import INNER_OPTIMIZERS, count_collectives, mesh  # noqa: F401 (fixture)
from tests.test_sharding import _shard as shard


@pytest.fixture(autouse=True, scope="module")
def strict_promotion():
    with jax.numpy_dtype_promotion("strict"):
        yield


def fused_step(params, opt_state, grads, tx, **extra_args):
    return lo.update_and_apply(tx, grads, opt_state, params, **extra_args)


def two_call_step(params, opt_state, grads, tx, **extra_args):
    updates, opt_state = tx.update(grads, opt_state, params, **extra_args)
    return optax.apply_updates(params, updates), opt_state


def run(tx, step_fn, num_steps=NUM_STEPS):
    """(params, opt_state) after every step, each step jitted on its own."""
    step = jax.jit(lambda p, s: step_fn(p, s, loss_grad(p), tx))
    params = initial_params()
    opt_state = tx.init(params)
    history = []
    for _ in range(num_steps):
        params, opt_state = step(params, opt_state)
        history.append((params, opt_state))
    return history


@pytest.mark.parametrize(("k", "alpha"), [(1, 0.5), (3, 0.8), (5, 0.5)])
@pytest.mark.parametrize("inner_name", INNERS)
def test_trajectory_matches_reference(inner_name, k, alpha):
    tx = lo.lookahead(INNERS[inner_name][0](), k=k, alpha=alpha)
    history = run(tx, fused_step)
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *history)
    params, state = stacked
    slow = jax.vmap(lo.slow_params)(state, params)
    check_against_reference(inner_name, k, alpha, (params, slow, state.slow))


def _multi_transform():
    # Two lookaheads, one per parameter group: update_and_apply takes the two-call path.
    transforms = {
        "slow": lo.lookahead(optax.sgd(0.1, momentum=0.9), k=2),
        "fast": lo.lookahead(helpers.adam(0.05), k=3),
    }
    return optax.multi_transform(
        transforms, lambda p: {k: "slow" if k == "w" else "fast" for k in p}
    )


CONFIGURATIONS = {
    "sgd": lambda: lo.lookahead(optax.sgd(0.1), k=3, alpha=0.5),
    "momentum": lambda: lo.lookahead(optax.sgd(0.1, momentum=0.9), k=3, alpha=0.8),
    "adam": lambda: lo.lookahead(helpers.adam(0.05), k=2, alpha=0.5),
    "reset": lambda: lo.lookahead(helpers.adam(0.05), k=3, inner_state="reset"),
    "pullback": lambda: lo.lookahead(helpers.adam(0.05), k=3, inner_state="pullback"),
    "alpha_schedule": lambda: lo.lookahead(
        optax.sgd(0.1), k=2, alpha=lambda j: 0.9 ** j.astype(jnp.float32)
    ),
    "adaptive_alpha": lambda: lo.lookahead(optax.sgd(0.1), k=3, alpha=lo.adaptive_alpha()),
    "slow_dtype": lambda: lo.lookahead(helpers.adam(0.05), k=3, slow_dtype=jnp.float32),
    "clip_then_lookahead": lambda: optax.chain(
        optax.clip_by_global_norm(0.5), lo.lookahead(helpers.adam(0.05), 3)
    ),
    "inject_hyperparams": lambda: helpers.standard_promotion(
        optax.inject_hyperparams(lambda k, alpha: lo.lookahead(optax.adam(0.05), k, alpha))(
            k=3, alpha=0.5
        )
    ),
    "apply_if_finite": lambda: helpers.standard_promotion(
        optax.apply_if_finite(lo.lookahead(optax.adam(0.05), k=3), max_consecutive_errors=2)
    ),
    "masked": lambda: optax.masked(
        lo.lookahead(optax.sgd(0.1, momentum=0.9), k=2), lambda p: {k: k != "b" for k in p}
    ),
    # Lookahead under MultiSteps' cond: the two-call path.
    "multi_steps": lambda: helpers.standard_promotion(
        optax.MultiSteps(lo.lookahead(optax.adam(0.05), k=2), every_k_schedule=2)
    ),
    "multi_transform": _multi_transform,
    "no_lookahead": lambda: helpers.adam(0.05),
}


@pytest.mark.parametrize("name", CONFIGURATIONS)
def test_equals_update_then_apply(name):
    # Equal up to rounding: XLA fuses the two programs differently, which can move a
    # result by an ulp (the global norm's sum, a multiply-add).
    fused = run(CONFIGURATIONS[name](), fused_step)
    two_calls = run(CONFIGURATIONS[name](), two_call_step)
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
        opt_state = tx.init(params)
        for _ in range(num_steps):
            params, opt_state = fused_step(params, opt_state, loss_grad(params), tx)
        return params

    batched = jax.jit(jax.vmap(steps))(jax.tree.map(lambda *xs: jnp.stack(xs), *starts))
    for i, start in enumerate(starts):
        for a, b in zip(jax.tree.leaves(batched), jax.tree.leaves(jax.jit(steps)(start))):
            np.testing.assert_allclose(a[i], b, rtol=1e-6, atol=1e-7)


def test_extra_args_reach_the_inner_optimizer():
    linesearch = optax.scale_by_backtracking_linesearch(max_backtracking_steps=10, store_grad=True)
    tx = lo.lookahead(optax.lbfgs(linesearch=linesearch), k=3)
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
    tx = lo.lookahead(INNER_OPTIMIZERS[inner_name](), k=4)
    with jax.numpy_dtype_promotion("standard"):
        not_synced, synced = _slow_uses_per_branch(tx, make_params())
    assert not_synced == 0
    assert synced >= len(LEAF_SIZES)  # the sync reads every slow leaf


@pytest.mark.parametrize("inner_name", ["adam", "sgd_momentum", "clip_adamw"])
def test_no_temp_buffer_and_no_params_sized_copy(inner_name):
    from tests.test_memory import INNERS as MEMORY_INNERS

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
    assert large_copies(compiled.as_text(), min(LEAF_SIZES.values())) == []


def test_a_collective_inside_the_inner_optimizer_runs_once_per_step(mesh):  # noqa: F811
    # tx.update repeats it in its sync branch (test_sharding); here each branch of the one
    # cond is a whole step, so either branch holds the inner optimizer's collectives once.
    inner = INNER_OPTIMIZERS["clip_adam"]
    params = shard(make_params(), mesh)
    compiled_text = {}
    for name, tx in [("inner", inner()), ("lookahead", lo.lookahead(inner(), k=3))]:
        opt_state = jax.jit(tx.init)(params)
        with jax.numpy_dtype_promotion("standard"):
            lowered = jax.jit(fused_step, static_argnums=3).lower(params, opt_state, params, tx)
        compiled_text[name] = lowered.compile().as_text()
    inner_counts = count_collectives(compiled_text["inner"])
    assert inner_counts["all-reduce"] > 0
    text = compiled_text["lookahead"]
    (branch_names,) = re.findall(r"branch_computations=\{([^}]*)\}", text)
    computations = {c.split(" ", 1)[0]: c for c in re.split(r"\n(?=\S)", text)}
    per_branch = [count_collectives(computations[n.strip()]) for n in branch_names.split(",")]
    assert per_branch == [inner_counts, inner_counts]
    assert count_collectives(text) == inner_counts + inner_counts
    assert collections.Counter() not in per_branch

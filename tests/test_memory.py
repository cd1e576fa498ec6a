"""Memory of a jitted Lookahead step, from the compiled program (deterministic, no timing).

Lookahead stores one params-sized copy (the slow weights) and should need no other
params-sized memory: no temporary buffer for the inner update and no copies of the
inner state. Each test compares the compiled step of ``lookahead(inner)`` with the
compiled step of ``inner`` alone, params and state donated as in a training loop.
"""

import jax
import jax.numpy as jnp
import pytest

import lookahead_optax as lo
from benchmarks._hlo import large_copies
from tests.helpers import (
    LEAF_SIZES,
    compiled_step,
    make_params,
    temp_bytes,
    tree_bytes,
    two_call_step,
)
from tests.helpers import MEMORY_INNERS as INNERS
from tests.helpers import MEMORY_K as K


@pytest.mark.parametrize("inner_name", sorted(INNERS))
def test_temp_memory_exceeds_the_inner_steps_by_under_one_percent_of_params(inner_name):
    extra_temp = temp_bytes(inner_name, True) - temp_bytes(inner_name, False)
    assert extra_temp <= 0.01 * tree_bytes(make_params())


@pytest.mark.parametrize("inner_name", sorted(INNERS))
def test_compiled_step_copies_no_params_sized_buffer(inner_name):
    hlo = compiled_step(inner_name, True).as_text()
    copies = large_copies(hlo, min(LEAF_SIZES.values()))
    assert copies == []


@pytest.mark.parametrize("inner_name", sorted(INNERS))
def test_state_is_the_inner_state_plus_one_copy_of_params(inner_name):
    params = make_params()
    inner = INNERS[inner_name]()
    state = lo.lookahead(inner, k=K).init(params)
    extra = tree_bytes(state) - tree_bytes(inner.init(params))
    scalars = tree_bytes((state.count, state.syncs, state.period))
    assert extra == tree_bytes(params) + scalars
    # The compiled step's arguments grow by the same amount (nothing hidden in constants).
    inner_args = compiled_step(inner_name, False).memory_analysis().argument_size_in_bytes
    lookahead_args = compiled_step(inner_name, True).memory_analysis().argument_size_in_bytes
    assert lookahead_args - inner_args == extra


def test_fp32_slow_weights_of_bf16_params_cost_one_fp32_copy_and_no_temp():
    params = make_params(jnp.bfloat16)
    inner = INNERS["adam"]()
    tx = lo.lookahead(inner, k=K, slow_dtype=jnp.float32)
    extra = tree_bytes(tx.init(params)) - tree_bytes(inner.init(params))
    assert extra == 2 * tree_bytes(params) + 12  # fp32 is twice bf16; count, syncs, period
    extra_temp = temp_bytes("adam", True, jnp.bfloat16, jnp.float32) - temp_bytes(
        "adam", False, jnp.bfloat16
    )
    assert extra_temp <= 0.01 * tree_bytes(params)


def test_one_compilation_serves_every_step_syncs_included():
    traces = []

    def step(params, opt_state, grads):
        traces.append(1)
        return two_call_step(params, opt_state, grads, tx)

    tx = lo.lookahead(INNERS["adam"](), k=K)
    params = make_params()
    opt_state = tx.init(params)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.01), params)
    jitted = jax.jit(step, donate_argnums=(0, 1))
    for _ in range(3 * K + 1):
        params, opt_state = jitted(params, opt_state, grads)
    assert len(traces) == 1
    assert int(opt_state.syncs) == 3

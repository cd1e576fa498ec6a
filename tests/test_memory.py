"""Memory of a jitted Lookahead step, from the compiled program (deterministic, no timing).

Lookahead stores one params-sized copy (the slow weights) and should need no other
params-sized memory: no temporary buffer for the inner update and no copies of the
inner state. Each test compares the compiled step of ``lookahead(inner)`` with the
compiled step of ``inner`` alone, params and state donated as in a training loop.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lookahead_optax as lo

K = 4
# Distinct leaf sizes, so a params-sized buffer of any one leaf is visible.
LEAF_SIZES = {"embed": 98_304, "dense": 65_536, "bias": 4_096, "out": 131_072}
INNERS = {
    "adam": lambda: optax.adam(1e-3),
    "sgd_momentum": lambda: optax.sgd(1e-3, momentum=0.9),
    # A global-norm reduction and weight decay (reads params) before the update.
    "clip_adamw": lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3)),
    # Factored second moments: state leaves not shaped like the params.
    "adafactor": lambda: optax.adafactor(1e-3),
}


def make_params(dtype=jnp.float32):
    return {
        name: jnp.linspace(-1.0, 1.0, size, dtype=jnp.float32).astype(dtype)
        for name, size in LEAF_SIZES.items()
    }


def tree_bytes(tree) -> int:
    return sum(np.dtype(x.dtype).itemsize * x.size for x in jax.tree.leaves(tree))


def train_step(tx):
    def step(params, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return step


def compile_step(tx, params):
    opt_state = tx.init(params)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.01), params)
    step = jax.jit(train_step(tx), donate_argnums=(0, 1))
    return step.lower(params, opt_state, grads).compile()


@functools.cache
def compiled_step(inner_name: str, with_lookahead: bool, dtype=jnp.float32, slow_dtype=None):
    """The compiled step of inner (or of lookahead around it), shared across tests."""
    tx = INNERS[inner_name]()
    if with_lookahead:
        tx = lo.lookahead(tx, k=K, slow_dtype=slow_dtype)
    return compile_step(tx, make_params(dtype))


def temp_bytes(*key) -> int:
    return compiled_step(*key).memory_analysis().temp_size_in_bytes


def large_copies(hlo_text: str, min_elements: int) -> list[str]:
    """The copy instructions of compiled HLO that move at least min_elements values."""
    found = []
    for line in hlo_text.splitlines():
        match = re.search(r"= \w+\[([\d,]*)\]\S* copy\(", line)
        if match and np.prod([int(d) for d in match.group(1).split(",") if d]) >= min_elements:
            found.append(line.strip())
    return found


@pytest.mark.parametrize("inner_name", sorted(INNERS))
def test_temp_memory_exceeds_the_inner_steps_by_under_one_percent_of_params(inner_name):
    extra_temp = temp_bytes(inner_name, True) - temp_bytes(inner_name, False)
    assert extra_temp <= 0.01 * tree_bytes(make_params())


@pytest.mark.parametrize("inner_name", sorted(INNERS))
def test_compiled_step_copies_no_params_sized_buffer(inner_name):
    hlo = compiled_step(inner_name, True).as_text()
    copies = large_copies(hlo, min(LEAF_SIZES.values()))
    assert copies == []


def test_large_copies_finds_the_copy_of_a_params_sized_buffer():
    # The detector above must see a copy when XLA emits one: a value that is both
    # donated-and-updated and returned unchanged has to be copied.
    def step(x):
        return x + 1.0, x

    x = jnp.zeros(LEAF_SIZES["dense"])
    hlo = jax.jit(step, donate_argnums=0).lower(x).compile().as_text()
    assert len(large_copies(hlo, LEAF_SIZES["dense"])) == 1


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
        return train_step(tx)(params, opt_state, grads)

    tx = lo.lookahead(INNERS["adam"](), k=K)
    params = make_params()
    opt_state = tx.init(params)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.01), params)
    jitted = jax.jit(step, donate_argnums=(0, 1))
    for _ in range(3 * K + 1):
        params, opt_state = jitted(params, opt_state, grads)
    assert len(traces) == 1
    assert int(opt_state.syncs) == 3

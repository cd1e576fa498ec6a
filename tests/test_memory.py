"""Memory of a jitted Lookahead step, from the compiled program (deterministic, no timing).

Lookahead stores one params-sized copy (the slow weights) and should need no other
params-sized memory: no temporary buffer for the inner update and no copies of the
inner state. Each test compares the compiled step of ``lookahead(inner)`` with the
compiled step of ``inner`` alone, params and state donated as in a training loop.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lookahead_optax as lo
from benchmarks._hlo import large_copies, sync_branch_traffic
from tests.helpers import (
    LEAF_SIZES,
    compile_step,
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


# --- The sync branch: outer optimizers and workers -------------------------------------------
#
# XLA:CPU has no multi-output fusion: where two results of the sync (an outer optimizer's new
# state and the new slow weights) both need the pseudo-gradient Delta, it is written to memory
# once, one slow-weights-sized buffer; without such a pair (alpha, an outer SGD, heavy ball)
# the sync needs none. The passes are counted in the compiled sync branch: the bytes its
# instructions read and write, in units of the params' bytes (docs/performance.md).

WORKERS = 4
NESTEROV = lambda: optax.sgd(0.7, momentum=0.9, nesterov=True)  # noqa: E731
OUTERS = {
    "alpha": dict(),
    "heavy_ball": dict(outer=lambda: optax.sgd(0.7, momentum=0.9)),
    "nesterov": dict(outer=NESTEROV),
    "adam": dict(outer=lambda: optax.adam(0.1)),
}
# (temp in units of the slow weights' bytes, sync branch (read, written) in units of the
# params' bytes) with inner Adam; None: not counted (no conditional).
SINGLE = {
    "alpha": (0.0, (5.0, 1.0)),  # phi, p, g, m, v read once; phi written once
    "heavy_ball": (0.0, (7.0, 2.0)),  # + the momentum read and written, phi and b read again
    "nesterov": (1.0, (10.0, 3.0)),  # + Delta written once and read twice
    "adam": (1.0, (14.0, 4.0)),  # + two moments; Delta written once, read twice
}
# Workers on one device (the worker axis whole on it), statistics off: every worker's
# p, g, m, v read once (4 params' worth), the slow weights (1/WORKERS of it) read and written.
WORKERS_SINGLE = {
    "alpha": (0.0, (4.25, 0.25)),
    # Nesterov: XLA keeps the inner update (params-sized) rather than Delta: 4x Delta's bytes.
    "nesterov": (WORKERS, (8.0, 1.5)),
}


def _sync_step(outer_name, workers=None, sync_stats=None):
    """The compiled step of lookahead(adam) with k=1 (every call syncs, the cond traced);
    ``sync_stats`` None: the default."""
    kwargs = {name: make() if callable(make) else make for name, make in OUTERS[outer_name].items()}
    if workers:
        kwargs.update(workers=workers)
    if sync_stats is not None:
        kwargs.update(sync_stats=sync_stats)
    params = make_params()
    if workers:
        params = lo.replicate(params, workers)
    tx = lo.lookahead(INNERS["adam"](), k=1, **kwargs)
    return compile_step(tx, params), params


def _sync_figures(outer_name, workers=None, sync_stats=None):
    compiled, params = _sync_step(outer_name, workers, sync_stats)
    hlo = compiled.as_text()
    slow_bytes = tree_bytes(make_params())
    smallest = min(LEAF_SIZES.values()) * 4
    traffic = sync_branch_traffic(hlo, smallest)
    params_bytes = tree_bytes(params)
    temp = compiled.memory_analysis().temp_size_in_bytes / slow_bytes
    return temp, (traffic["read"] / params_bytes, traffic["written"] / params_bytes)


@pytest.mark.parametrize("outer_name", sorted(SINGLE))
def test_the_sync_branch_moves_the_counted_bytes_and_holds_at_most_delta(outer_name):
    temp, (read, written) = _sync_figures(outer_name)
    expected_temp, (expected_read, expected_written) = SINGLE[outer_name]
    assert temp <= expected_temp + 0.01
    assert (read, written) == pytest.approx((expected_read, expected_written), abs=0.01)


@pytest.mark.parametrize("outer_name", sorted(WORKERS_SINGLE))
def test_workers_on_one_device_sync_in_one_pass_over_their_state(outer_name):
    temp, (read, written) = _sync_figures(outer_name, WORKERS, sync_stats=False)
    expected_temp, (expected_read, expected_written) = WORKERS_SINGLE[outer_name]
    assert temp <= expected_temp + 0.01
    assert (read, written) == pytest.approx((expected_read, expected_written), abs=0.01)


def test_workers_alpha_by_default_needs_no_temp_memory():
    """The goal's bound, met by default (statistics off): compiled temp under 1% of the (all
    workers') params. With statistics the workers' pseudo-gradients are kept (1.25x)."""
    compiled, params = _sync_step("alpha", WORKERS)
    assert compiled.memory_analysis().temp_size_in_bytes <= 0.01 * tree_bytes(params)
    compiled, params = _sync_step("alpha", WORKERS, sync_stats=True)
    assert compiled.memory_analysis().temp_size_in_bytes >= tree_bytes(params)


def test_workers_statistics_cost_passes_and_skipping_them_changes_no_weight():
    """Statistics read every worker's pseudo-gradient once more; sync_stats=False skips that
    (NaN in the state) and the weights, outer state and counters come out the same (up to an
    ulp: XLA:CPU may contract a multiply-add into an FMA in one fusion and not another)."""
    _, with_stats = _sync_figures("nesterov", WORKERS, sync_stats=True)
    _, without = _sync_figures("nesterov", WORKERS, sync_stats=False)
    assert with_stats[0] >= without[0] + 1.0  # at least one more read of every worker's state

    params = lo.replicate(make_params(), WORKERS)
    grads = jax.tree.map(lambda p: p * jnp.arange(1.0, WORKERS + 1.0)[:, None], params)
    runs = {}
    for sync_stats in (True, False):
        tx = lo.lookahead(INNERS["adam"](), k=2, outer=NESTEROV(), workers=WORKERS,
                          sync_stats=sync_stats)  # fmt: skip
        p, state = params, tx.init(params)
        for _ in range(5):
            p, state = jax.jit(two_call_step, static_argnums=3)(p, state, grads, tx)
        runs[sync_stats] = (p, state)
    (p_on, s_on), (p_off, s_off) = runs[True], runs[False]
    for a, b in zip(jax.tree.leaves((p_on, s_on._replace(sync_stats=None))),
                    jax.tree.leaves((p_off, s_off._replace(sync_stats=None)))):  # fmt: skip
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8)
    assert np.all(np.isfinite(jax.tree.leaves(s_on.sync_stats)[1]))
    assert all(np.all(np.isnan(x)) for x in jax.tree.leaves(s_off.sync_stats))
    with pytest.raises(ValueError, match="sync_stats must be True or False, got 1"):
        lo.lookahead(INNERS["adam"](), workers=WORKERS, sync_stats=1)

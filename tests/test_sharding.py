"""Lookahead on several devices: sharded jit (FSDP), pmap and shard_map data parallelism.

conftest.py emulates 8 CPU devices. The model, data and loss come from
tests/_multihost_worker.py (also used by the two-process test); every multi-device run
is compared, step by step, with the same steps applied on one device.
"""

from __future__ import annotations

import collections
import functools

import _multihost_worker as problem
import jax
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import lookahead_optax as lo
from benchmarks import _hlo
from tests.helpers import SHARDED_INNERS, fsdp_state_shardings, shard

DEVICES = 8  # conftest.py's mesh fixture spans them
K = problem.K  # 7 steps with k=3: syncs after steps 3 and 6


def make_lookahead(inner: str, inner_state: str = "keep") -> optax.GradientTransformation:
    return lo.lookahead(SHARDED_INNERS[inner](), k=K, alpha=0.5, inner_state=inner_state)


@functools.cache
def _one_device_trajectory(inner: str) -> list[tuple[dict, dict]]:
    """(params, slow weights) after every step, on one device with the whole batch."""
    tx = make_lookahead(inner)
    params, inputs, targets = problem.make_problem()
    params = jax.device_put(params, jax.devices()[0])
    opt_state = tx.init(params)
    step = jax.jit(problem.make_train_step(tx))
    trajectory = []
    for t in range(problem.STEPS):
        params, opt_state = step(params, opt_state, inputs[t], targets[t])
        trajectory.append((params, lo.slow_params(opt_state, params)))
    return trajectory


def _assert_close(actual: dict, expected: dict, what: str) -> None:
    for name in expected:
        np.testing.assert_allclose(
            np.asarray(actual[name]),
            np.asarray(expected[name]),
            rtol=1e-5,
            atol=1e-6,
            err_msg=f"{what}[{name!r}]",
        )


# --- sharded jit, FSDP-style: every param split over 8 devices along its first axis ---


def test_jitted_init_gives_slow_weights_the_params_sharding(mesh):
    params = shard(problem.make_problem()[0], mesh)
    opt_state = jax.jit(make_lookahead("adam").init)(params)
    for name, slow in opt_state.slow.items():
        assert slow.sharding == params[name].sharding, name
        np.testing.assert_array_equal(slow, params[name])


@pytest.mark.parametrize("inner", ["adam", pytest.param("sgd_momentum", marks=pytest.mark.slow)])
def test_sharded_steps_keep_the_sharding_and_equal_one_device(mesh, inner):
    tx = make_lookahead(inner)
    params, inputs, targets = problem.make_problem()
    params = shard(params, mesh)
    fsdp = NamedSharding(mesh, PartitionSpec("fsdp"))
    state_shardings = fsdp_state_shardings(tx, params, mesh)
    assert all(s == fsdp for s in jax.tree.leaves(state_shardings.slow))
    opt_state = jax.jit(tx.init, out_shardings=state_shardings)(params)
    step = jax.jit(problem.make_train_step(tx), donate_argnums=(0, 1))
    reference = _one_device_trajectory(inner)

    for t in range(problem.STEPS):
        # The batch is split over the same devices, as FSDP does.
        batch = shard((inputs[t], targets[t]), mesh)
        previous_state = opt_state
        params, opt_state = step(params, opt_state, *batch)
        # Donation reused every state buffer: none (slow weights included) was an alias.
        assert all(x.is_deleted() for x in jax.tree.leaves(previous_state))
        for name in params:
            assert params[name].sharding == fsdp, (t, name, params[name].sharding)
            assert opt_state.slow[name].sharding == fsdp, (t, name, opt_state.slow[name].sharding)
        expected_params, expected_slow = reference[t]
        _assert_close(params, expected_params, f"params after step {t + 1}")
        _assert_close(opt_state.slow, expected_slow, f"slow after step {t + 1}")
    assert int(opt_state.syncs) == problem.STEPS // K
    # One compilation: the outputs' shardings are those of the inputs.
    assert step._cache_size() == 1


def test_slow_weights_take_one_nth_of_the_params_bytes_per_device(mesh):
    initial_params = problem.make_problem()[0]
    params_bytes = sum(x.nbytes for x in initial_params.values())
    opt_state = jax.jit(make_lookahead("adam").init)(shard(initial_params, mesh))

    bytes_per_device = collections.Counter()
    for name, slow in opt_state.slow.items():
        for piece in slow.addressable_shards:
            assert piece.data.nbytes * DEVICES == initial_params[name].nbytes, name
            bytes_per_device[piece.device] += piece.data.nbytes
    assert len(bytes_per_device) == DEVICES
    assert set(bytes_per_device.values()) == {params_bytes // DEVICES}


def _collectives_of_step(
    tx: optax.GradientTransformation, mesh: Mesh, with_gradient: bool
) -> collections.Counter:
    """Collectives in the compiled, sharded step: an update only, or gradient and update."""
    params, inputs, targets = problem.make_problem()
    params = shard(params, mesh)
    opt_state = jax.jit(tx.init)(params)
    if with_gradient:
        step = problem.make_train_step(tx)
        args = (params, opt_state, *shard((inputs[0], targets[0]), mesh))
    else:

        def step(params, opt_state, grads):
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        args = (params, opt_state, params)  # grads sharded like the params
    hlo_text = jax.jit(step, donate_argnums=(0, 1)).lower(*args).compile().as_text()
    return _hlo.count_collectives(hlo_text)


@functools.cache
def _collectives_of_inner_alone(inner: str, mesh: Mesh, with_gradient: bool) -> collections.Counter:
    return _collectives_of_step(SHARDED_INNERS[inner](), mesh, with_gradient)


@pytest.mark.parametrize(
    "inner, inner_state",
    [
        ("adam", "keep"),
        # Each case compiles two sharded steps: the quick set keeps one.
        pytest.param("adam", "reset", marks=pytest.mark.slow),
        pytest.param("adam", "pullback", marks=pytest.mark.slow),
        pytest.param("sgd_momentum", "keep", marks=pytest.mark.slow),
    ],
)
@pytest.mark.parametrize("with_gradient", [False, True], ids=["update", "train_step"])
def test_lookahead_adds_no_collective_to_the_inner_optimizer(
    mesh, inner, inner_state, with_gradient
):
    inner_counts = _collectives_of_inner_alone(inner, mesh, with_gradient)
    with_lookahead = make_lookahead(inner, inner_state)
    lookahead_counts = _collectives_of_step(with_lookahead, mesh, with_gradient)
    assert lookahead_counts == inner_counts
    if with_gradient:
        # The loss over sharded weights and batch needs collectives: the count sees them.
        assert sum(inner_counts.values()) > 0


@pytest.mark.parametrize(
    "with_gradient",
    [False, pytest.param(True, marks=pytest.mark.slow)],
    ids=["update", "train_step"],
)
def test_clipping_before_lookahead_adds_no_collective(mesh, with_gradient):
    # The recommended layout: gradient-only transformations that communicate (the global
    # norm's all-reduce) go before lookahead in the chain, so the sync never repeats them.
    def clip_then(tx):
        return optax.chain(optax.clip_by_global_norm(1.0), tx)

    inner_counts = _collectives_of_step(clip_then(optax.adam(0.05)), mesh, with_gradient)
    lookahead_counts = _collectives_of_step(
        clip_then(lo.lookahead(optax.adam(0.05), k=K, alpha=0.5)), mesh, with_gradient
    )
    assert inner_counts["all-reduce"] > 0
    assert lookahead_counts == inner_counts


def test_communicating_inner_repeats_its_collectives_only_in_the_sync_branch(mesh):
    # Documented cost of the fast formulation: the sync branch recomputes the inner update,
    # so collectives inside the inner optimizer appear once more, in the cond's sync branch.
    inner_counts = _collectives_of_inner_alone("clip_adam", mesh, False)
    tx = make_lookahead("clip_adam")
    params = shard(problem.make_problem()[0], mesh)
    opt_state = jax.jit(tx.init)(params)

    def step(params, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    compiled = jax.jit(step).lower(params, opt_state, params).compile().as_text()
    assert inner_counts["all-reduce"] > 0
    assert _hlo.count_collectives(compiled) == inner_counts + inner_counts
    # The extra copy sits in the cond's sync branch, which runs once every k steps.
    (branch_names,) = _hlo.branches(compiled)
    computations = _hlo.computations(compiled)
    collectives_per_branch = [_hlo.count_collectives(computations[name]) for name in branch_names]
    assert sorted(collectives_per_branch, key=len) == [collections.Counter(), inner_counts]


@pytest.mark.slow
def test_sharded_outer_momentum_adds_no_collective_and_equals_one_device(mesh):
    """FSDP over 8 emulated devices: the outer momentum is sharded like the params."""
    tx = lo.lookahead(optax.adam(0.05), k=K, outer=optax.sgd(0.7, momentum=0.9, nesterov=True))
    for with_gradient in (False, True):
        assert _collectives_of_step(tx, mesh, with_gradient) == _collectives_of_inner_alone(
            "adam", mesh, with_gradient
        )
    params, inputs, targets = problem.make_problem()
    single = jax.device_put(params, jax.devices()[0])
    single_state = tx.init(single)
    sharded = shard(params, mesh)
    shardings = fsdp_state_shardings(tx, sharded, mesh)
    fsdp = NamedSharding(mesh, PartitionSpec("fsdp"))
    assert all(s == fsdp for s in jax.tree.leaves(shardings.outer_state[0].trace))
    state = jax.jit(tx.init, out_shardings=shardings)(sharded)
    step = jax.jit(problem.make_train_step(tx), donate_argnums=(0, 1))
    single_step = jax.jit(problem.make_train_step(tx))
    for t in range(problem.STEPS):
        sharded, state = step(sharded, state, *shard((inputs[t], targets[t]), mesh))
        single, single_state = single_step(single, single_state, inputs[t], targets[t])
    assert int(state.syncs) == problem.STEPS // problem.K >= 2
    for name in params:
        assert state.outer_state[0].trace[name].sharding == fsdp
        np.testing.assert_allclose(sharded[name], single[name], rtol=2e-5, atol=2e-6)
        np.testing.assert_allclose(
            state.outer_state[0].trace[name], single_state.outer_state[0].trace[name],
            rtol=2e-5, atol=2e-6,
        )  # fmt: skip


# --- data parallelism: replicated params and state, the batch split over devices ---


def _split_batch(batch: np.ndarray) -> np.ndarray:
    return batch.reshape(DEVICES, batch.shape[0] // DEVICES, *batch.shape[1:])


def _data_parallel_step(tx: optax.GradientTransformation, axis_name: str):
    def step(params, opt_state, inputs, targets):
        # Equal shards, so the mean of the per-shard mean gradients is the full-batch one.
        grads = jax.grad(problem.loss_fn)(params, inputs, targets)
        grads = jax.lax.pmean(grads, axis_name)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return step


@pytest.mark.slow  # pmap; shard_map below runs the same data-parallel step in the quick set
def test_pmap_data_parallel_equals_one_device():
    tx = make_lookahead("adam")
    params, inputs, targets = problem.make_problem()
    devices = jax.devices()[:DEVICES]
    params = jax.tree.map(lambda x: np.stack([x] * DEVICES), params)
    opt_state = jax.pmap(tx.init, devices=devices)(params)
    step = jax.pmap(_data_parallel_step(tx, "batch"), axis_name="batch", devices=devices)
    reference = _one_device_trajectory("adam")

    for t in range(problem.STEPS):
        batch = _split_batch(inputs[t]), _split_batch(targets[t])
        params, opt_state = step(params, opt_state, *batch)
        slow = lo.slow_params(opt_state, params)
        expected_params, expected_slow = reference[t]
        for replica in range(DEVICES):
            _assert_close({n: x[replica] for n, x in params.items()}, expected_params, "params")
            _assert_close({n: x[replica] for n, x in slow.items()}, expected_slow, "slow")
    assert np.all(np.asarray(opt_state.syncs) == problem.STEPS // K)


def test_shard_map_data_parallel_with_pmean_equals_one_device(mesh):
    tx = make_lookahead("adam")
    params, inputs, targets = problem.make_problem()
    replicated = NamedSharding(mesh, PartitionSpec())
    params = jax.device_put(params, replicated)
    opt_state = jax.jit(tx.init)(params)
    step = jax.jit(
        jax.shard_map(
            _data_parallel_step(tx, "fsdp"),
            mesh=mesh,
            # params, state replicated; inputs, targets split over the devices
            in_specs=(PartitionSpec(),) * 2 + (PartitionSpec("fsdp"),) * 2,
            out_specs=(PartitionSpec(), PartitionSpec()),
        ),
        donate_argnums=(0, 1),
    )
    reference = _one_device_trajectory("adam")

    for t in range(problem.STEPS):
        params, opt_state = step(params, opt_state, inputs[t], targets[t])
        expected_params, expected_slow = reference[t]
        _assert_close(params, expected_params, f"params after step {t + 1}")
        _assert_close(lo.slow_params(opt_state, params), expected_slow, f"slow after step {t + 1}")
        # Every device holds the same copy of the slow weights.
        for slow in opt_state.slow.values():
            assert slow.sharding.is_fully_replicated
            first = np.asarray(slow.addressable_shards[0].data)
            for piece in slow.addressable_shards[1:]:
                np.testing.assert_array_equal(piece.data, first)
    assert int(opt_state.syncs) == problem.STEPS // K

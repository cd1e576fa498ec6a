"""workers=N and axis_name: DiLoCo, each worker k local steps, one averaged outer step per sync."""

import collections
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec

import lookahead_optax as lo
from benchmarks import _hlo
from tests import reference as ref
from tests.helpers import run_steps

WORKERS, K, STEPS = 4, 3, 8
PROBLEM = ref.LogisticQuadratic()
TARGETS = [0.5 * w for w in range(WORKERS)]  # each worker's data: its own quadratic offset


def worker_loss(params, offset):
    """The test problem plus a worker-specific pull: different data on every worker."""
    pull = sum(jnp.sum((leaf - offset) ** 2) for leaf in jax.tree.leaves(params))
    return PROBLEM.loss(params) + 0.1 * pull


def worker_grad_fn(offset):
    """The same gradient in float64 numpy, for the reference (leaves in tree order)."""
    return lambda leaves: [g + 0.2 * (x - offset) for g, x in zip(PROBLEM.grad(leaves), leaves)]


def stacked_grads(params):
    offsets = jnp.asarray(TARGETS, jnp.float32)
    return jax.vmap(jax.grad(worker_loss))(params, offsets)


def initial_params():
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), PROBLEM.params0)


def run(tx, fused=False, steps=STEPS):
    return run_steps(tx, lo.replicate(initial_params(), WORKERS), stacked_grads, steps, fused)


OUTERS = {
    "alpha": (dict(alpha=0.5), lambda: ref.SGD(0.5)),
    "nesterov": (
        dict(outer=optax.sgd(0.7, momentum=0.9, nesterov=True)),
        lambda: ref.NesterovSGD(0.7, 0.9),
    ),
}


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("outer_name", OUTERS)
def test_workers_match_the_reference(outer_name, fused):
    kwargs, ref_outer = OUTERS[outer_name]
    tx = lo.lookahead(optax.sgd(0.1, momentum=0.5), k=K, workers=WORKERS, **kwargs)
    history = run(tx, fused)
    fast, slow = ref.diloco_trajectory(
        PROBLEM.leaves0(), [worker_grad_fn(o) for o in TARGETS], ref.Momentum(0.1, 0.5), K,
        ref_outer(), STEPS,
    )  # fmt: skip
    for step, ((params, state), f, s) in enumerate(zip(history, fast, slow), start=1):
        for w in range(WORKERS):
            for got, want in zip(jax.tree.leaves(params), f[w]):
                np.testing.assert_allclose(got[w], want, rtol=1e-5, atol=1e-6, err_msg=f"{step}")
        for got, want in zip(jax.tree.leaves(lo.slow_params(state, params)), s):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=f"step {step}")
    # The workers really diverged between syncs (different data) and met at each sync.
    params, state = history[K]  # one step after the first sync
    w = params["w"]
    assert not np.allclose(w[0], w[1])
    params, state = history[2 * K - 1]  # right after the second sync: all at phi (to an ulp,
    # as p + (phi - p) rounds)
    for w in range(WORKERS):
        np.testing.assert_allclose(params["w"][w], state.slow["w"], rtol=2e-7, atol=1e-9)


def test_sync_stats_are_the_pseudo_gradient_norm_and_the_worker_drift():
    tx = lo.lookahead(
        optax.sgd(0.1, momentum=0.5), k=K, workers=WORKERS, alpha=0.5, sync_stats=True
    )
    history = run(tx)
    stats = []
    ref.diloco_trajectory(
        PROBLEM.leaves0(), [worker_grad_fn(o) for o in TARGETS], ref.Momentum(0.1, 0.5), K,
        ref.SGD(0.5), STEPS, stats=stats,
    )  # fmt: skip
    _, state = history[0]  # before the first sync: zeros
    assert float(state.sync_stats.pseudo_gradient_norm) == 0.0
    for sync, (norm, drift) in enumerate(stats, start=1):
        _, state = history[sync * K - 1]
        np.testing.assert_allclose(state.sync_stats.pseudo_gradient_norm, norm, rtol=1e-5)
        np.testing.assert_allclose(state.sync_stats.worker_drift, drift, rtol=1e-4)
        assert state.sync_stats.worker_drift.shape == (WORKERS,)
        assert min(drift) > 0  # the workers did drift apart
    _, after = history[K]  # a non-sync step keeps the last sync's stats
    for a, b in zip(after.sync_stats, history[K - 1][1].sync_stats):
        np.testing.assert_array_equal(a, b)
    assert lo.lookahead(optax.sgd(0.1), k=2).init(initial_params()).sync_stats is None


def test_shared_state_has_no_worker_axis_and_inner_states_do():
    tx = lo.lookahead(optax.adam(0.1), k=K, workers=WORKERS, outer=optax.sgd(0.7, momentum=0.9))
    state = tx.init(lo.replicate(initial_params(), WORKERS))
    assert state.slow["w"].shape == (3,)
    assert state.outer_state[0].trace["w"].shape == (3,)
    assert state.inner_state[0].mu["w"].shape == (WORKERS, 3)
    assert state.inner_state[0].count.shape == (WORKERS,)
    assert state.count.shape == ()


def test_one_worker_is_lookahead_with_a_leading_axis():
    plain = lo.lookahead(optax.adam(0.05), k=K)
    one = lo.lookahead(optax.adam(0.05), k=K, workers=1)
    params = initial_params()
    stacked = lo.replicate(params, 1)
    plain_state, one_state = plain.init(params), one.init(stacked)
    plain_update, one_update = jax.jit(plain.update), jax.jit(one.update)  # eager: 10x slower
    grad, stacked_grad = jax.jit(jax.grad(PROBLEM.loss)), jax.jit(jax.vmap(jax.grad(PROBLEM.loss)))
    for _ in range(STEPS):
        updates, plain_state = plain_update(grad(params), plain_state, params)
        params = optax.apply_updates(params, updates)
        grads = stacked_grad(stacked)
        updates, one_state = one_update(grads, one_state, stacked)
        stacked = optax.apply_updates(stacked, updates)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(stacked)):
        np.testing.assert_allclose(a, b[0], rtol=1e-6, atol=1e-7)
    for a, b in zip(jax.tree.leaves(plain_state.slow), jax.tree.leaves(one_state.slow)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_axis_name_in_shard_map_equals_workers():
    """The same DiLoCo inside the user's own map: the sync is a pmean over axis_name."""
    mesh = jax.make_mesh((WORKERS,), ("workers",), axis_types=(AxisType.Explicit,))
    inner = lambda: optax.sgd(0.1, momentum=0.5)  # noqa: E731
    outer = lambda: optax.sgd(0.7, momentum=0.9, nesterov=True)  # noqa: E731
    tx = lo.lookahead(inner(), k=K, outer=outer(), axis_name="workers")
    offsets = jnp.asarray(TARGETS, jnp.float32)

    def local_steps(params, offset):
        params = jax.tree.map(lambda p: p[0], params)  # this worker's block
        opt_state = tx.init(params)
        history = []
        for _ in range(STEPS):
            grads = jax.grad(worker_loss)(params, offset[0])
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            history.append(params)
        return jax.tree.map(lambda *xs: jnp.stack(xs)[None], *history)

    spec = PartitionSpec("workers")
    mapped = jax.jit(jax.shard_map(local_steps, mesh=mesh, in_specs=(spec, spec), out_specs=spec))
    sharding = NamedSharding(mesh, spec)
    stacked = jax.device_put(lo.replicate(initial_params(), WORKERS), sharding)
    with jax.set_mesh(mesh):
        got = mapped(stacked, jax.device_put(offsets, sharding))
    want = run(lo.lookahead(inner(), k=K, outer=outer(), workers=WORKERS))
    for step, (params, _) in enumerate(want):
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params)):
            np.testing.assert_allclose(a[:, step], b, rtol=1e-5, atol=1e-6)


# ---- sharded over a "workers" mesh axis: no communication between syncs ----


def _compiled_step(axis_type, communication_dtype=None, fused=False):
    devices = 8
    mesh = jax.make_mesh((devices,), ("workers",), axis_types=(axis_type,))
    params = lo.replicate(initial_params(), devices)
    tx = lo.lookahead(
        optax.chain(optax.clip_by_global_norm(1.0), optax.adam(0.05)), k=K, workers=devices,
        outer=optax.sgd(0.7, momentum=0.9, nesterov=True),
        communication_dtype=communication_dtype,
    )  # fmt: skip
    sharding = NamedSharding(mesh, PartitionSpec("workers"))
    params = jax.device_put(params, sharding)
    opt_state = jax.jit(tx.init)(params)

    def step(params, opt_state, grads):
        if fused:
            return lo.update_and_apply(tx, grads, opt_state, params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    with jax.set_mesh(mesh):
        compiled = jax.jit(step).lower(params, opt_state, params).compile()
    return compiled.as_text(), initial_params()


@pytest.mark.slow
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto])
def test_no_collective_outside_the_sync_and_one_params_worth_inside(axis_type, fused):
    hlo, params = _compiled_step(axis_type, fused=fused)
    params_bytes = sum(p.size * 4 for p in jax.tree.leaves(params))
    computations = _hlo.computations(hlo)
    branches = _hlo.branches(hlo)
    assert branches, "the sync is a conditional"
    in_branches = collections.Counter()
    per_branch = []
    for names in branches:
        for name in names:
            text = _hlo.reachable(computations, name)
            per_branch.append(sum(_hlo.all_reduce_bytes(text)))
            in_branches.update(_hlo.count_collectives(text))
    everything = _hlo.count_collectives(hlo)
    assert everything == in_branches, "a collective outside the sync's conditional"
    # One branch moves nothing; the sync branch all-reduces exactly one params' worth.
    assert sorted(per_branch)[0] == 0
    assert max(per_branch) == params_bytes


def test_a_bf16_communication_dtype_rounds_each_worker_and_accumulates_in_f32():
    """Each worker's pseudo-gradient is rounded to bf16 (the exchanged values), the mean over
    the worker axis accumulates in f32 (MaxText's averaging: no fp16 overflow, no bf16
    accumulation error), one params' worth reduced once per sync.

    The f32 reduction is what the lowered program asks for; a narrow wire with f32
    accumulation needs an all-to-all exchange, not an all-reduce. On a mesh that shards the
    worker axis (on one device the mean is a sum of the workers' slices).
    """
    params = initial_params()
    num_params = sum(p.size for p in jax.tree.leaves(params))
    mesh = jax.make_mesh((WORKERS,), ("workers",), axis_types=(AxisType.Explicit,))
    for dtype in (None, jnp.bfloat16):
        tx = lo.lookahead(optax.sgd(0.1), k=K, workers=WORKERS, communication_dtype=dtype)
        stacked = jax.device_put(
            lo.replicate(params, WORKERS), NamedSharding(mesh, PartitionSpec("workers"))
        )
        with jax.set_mesh(mesh):
            state = jax.jit(tx.init)(stacked)
            lowered = jax.jit(tx.update).lower(stacked, state, stacked).as_text()
        found = re.findall(
            r"stablehlo.reduce\(%\S+ init: %\S+\) applies stablehlo.add across dimensions = "
            r"\[0\] : \(tensor<(\d+)x([0-9x]*?)x?(bf16|f32)>",
            lowered,
        )
        found = [f for f in found if int(f[0]) == WORKERS]  # the worker axis, not the norms
        assert {f[2] for f in found} == {"f32"}
        counted = sum(int(np.prod([int(d) for d in f[1].split("x") if d] or [1])) for f in found)
        assert counted == num_params  # one params' worth, reduced once per sync
        rounded = re.findall(
            rf"convert %\S+ : \(tensor<{WORKERS}x[0-9x]*f32>\) -> "
            rf"tensor<{WORKERS}x[0-9x]*bf16>",
            lowered,
        )
        assert bool(rounded) == (dtype is not None)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(workers=0), "workers must be a positive int"),
        (dict(workers=2.0), "workers must be a positive int"),
        (dict(workers=2, axis_name="w"), "workers and axis_name"),
        (dict(communication_dtype=jnp.bfloat16), "communication_dtype needs workers"),
        (dict(workers=2, communication_dtype=jnp.int16), "communication_dtype must be a floating"),
        (dict(workers=2, alpha=lo.adaptive_alpha()), "adaptive_alpha does not support workers"),
    ],
)
def test_bad_worker_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lo.lookahead(optax.sgd(0.1), k=2, **kwargs)


def test_params_without_the_worker_axis_are_named():
    tx = lo.lookahead(optax.sgd(0.1), k=2, workers=3)
    with pytest.raises(ValueError, match=r"leading worker axis of size 3.*replicate"):
        tx.init({"w": jnp.ones(2)})


# ---- Streaming DiLoCo: fragments synced at staggered steps ----

# The split is contiguous in tree order and balanced by size: leaves [b (1), head.q (4),
# w (3)] -> fragments [b, q] and [w]; fragment 0 syncs at step 2 of each 4, fragment 1 at 4.
GROUPS = [[0, 1], [2]]


@pytest.mark.parametrize("fused", [False, True])
def test_fragments_match_the_streaming_reference(fused):
    k = 4
    tx = lo.lookahead(
        optax.sgd(0.1, momentum=0.5), k=k, workers=WORKERS, fragments=2,
        outer=optax.sgd(0.7, momentum=0.9, nesterov=True),
    )  # fmt: skip
    history = run(tx, fused, steps=9)
    fast, slow = ref.diloco_trajectory(
        PROBLEM.leaves0(), [worker_grad_fn(o) for o in TARGETS], ref.Momentum(0.1, 0.5), k,
        ref.NesterovSGD(0.7, 0.9), 9, groups=GROUPS,
    )  # fmt: skip
    for step, ((params, state), f, s) in enumerate(zip(history, fast, slow), start=1):
        for w in range(WORKERS):
            for got, want in zip(jax.tree.leaves(params), f[w]):
                np.testing.assert_allclose(got[w], want, rtol=1e-5, atol=1e-6, err_msg=f"{step}")
        for got, want in zip(jax.tree.leaves(lo.slow_params(state, params)), s):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=f"step {step}")
    assert int(history[-1][1].syncs) == 2  # full cycles
    assert len(history[-1][1].outer_state) == 2  # an outer state per fragment


@pytest.mark.slow
def test_fragments_cut_the_peak_bytes_of_a_sync_and_keep_the_total():
    devices = 8
    mesh = jax.make_mesh((devices,), ("workers",), axis_types=(AxisType.Explicit,))
    sharding = NamedSharding(mesh, PartitionSpec("workers"))
    params = jax.device_put(lo.replicate(initial_params(), devices), sharding)
    per_branch = {}
    for fragments in (1, 2):
        tx = lo.lookahead(
            optax.adam(0.05), k=4, workers=devices, fragments=fragments,
            outer=optax.sgd(0.7, momentum=0.9, nesterov=True),
        )  # fmt: skip
        opt_state = jax.jit(tx.init)(params)

        def step(params, opt_state, grads, tx=tx):
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        with jax.set_mesh(mesh):
            hlo = jax.jit(step).lower(params, opt_state, params).compile().as_text()
        computations = _hlo.computations(hlo)
        sizes = [
            sum(_hlo.all_reduce_bytes(_hlo.reachable(computations, name)))
            for names in _hlo.branches(hlo)
            for name in names
        ]
        per_branch[fragments] = sorted(b for b in sizes if b)
    params_bytes = 4 * sum(p.size for p in jax.tree.leaves(initial_params()))
    assert per_branch[1] == [params_bytes]
    assert per_branch[2] == [3 * 4, 5 * 4]  # [w] and [b, head.q]: peak 20 of 32 bytes
    assert sum(per_branch[2]) == params_bytes


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(k=5, fragments=2), "k must be a multiple of fragments"),
        (dict(k=4, fragments=0), "fragments must be a positive int"),
        (
            dict(k=4, fragments=2, inner_state="pullback"),
            'fragments > 1 supports inner_state="keep"',
        ),
    ],
)
def test_bad_fragments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lo.lookahead(optax.sgd(0.1), workers=2, **kwargs)


def test_workers_under_inject_hyperparams_must_be_static():
    params = lo.replicate(initial_params(), 2)
    tx = optax.inject_hyperparams(lo.lookahead)(optax.sgd(0.1), k=2, workers=2)
    with pytest.raises(
        ValueError, match=r"workers must be a Python int.*static_args=\('workers',\)"
    ):
        tx.init(params)
    tx = optax.inject_hyperparams(lo.lookahead, static_args=("workers",))(
        optax.sgd(0.1), k=2, workers=2
    )
    assert tx.init(params).inner_state.slow["w"].shape == (3,)


# --- where workers meet the other features ---------------------------------------------------


def test_complex_params_keep_their_imaginary_part_over_a_real_communication_dtype():
    """A complex Delta travels as its two real parts: the imaginary part of phi moves."""
    z0 = np.asarray([1.0 + 1.0j, -0.5 + 2.0j])
    workers, k = 2, 2
    targets = np.asarray([0.0, 1.0 + 1.0j])
    tx = lo.lookahead(
        optax.sgd(0.1), k=k, workers=workers, communication_dtype=jnp.float32, alpha=0.5,
        sync_stats=True,
    )  # fmt: skip
    params = lo.replicate({"z": jnp.asarray(z0, jnp.complex64)}, workers)
    state = tx.init(params)
    for _ in range(k):
        grads = jax.tree.map(lambda p: p - jnp.asarray(targets, jnp.complex64)[:, None], params)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    # By hand: k SGD steps per worker on 0.5 |z - t_w|^2, then phi <- phi - 0.5 mean(Delta).
    theta = [z0 + (1 - 0.9**k) * (t - z0) for t in targets]
    deltas = [z0 - t for t in theta]
    phi = z0 - 0.5 * np.mean(deltas, axis=0)
    got = lo.slow_params(state, params)["z"]
    np.testing.assert_allclose(got, phi, rtol=1e-6)
    assert np.abs(np.imag(got) - np.imag(z0)).max() > 1e-3  # the imaginary part moved
    mean_delta = np.mean(deltas, axis=0)
    np.testing.assert_allclose(
        state.sync_stats.pseudo_gradient_norm, np.linalg.norm(mean_delta), rtol=1e-5
    )
    drift = [np.linalg.norm(d - mean_delta) for d in deltas]
    np.testing.assert_allclose(state.sync_stats.worker_drift, drift, rtol=1e-5)


def test_an_fp16_mean_does_not_overflow_when_the_sum_would():
    """N |Delta| > 65504 but every Delta and the mean fit in fp16: the mean is exact-ish."""
    workers = 4
    params = {"w": jnp.zeros((workers, 3), jnp.float32)}
    tx = lo.lookahead(
        optax.sgd(1.0), k=1, workers=workers, communication_dtype=jnp.float16, alpha=1.0
    )
    state = tx.init(params)
    grads = {"w": jnp.full((workers, 3), -30000.0, jnp.float32)}  # each theta_w = 30000
    updates, state = tx.update(grads, state, params)
    np.testing.assert_array_equal(lo.slow_params(state, params)["w"], np.full(3, 30000.0))


def test_a_bf16_mean_rounds_once():
    """Each worker's Delta rounded to bf16, summed exactly, the mean rounded to bf16 once."""
    workers = 3
    rng = np.random.default_rng(1)
    theta = rng.normal(size=(workers, 512)).astype(np.float32)
    params = {"w": jnp.zeros((workers, 512), jnp.float32)}
    tx = lo.lookahead(
        optax.sgd(1.0), k=1, workers=workers, communication_dtype=jnp.bfloat16, alpha=1.0
    )
    updates, state = tx.update({"w": -jnp.asarray(theta)}, tx.init(params), params)
    sent = [ref.rounded(-t, ml_dtypes.bfloat16) for t in theta]  # Delta_w = 0 - theta_w
    expected = -ref.rounded(np.mean(sent, axis=0), ml_dtypes.bfloat16)
    np.testing.assert_array_equal(np.asarray(lo.slow_params(state, params)["w"]), expected)


def test_int_bool_and_key_leaves_with_workers():
    """Non-floating leaves (a step counter, a flag, a PRNG key) pass through the workers."""
    params = lo.replicate(
        {
            "w": jnp.ones(3),
            "step": jnp.asarray(0, jnp.int32),
            "flag": jnp.asarray(True),
            "key": jax.random.key(0),
        },
        2,
    )
    labels = {"w": "sgd", "step": "pass", "flag": "pass", "key": "pass"}
    inner = optax.multi_transform({"sgd": optax.sgd(0.1), "pass": optax.identity()}, labels)
    tx = lo.lookahead(inner, k=2, workers=2)
    state = tx.init(params)

    def grads_of(p):
        return {
            "w": p["w"],
            "step": jnp.ones_like(p["step"]),  # the "update" of an int leaf: +1 per step
            "flag": p["flag"],
            "key": p["key"],
        }

    for _ in range(3):
        updates, state = jax.jit(tx.update)(grads_of(params), state, params)
        params = {
            "w": params["w"] + updates["w"],
            "step": params["step"] + updates["step"],
            "flag": params["flag"],
            "key": params["key"],
        }
    assert params["step"].tolist() == [3, 3]
    assert lo.slow_params(state, params)["step"].tolist() == 3


def test_tree_map_params_works_on_a_workers_state():
    """How optax and Flax users derive optimizer-state shardings."""
    tx = lo.lookahead(optax.adam(0.1), k=2, workers=2, outer=optax.sgd(0.7, momentum=0.9))
    params = lo.replicate({"w": jnp.ones(3), "b": jnp.zeros(())}, 2)
    state = tx.init(params)
    mapped = optax.tree_map_params(tx, lambda p: "param", state, transform_non_params=lambda _: "-")
    assert mapped.inner_state[0].mu == {"w": "param", "b": "param"}
    assert mapped.inner_state[0].count == "-"


def test_tree_set_of_an_injected_learning_rate_reaches_every_worker():
    tx = lo.lookahead(optax.inject_hyperparams(optax.sgd)(learning_rate=0.1), k=3, workers=2)
    params = lo.replicate({"w": jnp.ones(2)}, 2)
    state = tx.init(params)
    state = optax.tree.set(state, learning_rate=0.5)
    updates, state = jax.jit(tx.update)(params, state, params)
    np.testing.assert_allclose(updates["w"], -0.5 * np.ones((2, 2)))
    assert optax.tree.get(state, "learning_rate").shape == (2,)


def test_extra_arguments_with_a_worker_axis_are_split_over_the_workers():
    """A per-worker ``value`` (shape (N,)) reaches each worker as its own scalar."""

    def update(updates, state, params=None, *, value):
        return jax.tree.map(lambda u: -value * u, updates), state

    scaled = optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update)
    tx = lo.lookahead(scaled, k=5, workers=2)
    params = lo.replicate({"w": jnp.ones(2)}, 2)
    updates, _ = tx.update(params, tx.init(params), params, value=jnp.asarray([1.0, 3.0]))
    np.testing.assert_allclose(updates["w"], [[-1.0, -1.0], [-3.0, -3.0]])
    updates, _ = tx.update(params, tx.init(params), params, value=jnp.asarray(2.0))
    np.testing.assert_allclose(updates["w"], -2.0 * np.ones((2, 2)))

"""workers=N and axis_name: DiLoCo, each worker k local steps, one averaged outer step per sync."""

import collections
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec

import lookahead_optax as lo
from tests import reference as ref

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
    def step(params, opt_state):
        grads = stacked_grads(params)
        if fused:
            return lo.update_and_apply(tx, grads, opt_state, params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    step = jax.jit(step)
    params = lo.replicate(initial_params(), WORKERS)
    opt_state = tx.init(params)
    history = []
    for _ in range(steps):
        params, opt_state = step(params, opt_state)
        history.append((params, opt_state))
    return history


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
    tx = lo.lookahead(optax.sgd(0.1, momentum=0.5), k=K, workers=WORKERS, alpha=0.5)
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
    for _ in range(STEPS):
        updates, plain_state = plain.update(jax.grad(PROBLEM.loss)(params), plain_state, params)
        params = optax.apply_updates(params, updates)
        grads = jax.vmap(jax.grad(PROBLEM.loss))(stacked)
        updates, one_state = one.update(grads, one_state, stacked)
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

_COLLECTIVE = re.compile(
    r"\b(all-gather|all-reduce|reduce-scatter|collective-permute|all-to-all)(?:-start)?\("
)


def _computations(hlo: str) -> dict[str, str]:
    return {c.split(" ", 1)[0].lstrip("%"): c for c in re.split(r"\n(?=\S)", hlo)}


def _all_reduce_bytes(text: str) -> list[int]:
    """Bytes of each all-reduce's result (a tuple when XLA combines several) in HLO text."""
    sizes = []
    text = re.sub(r"/\*.*?\*/", "", text)  # XLA's /*index=5*/ comments inside long tuples
    for result in re.findall(r"= (\([^=]*?\)|\S+) all-reduce(?:-start)?\(", text):
        total = 0
        for dtype, dims in re.findall(r"([a-z]+[0-9]+)\[([0-9,]*)\]", result):
            count = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
            total += count * {"f32": 4, "bf16": 2, "f16": 2, "f64": 8, "s32": 4}[dtype]
        sizes.append(total)
    return sizes


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
    computations = _computations(hlo)
    branches = re.findall(r"branch_computations=\{([^}]*)\}", hlo)
    assert branches, "the sync is a conditional"
    in_branches = collections.Counter()
    per_branch = []
    for names in branches:
        for name in names.split(","):
            text = _reachable(computations, name.strip().lstrip("%"))
            per_branch.append(sum(_all_reduce_bytes(text)))
            in_branches.update(_COLLECTIVE.findall(text))
    everything = collections.Counter(_COLLECTIVE.findall(hlo))
    assert everything == in_branches, "a collective outside the sync's conditional"
    # One branch moves nothing; the sync branch all-reduces exactly one params' worth.
    assert sorted(per_branch)[0] == 0
    assert max(per_branch) == params_bytes


def _reachable(computations: dict[str, str], root: str) -> str:
    """The text of a computation and every computation it calls."""
    seen, stack, texts = set(), [root], []
    while stack:
        name = stack.pop()
        if name in seen or name not in computations:
            continue
        seen.add(name)
        text = computations[name]
        texts.append(text)
        stack += re.findall(
            r"(?:calls|to_apply|branch_computations=\{|body|condition)=?%?([\w.\-]+)", text
        )
        for group in re.findall(r"branch_computations=\{([^}]*)\}", text):
            stack += [n.strip().lstrip("%") for n in group.split(",")]
    return "\n".join(texts)


def test_a_bf16_communication_dtype_halves_the_sync_bytes():
    """The program asks for a bf16 reduction over the worker axis: half the bytes of f32.

    XLA:CPU then widens bf16 all-reduces to f32 (its compiled HLO moves 4 bytes per
    param either way, so the halving is not measurable here); GPU collectives (NCCL)
    reduce bf16 natively. So this checks what we ask XLA for, in the lowered program.
    """
    params = initial_params()
    num_params = sum(p.size for p in jax.tree.leaves(params))
    reductions = {}
    for dtype in (None, jnp.bfloat16):
        tx = lo.lookahead(optax.sgd(0.1), k=K, workers=WORKERS, communication_dtype=dtype)
        stacked = lo.replicate(params, WORKERS)
        lowered = jax.jit(tx.update).lower(stacked, tx.init(stacked), stacked).as_text()
        found = re.findall(
            r"stablehlo.reduce\(%\S+ init: %\S+\) applies stablehlo.add across dimensions = "
            r"\[0\] : \(tensor<(\d+)x([0-9x]*?)x?(bf16|f32)>",
            lowered,
        )
        # Keep the reductions of the worker axis (leading dim N); the sync statistics' norms
        # reduce other axes.
        reductions[dtype] = [f for f in found if int(f[0]) == WORKERS]
    for dtype, element in ((None, "f32"), (jnp.bfloat16, "bf16")):
        found = reductions[dtype]
        assert {f[2] for f in found} == {element}
        counted = sum(int(np.prod([int(d) for d in f[1].split("x") if d] or [1])) for f in found)
        assert counted == num_params  # one params' worth, reduced once per sync
        assert all(int(f[0]) == WORKERS for f in found)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(workers=0), "workers must be a positive int"),
        (dict(workers=2.0), "workers must be a positive int"),
        (dict(workers=2, axis_name="w"), "workers and axis_name"),
        (dict(communication_dtype=jnp.bfloat16), "communication_dtype needs workers"),
        (dict(workers=2, communication_dtype=jnp.int8), "communication_dtype must be a floating"),
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
        computations = _computations(hlo)
        sizes = []
        for names in re.findall(r"branch_computations=\{([^}]*)\}", hlo):
            for name in names.split(","):
                sizes.append(
                    sum(_all_reduce_bytes(_reachable(computations, name.strip().lstrip("%"))))
                )
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

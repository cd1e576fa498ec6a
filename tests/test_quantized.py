"""The quantized exchange (``communication_dtype=jnp.int8`` / fp8, ``communication_block``,
``error_feedback``): against the reference of the same scheme, equal on one device, a mesh
(Explicit and Auto) and inside shard_map/vmap, and the bytes on the wire."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec

import lookahead_optax as lo
from benchmarks import _hlo
from tests import reference as ref

N = 8
DTYPES = [jnp.int8, jnp.float8_e4m3fn]


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "w": jnp.asarray(rng.normal(size=(24, 10)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=(10,)), jnp.float32),
        "n": jnp.int32(3),  # never synced, never quantized
    }


def _grads(params, workers, seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda p: (
            jnp.asarray(rng.normal(size=(workers, *np.shape(p))), jnp.float32)
            if jnp.issubdtype(p.dtype, jnp.floating)
            else jnp.zeros((workers, *np.shape(p)), p.dtype)
        ),
        params,
    )


@pytest.mark.parametrize(
    "dtype, error_feedback",
    [
        (jnp.int8, True),
        pytest.param(jnp.int8, False, marks=pytest.mark.slow),
        pytest.param(jnp.float8_e4m3fn, False, marks=pytest.mark.slow),
        pytest.param(jnp.float8_e4m3fn, True, marks=pytest.mark.slow),
        pytest.param(jnp.int4, True, marks=pytest.mark.slow),
        pytest.param(jnp.int2, True, marks=pytest.mark.slow),
    ],
)
def test_trajectory_matches_the_reference_of_the_same_scheme(dtype, error_feedback):
    """4 workers, two fragments, overlap 1: every step of every worker and the slow weights
    as reference.streaming_trajectory computes them with reference.quantized_exchange."""
    workers, k, block = 4, 4, 16
    params = _params()
    floats = [np.asarray(params["b"]), np.asarray(params["w"])]  # tree order: b, n, w
    rng = np.random.default_rng(1)
    targets = [
        [rng.normal(size=p.shape).astype(np.float32) for p in floats] for _ in range(workers)
    ]

    def grad_fn(w):
        return lambda ps: [(p - t).astype(np.float32) for p, t in zip(ps, targets[w])]

    grad_fns = [grad_fn(w) for w in range(workers)]
    name = jnp.dtype(dtype).name
    fast_ref, slow_ref = ref.streaming_trajectory(
        floats, grad_fns, ref.SGD(np.float32(0.2)), k, ref.NesterovSGD(0.7, 0.9), 3 * k,
        groups=[[0], [1]], overlap=1, quantized=(name, block), error_feedback=error_feedback,
    )  # fmt: skip
    tx = lo.lookahead(
        optax.sgd(0.2), k=k, outer=optax.sgd(0.7, momentum=0.9, nesterov=True), workers=workers,
        fragments=2, overlap=1, communication_dtype=dtype, communication_block=block,
        error_feedback=error_feedback,
    )  # fmt: skip
    stacked = lo.replicate(params, workers)
    state = tx.init(stacked)
    step = jax.jit(tx.update)
    for t in range(3 * k):
        g = [grad_fns[w]([np.asarray(stacked["b"][w]), np.asarray(stacked["w"][w])])
             for w in range(workers)]  # fmt: skip
        grads = {"b": jnp.stack([x[0] for x in g]), "w": jnp.stack([x[1] for x in g]),
                 "n": jnp.zeros((workers,), jnp.int32)}  # fmt: skip
        updates, state = step(grads, state, stacked)
        stacked = optax.apply_updates(stacked, updates)
        for w in range(workers):
            for got, want in zip([stacked["b"][w], stacked["w"][w]], fast_ref[t][w]):
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=f"step {t}")
        for got, want in zip([state.slow["b"], state.slow["w"]], slow_ref[t]):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=f"step {t}")
    assert (state.residual is not None) == error_feedback
    if error_feedback:
        assert state.residual["w"].shape == (workers, 24, 10)
        assert float(jnp.abs(state.residual["w"]).max()) > 0


def test_one_exchange_equals_the_reference_and_the_residual_is_what_was_lost():
    workers, block = 3, 8
    params = {"a": jnp.zeros((5, 7)), "b": jnp.zeros(4)}
    tx = lo.lookahead(
        optax.sgd(1.0), k=1, alpha=1.0, workers=workers, communication_dtype=jnp.int8,
        communication_block=block, error_feedback=True,
    )  # fmt: skip
    stacked = lo.replicate(params, workers)
    grads = _grads(params, workers, 5)
    updates, state = jax.jit(tx.update)(grads, tx.init(stacked), stacked)
    # Delta_w = phi - theta_w = grads_w; phi <- phi - Delta (alpha 1).
    xs = [np.concatenate([np.asarray(grads["a"][w]).ravel(), np.asarray(grads["b"][w])])
          for w in range(workers)]  # fmt: skip
    mean, lost = ref.quantized_exchange(xs, "int8", block)
    got = -np.concatenate([np.asarray(state.slow["a"]).ravel(), np.asarray(state.slow["b"])])
    # Equal up to float32 rounding (XLA may fuse a dequantize and the sum into one FMA).
    np.testing.assert_allclose(got, mean, rtol=1e-6, atol=1e-7)
    residual = [
        np.concatenate([np.asarray(state.residual["a"][w]).ravel(), state.residual["b"][w]])
        for w in range(workers)
    ]
    np.testing.assert_allclose(np.stack(residual), np.stack(lost), rtol=1e-4, atol=1e-6)
    # int8 with per-block scales: within half a quantum of each block's max, twice.
    assert np.abs(mean - np.mean(xs, axis=0)).max() <= 2 * np.abs(xs).max() / 127


def _sharded_run(dtype, axis_type, error_feedback=False, steps=4):
    """workers=8 on one device (axis_type None) or sharded over 8 devices: params after
    ``steps`` calls and the compiled step's HLO."""
    params = _params()
    tx = lo.lookahead(
        optax.sgd(0.1), k=2, outer=optax.sgd(0.7, momentum=0.9, nesterov=True), workers=N,
        communication_dtype=dtype, communication_block=32 if lo_quantized(dtype) else None,
        error_feedback=error_feedback, sync_stats=True,
    )  # fmt: skip
    stacked = lo.replicate(params, N)
    grads = _grads(params, N, 3)
    if axis_type is not None:
        mesh = jax.make_mesh((N,), ("workers",), axis_types=(axis_type,))
        sharding = NamedSharding(mesh, PartitionSpec("workers"))
        stacked, grads = jax.device_put((stacked, grads), sharding)
    with jax.set_mesh(mesh) if axis_type is not None else _null():
        state = jax.jit(tx.init)(stacked)
        step = jax.jit(tx.update)
        hlo = step.lower(grads, state, stacked).compile().as_text()
        for _ in range(steps):
            updates, state = step(grads, state, stacked)
            stacked = optax.apply_updates(stacked, updates)
    return stacked, state, hlo


def lo_quantized(dtype):
    return dtype is not None and jnp.dtype(dtype).name in ("int8", "int4", "int2", "float8_e4m3fn")


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _wire_bytes(hlo):
    """Bytes each device sends per sync, from the compiled HLO's collectives: a ring
    all-reduce 2 (N - 1) / N of its buffer, an all-to-all and an all-gather (N - 1) / N."""
    counted = _hlo.collective_bytes(hlo)
    assert counted["every_step"] == 0, "a collective outside the sync"
    ops = _hlo.collective_ops(hlo)
    factor = {"all-reduce": 2 * (N - 1) / N, "all-to-all": (N - 1) / N, "all-gather": (N - 1) / N}
    return sum(factor[op] * size for op, size in ops), {op for op, _ in ops}


@pytest.mark.parametrize(
    "dtype, axis_type",
    [
        pytest.param(jnp.int8, AxisType.Explicit, marks=pytest.mark.slow),
        pytest.param(jnp.int8, AxisType.Auto, marks=pytest.mark.slow),
        pytest.param(jnp.float8_e4m3fn, AxisType.Explicit, marks=pytest.mark.slow),
        pytest.param(jnp.float8_e4m3fn, AxisType.Auto, marks=pytest.mark.slow),
        pytest.param(jnp.int4, AxisType.Explicit, marks=pytest.mark.slow),
        pytest.param(jnp.int2, AxisType.Auto, marks=pytest.mark.slow),
    ],
)
def test_on_a_mesh_the_wire_carries_one_byte_per_value_and_equals_one_device(dtype, axis_type):
    one, one_state, _ = _sharded_run(dtype, None, error_feedback=True)
    got, got_state, hlo = _sharded_run(dtype, axis_type, error_feedback=True)

    def fields(params, state):  # sync_stats' norms are reductions in another order
        return jax.tree.leaves((params, state.slow, state.outer_state, state.residual))

    for a, b in zip(fields(got, got_state), fields(one, one_state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_allclose(
        got_state.sync_stats.pseudo_gradient_norm,
        one_state.sync_stats.pseudo_gradient_norm,
        rtol=1e-6,
    )
    size = 24 * 10 + 10  # padded to 8 chunks of 32 values: 6 values of padding
    padded = N * -(-size // N)
    wire, ops = _wire_bytes(hlo)
    assert ops == {"all-to-all", "all-gather"}
    # Only one-byte types and the f32 scales travel (fp8 as its bytes: XLA:CPU would
    # otherwise widen an fp8 collective to f16).
    for line in hlo.splitlines():
        if re.search(r" (all-to-all|all-gather)\(", line):
            types = set(re.findall(r"\b(s8|u8|f32|f16|bf16|f8e4m3fn)\[", line.split(" = ")[1]))
            assert types <= {"s8", "u8", "f32"}, line
    blocks = N * -(-(padded // N) // 32)  # scales: one per block of at most 32 values
    per_value = {"int4": 0.5, "int2": 0.25}.get(jnp.dtype(dtype).name, 1.0)  # bytes: packed
    target = 2 * (N - 1) / N * size * per_value + 2 * (N - 1) / N * blocks * 4
    # The target, plus the padding that makes N equal chunks (less than N values).
    assert wire == target + 2 * (N - 1) / N * (padded - size) * per_value, (wire, target)
    f32_wire, f32_ops = _wire_bytes(_sharded_run(None, axis_type, steps=0)[2])
    assert f32_ops == {"all-reduce"} and f32_wire == 2 * (N - 1) / N * size * 4


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
def test_axis_name_in_shard_map_and_vmap_equals_workers(dtype):
    """The same exchange with axis_name (one worker per shard_map instance, or vmap)."""
    params = {"w": jnp.zeros((6, 5)), "b": jnp.zeros(3)}
    grads = _grads(params, N, 9)
    kwargs = dict(communication_dtype=dtype, communication_block=4, error_feedback=True)
    tx = lo.lookahead(optax.sgd(1.0), k=1, alpha=0.5, workers=N, **kwargs)
    stacked = lo.replicate(params, N)
    _, want = jax.jit(tx.update)(grads, tx.init(stacked), stacked)
    named = lo.lookahead(optax.sgd(1.0), k=1, alpha=0.5, axis_name="w", **kwargs)

    def one(g, p):
        _, s = named.update(g, named.init(p), p)
        return s.slow, s.residual

    slow, residual = jax.jit(jax.vmap(one, axis_name="w"))(grads, stacked)
    mesh = jax.make_mesh((N,), ("w",), axis_types=(AxisType.Explicit,))
    spec = PartitionSpec("w")
    mapped = jax.shard_map(
        lambda g, p: jax.tree.map(lambda x: x[None], one(*jax.tree.map(lambda x: x[0], (g, p)))),
        mesh=mesh, in_specs=(spec, spec), out_specs=spec, check_vma=False,
    )  # fmt: skip
    placed = jax.device_put((grads, stacked), NamedSharding(mesh, spec))
    with jax.set_mesh(mesh):
        slow_sm, residual_sm = jax.device_get(jax.jit(mapped)(*placed))
    for name in params:
        for w in range(N):
            np.testing.assert_array_equal(slow[name][w], want.slow[name])
            np.testing.assert_array_equal(slow_sm[name][w], want.slow[name])
        np.testing.assert_array_equal(residual[name], want.residual[name])
        np.testing.assert_array_equal(residual_sm[name], want.residual[name])


@pytest.mark.slow
def test_error_feedback_carries_what_quantization_lost():
    """With the same pseudo-gradient every sync, error feedback makes the average of the
    applied means converge to the true mean; without it the bias stays. One worker: the
    requantization of the summed chunk (not fed back) is then exact, so what remains is
    the first quantization's, which error feedback carries."""
    workers, syncs = 1, 16
    params = {"w": jnp.zeros(64)}
    grads = _grads(params, workers, 11)
    true = np.mean(np.asarray(grads["w"]), axis=0)
    errors = {}
    for feedback in (False, True):
        tx = lo.lookahead(
            optax.sgd(1.0), k=1, alpha=1.0, workers=workers, communication_dtype=jnp.int8,
            communication_block=64, error_feedback=feedback,
        )  # fmt: skip
        stacked = lo.replicate(params, workers)
        state = tx.init(stacked)
        step = jax.jit(tx.update)
        for _ in range(syncs):  # Delta_w = grads_w each time: phi moves by -mean per sync
            updates, state = step(grads, state, lo.replicate({"w": state.slow["w"]}, workers))
        errors[feedback] = np.abs(-np.asarray(state.slow["w"]) / syncs - true).max()
    assert errors[True] < errors[False] / 4, errors


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(workers=2, communication_block=64), "communication_block is the block size"),
        (dict(workers=2, error_feedback=True), "error_feedback=True keeps the quantization"),
        (dict(communication_dtype=jnp.int8), "communication_dtype needs workers=N or axis_name"),
        (
            dict(workers=2, communication_dtype=jnp.int8, communication_block=0),
            "communication_block must be a positive int",
        ),  # fmt: skip
        (
            dict(workers=2, communication_dtype=jnp.int8, error_feedback=1),
            "error_feedback must be True or False",
        ),  # fmt: skip
        (dict(workers=2, communication_dtype=jnp.int16), "communication_dtype must be a floating"),
    ],
)
def test_arguments_are_checked_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lo.lookahead(optax.sgd(0.1), **kwargs)


def test_params_that_cannot_be_quantized_are_refused_at_init():
    tx = lo.lookahead(optax.sgd(0.1), workers=2, communication_dtype=jnp.int8)
    with pytest.raises(ValueError, match="params has no floating leaf"):
        tx.init(lo.replicate({"n": jnp.int32(1)}, 2))
    with pytest.raises(ValueError, match=r"params\['z'\] is complex"):
        tx.init(lo.replicate({"z": jnp.ones(2, jnp.complex64)}, 2))


def test_resize_workers_keeps_the_residuals_of_the_kept_workers_and_zeros_new_ones():
    tx = lo.lookahead(
        optax.sgd(0.1), k=2, workers=3, communication_dtype=jnp.int8, error_feedback=True
    )
    params = lo.replicate({"w": jnp.zeros(40)}, 3)
    state = tx.init(params)
    step = jax.jit(tx.update)
    grads = _grads({"w": jnp.zeros(40)}, 3, 4)
    for _ in range(2):
        updates, state = step(grads, state, params)
        params = optax.apply_updates(params, updates)
    assert float(jnp.abs(state.residual["w"]).max()) > 0
    new_params, new_state = lo.resize_workers(state, params, 4)
    assert new_state.residual["w"].shape == (4, 40)
    np.testing.assert_array_equal(new_state.residual["w"][:3], state.residual["w"])
    np.testing.assert_array_equal(new_state.residual["w"][3], np.zeros(40))
    tx4 = lo.lookahead(
        optax.sgd(0.1), k=2, workers=4, communication_dtype=jnp.int8, error_feedback=True
    )
    tx4.update(_grads({"w": jnp.zeros(40)}, 4, 5), new_state, new_params)  # runs


@pytest.mark.slow
def test_the_comm_benchmark_counts_narrow_collectives(tmp_path):
    """benchmarks/diloco.py --comm --quick: each quantized point moves only all-to-alls and
    all-gathers, int8 and fp8 a quarter of f32's wire bytes, int4 an eighth, int2 a sixteenth
    (plus the scales); overlap moves the f32 bytes."""
    import json
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parent.parent
    subprocess.run(
        [sys.executable, str(root / "benchmarks" / "diloco.py"), "--comm", "--quick",
         "--no-progress", "--out", str(tmp_path)],
        check=True, cwd=root, capture_output=True, timeout=900,
    )  # fmt: skip
    methods = json.loads((tmp_path / "diloco_comm_quick.json").read_text())["methods"]
    f32 = methods["f32"]["wire_bytes"]
    for name, share in [("int8", 1 / 4), ("fp8_ef", 1 / 4), ("int4_ef", 1 / 8), ("int2", 1 / 16)]:
        assert methods[name]["collectives"] == ["all-gather", "all-to-all"]
        # Plus the scales: 4 bytes per 256 values against f32's 4 per value (and padding).
        assert share <= methods[name]["wire_bytes"] / f32 <= (share + 1 / 256) * 1.02, name
    assert methods["tau1_a05"]["wire_bytes"] == f32
    assert methods["f32"]["collectives"] == ["all-reduce"]

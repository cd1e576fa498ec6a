"""Overlapped fragments and mixing (``overlap=tau``, ``mixing=a``): torchft's regression
fixtures, the step-wise reference, checkpoints with a fragment in flight, the arguments."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lookahead_optax as lo
from tests import reference as ref

TORCHFT = pathlib.Path(__file__).parent / "data" / "torchft"
FIXTURE = "torchft.diloco_regression_test.DiLoCoMockedUpdateTest.test_diloco_mocked_updates_{}.json"
# torchft's parameterisation of test_diloco_mocked_updates, in order: (delay, alpha).
CASES = [(0, 0.0), (0, 0.5), (0, 1.0), (1, 0.0), (1, 0.5), (1, 1.0)]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_torchft_regression_fixtures(case):
    """torchft's DiLoCo with two real replicas, sync_every=6, two fragments (one layer each),
    inner p -= 1 * grad (grad 2), outer p -= 2 * Delta: every step of both replicas' params
    and the global params it recorded, exactly."""
    overlap, mixing = CASES[case]
    fixture = json.loads((TORCHFT / FIXTURE.format(case)).read_text())
    names = ["layers.0.weight", "layers.1.weight"]
    tx = lo.lookahead(
        optax.sgd(1.0), k=6, outer=optax.sgd(2.0), fragments=2, workers=2,
        overlap=overlap, mixing=mixing,
    )  # fmt: skip
    params = lo.replicate({name: jnp.ones((1, 1)) for name in names}, 2)
    state = tx.init(params)
    step = jax.jit(tx.update)
    history, slow = [], []
    for _ in range(16):
        history.append(params)
        slow.append(state.slow)
        grads = jax.tree.map(lambda p: 2 * jnp.ones_like(p), params)
        updates, state = step(grads, state, params)
        params = optax.apply_updates(params, updates)
    for replica, record in enumerate(fixture):
        for t, expected in record[0]["history"].items():
            got = {name: np.asarray(history[int(t)][name][replica]) for name in names}
            for name in names:
                np.testing.assert_array_equal(got[name], np.asarray(expected[name]), err_msg=f"{t}")
        for t, expected in record[0]["global_parameter_history"].items():
            for name in names:
                np.testing.assert_array_equal(slow[int(t)][name], np.asarray(expected[name]))


def _problem(workers, seed=0):
    rng = np.random.default_rng(seed)
    params0 = [rng.normal(size=(3, 2)), rng.normal(size=(4,)), rng.normal(size=(5,))]
    targets = [[rng.normal(size=np.shape(p)) for p in params0] for _ in range(workers)]
    scales = [rng.uniform(0.5, 2.0, size=np.shape(p)) for p in params0]

    def grad_fn(w):
        return lambda ps: [s * (p - t) for p, s, t in zip(ps, scales, targets[w])]

    return params0, [grad_fn(w) for w in range(workers)]


@pytest.mark.parametrize(
    "workers, fragments, k, overlap, mixing",
    [
        (2, 2, 4, 1, 0.5),
        (2, 1, 4, 2, 0.25),
        pytest.param(3, 2, 6, 1, 0.0, marks=pytest.mark.slow),
        pytest.param(2, 2, 8, 3, 0.5, marks=pytest.mark.slow),
        pytest.param(1, 3, 6, 1, 1.0, marks=pytest.mark.slow),
        pytest.param(2, 2, 6, 0, 0.5, marks=pytest.mark.slow),
    ],
)
def test_matches_the_stepwise_reference(workers, fragments, k, overlap, mixing):
    _check_against_the_reference(workers, fragments, k, overlap, mixing, "update")


def test_mixing_through_update_and_apply_matches_the_reference():
    """update_and_apply takes its fused path here (no overlap, one fragment) and must land each
    worker on phi + mixing (theta - phi) as tx.update does, not on phi."""
    _check_against_the_reference(2, 1, 4, 0, 0.5, "update_and_apply")


def _check_against_the_reference(workers, fragments, k, overlap, mixing, entry):
    params0, grad_fns = _problem(workers)
    groups = ref.fragment_groups([np.size(p) for p in params0], fragments)
    fast_ref, slow_ref = ref.streaming_trajectory(
        params0, grad_fns, ref.Momentum(0.1, 0.9), k, ref.NesterovSGD(0.7, 0.9), 3 * k,
        groups=groups, overlap=overlap, mixing=mixing,
    )  # fmt: skip
    tx = lo.lookahead(
        optax.sgd(0.1, momentum=0.9), k=k, outer=optax.sgd(0.7, momentum=0.9, nesterov=True),
        workers=workers, fragments=fragments, overlap=overlap, mixing=mixing,
    )  # fmt: skip
    params = lo.replicate([jnp.asarray(p, jnp.float32) for p in params0], workers)
    state = tx.init(params)
    if entry == "update":
        update = jax.jit(tx.update)

        def step(grads, state, params):
            updates, state = update(grads, state, params)
            return optax.apply_updates(params, updates), state
    else:
        assert lo.fused_path_taken(tx, params, state, params)
        step = jax.jit(lambda grads, state, params: lo.update_and_apply(tx, grads, state, params))
    for t in range(3 * k):
        grads = [
            jnp.stack([jnp.asarray(g, jnp.float32) for g in gs])
            for gs in zip(
                *[grad_fns[w]([np.asarray(p[w]) for p in params]) for w in range(workers)]
            )
        ]
        params, state = step(grads, state, params)
        for w in range(workers):
            for got, want in zip(params, fast_ref[t][w]):
                np.testing.assert_allclose(got[w], want, rtol=2e-5, atol=2e-5, err_msg=f"step {t}")
        for got, want in zip(state.slow, slow_ref[t]):
            np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5, err_msg=f"step {t}")


def _run(tx, params, state, steps, seed=1):
    step = jax.jit(tx.update)
    keys = jax.random.split(jax.random.key(seed), steps)
    for key in keys:
        grads = jax.tree.map(lambda p: p + jax.random.normal(key, p.shape), params)
        updates, state = step(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params, state


def _equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_overlap_0_mixing_0_is_the_plain_lookahead_bit_for_bit():
    params = lo.replicate({"a": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(4)}, 2)
    outer = optax.sgd(0.7, momentum=0.9, nesterov=True)
    plain = lo.lookahead(optax.adam(0.1), k=4, outer=outer, workers=2, fragments=2)
    knobs = lo.lookahead(
        optax.adam(0.1), k=4, outer=outer, workers=2, fragments=2, overlap=0, mixing=0.0
    )
    p1, s1 = _run(plain, params, plain.init(params), 5)
    p2, s2 = _run(knobs, params, knobs.init(params), 5)
    _equal(p1, p2)
    _equal(s1, s2)
    assert s2.in_flight is None and s2.residual is None


def test_in_flight_state_is_the_average_sent():
    """Between the send (step 3 - 1 = 2) and the sync (step 3) the state holds the average of
    phi - theta over the workers, taken from the params after step 2."""
    tx = lo.lookahead(optax.sgd(0.5), k=6, alpha=0.5, workers=2, fragments=2, overlap=1)
    params = lo.replicate({"a": jnp.ones(3), "b": jnp.ones(2)}, 2)
    state = tx.init(params)
    params0 = params
    params, state = _run(tx, params, state, 2)
    assert float(jnp.abs(state.in_flight["a"]).max()) == 0.0  # sent on the next call
    before = params
    params, state = _run(tx, params, state, 1)
    want = jnp.mean(params0["a"] - before["a"], axis=0)
    np.testing.assert_allclose(state.in_flight["a"], want, rtol=1e-6)


@pytest.mark.slow
def test_a_checkpoint_with_a_fragment_in_flight_resumes_bit_for_bit(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    tx = lo.lookahead(
        optax.adam(0.05), k=8, outer=optax.sgd(0.7, momentum=0.9, nesterov=True), workers=2,
        fragments=2, overlap=3, mixing=0.5,
    )  # fmt: skip
    params = lo.replicate({"a": jnp.arange(6.0).reshape(2, 3) / 5, "b": jnp.ones(4)}, 2)
    # Fragment 0 syncs at step 4, sent after step 1: after 3 steps it is in flight.
    params, state = _run(tx, params, tx.init(params), 3)
    assert float(jnp.abs(state.in_flight["a"]).max()) > 0
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "ckpt", {"params": params, "state": state})
    with ocp.StandardCheckpointer() as ckptr:
        target = {"params": params, "state": tx.init(params)}
        restored = ckptr.restore(tmp_path / "ckpt", target)
    _equal(restored["state"], state)
    p1, s1 = _run(tx, params, state, 13, seed=2)
    p2, s2 = _run(tx, restored["params"], restored["state"], 13, seed=2)
    _equal(p1, p2)
    _equal(s1, s2)


def test_the_in_flight_average_is_a_leaf_of_the_checkpoint_tree():
    tx = lo.lookahead(optax.sgd(0.1), k=4, workers=2, overlap=1)
    params = lo.replicate({"a": jnp.ones(3), "n": jnp.int32(1)}, 2)
    state = tx.init(params)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state)]
    assert ".in_flight['a']" in paths
    assert not any(".residual" in p for p in paths)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(k=6, fragments=2, overlap=3), r"overlap must be in \[0, k / fragments\) = \[0, 3\)"),
        (dict(k=4, overlap=4), r"overlap must be in \[0, k / fragments\) = \[0, 4\)"),
        (dict(k=4, overlap=-1), "overlap must be an int in"),
        (dict(k=4, overlap=1.0), "overlap must be an int in"),
        (dict(k=4, overlap=True), "overlap must be an int in"),
        (dict(k=4, mixing=1.5), r"mixing must be a number in \[0, 1\]"),
        (dict(k=4, mixing=-0.1), r"mixing must be a number in \[0, 1\]"),
        (dict(k=4, mixing="0.5"), r"mixing must be a number in \[0, 1\]"),
        (dict(k=jnp.asarray(4), overlap=1), "overlap > 0 needs k to be a Python int"),
        (dict(k=4, overlap=1, alpha=lo.adaptive_alpha()), "overlap > 0 does not support alpha"),
    ],
)
def test_arguments_are_checked_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lo.lookahead(optax.sgd(0.1), **kwargs)


@pytest.mark.slow
def test_update_and_apply_with_overlap_takes_the_traced_path():
    """update_and_apply decides one sync per step; an overlapped lookahead refuses that
    decision (like fragments > 1) and decides for itself: same trajectory as tx.update."""
    tx = lo.lookahead(optax.sgd(0.3), k=4, alpha=0.5, overlap=2, mixing=0.5)
    params = {"w": jnp.arange(3.0)}
    state = tx.init(params)
    p1, s1 = _run(tx, params, state, 9)
    p2, s2 = params, state
    for key in jax.random.split(jax.random.key(1), 9):
        grads = jax.tree.map(lambda p: p + jax.random.normal(key, p.shape), p2)
        p2, s2 = lo.update_and_apply(tx, grads, s2, p2)
    np.testing.assert_allclose(p1["w"], p2["w"], rtol=1e-6)


def test_a_state_made_without_overlap_is_refused_by_name():
    params = {"w": jnp.ones(3)}
    plain = lo.lookahead(optax.sgd(0.1), k=4)
    overlapped = lo.lookahead(optax.sgd(0.1), k=4, overlap=1)
    with pytest.raises(
        ValueError, match="this lookahead has overlap=1, the state was made without"
    ):
        overlapped.update(params, plain.init(params), params)
    with pytest.raises(ValueError, match="overlap=0, the state was made with overlap > 0"):
        plain.update(params, overlapped.init(params), params)


def _body_users(text):
    """Instruction name -> (op, names of the instructions that read it), in one computation."""
    import re

    from benchmarks import _hlo

    ops, users = {}, {}
    for name, _, op, args in _hlo._INSTRUCTION.findall(text):
        ops[name] = op
        for operand in re.findall(r"%([\w.\-]+)", args):
            users.setdefault(operand, []).append(name)
    return ops, users


@pytest.mark.slow
@pytest.mark.parametrize("communication_dtype", [None, jnp.int8])
def test_in_a_scan_nothing_of_the_sending_step_waits_for_the_collective(communication_dtype):
    """A lax.scan over 2k steps, 8 workers sharded over 8 devices, overlap 2: in the scan's
    body the conditionals that hold the collectives (the sends) are read only by the loop
    carry (the state's in_flight and stats) and by each other (the stats record threads
    through both fragments' sends): no inner step, landing or sync of that step reads
    their result. The next steps read it through the sync's conditional."""
    from jax.sharding import AxisType, NamedSharding, PartitionSpec

    from benchmarks import _hlo

    n, k = 8, 8
    tx = lo.lookahead(
        optax.adam(0.01), k=k, outer=optax.sgd(0.7, momentum=0.9, nesterov=True), workers=n,
        fragments=2, overlap=2, communication_dtype=communication_dtype,
    )  # fmt: skip
    mesh = jax.make_mesh((n,), ("workers",), axis_types=(AxisType.Explicit,))
    sharding = NamedSharding(mesh, PartitionSpec("workers"))
    params = jax.device_put(lo.replicate({"a": jnp.ones((64, 32)), "b": jnp.ones((32, 16))}, n),
                            sharding)  # fmt: skip

    def program(params, state, data):
        def body(carry, x):
            params, state = carry
            grads = jax.tree.map(lambda p: p * x, params)
            updates, state = tx.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), None

        return jax.lax.scan(body, (params, state), data)[0]

    with jax.set_mesh(mesh):
        state = jax.jit(tx.init)(params)
        hlo = jax.jit(program).lower(params, state, jnp.linspace(0.5, 1.5, 2 * k)).compile()
        hlo = hlo.as_text()
    module = _hlo.computations(hlo)
    (body,) = [b for text in module.values() for b in _hlo._loop_bodies(text)]
    ops, users = _body_users(module[body])
    holders = [
        name
        for name, op in ops.items()
        if op == "conditional"
        and _hlo.count_collectives(_branches_text(module, module[body], name))
    ]
    assert len(holders) == 2, holders  # one send per fragment
    for holder in holders:
        seen, stack = set(), [holder]
        while stack:
            for user in users.get(stack.pop(), []):
                if user not in seen:
                    seen.add(user)
                    stack.append(user)
        readers = {ops[name] for name in seen} - {"get-tuple-element", "tuple"}
        assert readers <= {"conditional"}, readers
        assert {name for name in seen if ops[name] == "conditional"} <= set(holders)


def _branches_text(module, body_text, name):
    """The text reached from the branches of the conditional ``name`` in ``body_text``."""
    import re

    from benchmarks import _hlo

    line = next(x for x in body_text.splitlines() if re.match(rf"\s*%{re.escape(name)} = ", x))
    return "\n".join(_hlo.reachable(module, b) for group in _hlo.branches(line) for b in group)


def test_check_composition_says_it_cannot_check_a_mixed_landing():
    params = {"w": jnp.ones(3)}
    with pytest.raises(ValueError, match="mixing=0.5 lands them on phi"):
        lo.check_composition(lo.lookahead(optax.sgd(0.1), k=4, mixing=0.5), params)
    assert lo.check_composition(lo.lookahead(optax.sgd(0.1), k=4, overlap=1), params) is None

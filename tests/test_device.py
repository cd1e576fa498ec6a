"""Ready for an accelerator: benchmarks/device.py --quick, and the opt-in sync paths.

- ``update_and_apply(sync=...)`` (static sync, two executables chosen from Python) and
  ``formulation="select"`` (no conditional) take the same steps as ``tx.update``;
- ``StaticSyncStep`` owns the counter and catches a state changed behind its back;
- ``StaticSyncStep(offload=True)`` keeps the slow weights and outer state in
  ``pinned_host`` memory and takes the same steps as the in-device lookahead;
- the quick run of benchmarks/device.py writes a complete report.
"""

import json
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lookahead_optax as lo
from lookahead_optax import _offload
from tests.helpers import (
    CONFIGURATIONS,
    configuration_history,
    initial_params,
    loss_grad,
    quick_few,
    run_steps,
    two_call_step,
)

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
NUM_STEPS = 13  # ends mid-cycle for k = 2, 3, 5
# The configurations whose tx takes update_and_apply's fused path (sync= needs it).
FUSED = [
    name
    for name in CONFIGURATIONS
    if name not in ("multi_steps", "multi_transform", "no_lookahead")
]
# A few that differ in what the sync step does (StaticSyncStep is tested on all of FUSED).
SOME = ["adam", "pullback", "adaptive_alpha", "clip_then_lookahead", "inject_hyperparams"]
OFFLOAD_CONFIGURATIONS = {
    "adam": lambda: lo.lookahead(optax.adam(0.05), k=3, alpha=0.5),
    "outer_nesterov": lambda: lo.lookahead(
        optax.adam(0.05), k=2, outer=optax.sgd(0.7, momentum=0.9, nesterov=True)
    ),
    "outer_adam_reset": lambda: lo.lookahead(
        optax.sgd(0.1, momentum=0.9), k=3, outer=optax.adam(0.1), inner_state="reset"
    ),
    "slow_dtype_f32_of_bf16": lambda: lo.lookahead(optax.sgd(0.1), k=2, slow_dtype=jnp.float32),
    "clip_then_lookahead": lambda: optax.chain(
        optax.clip_by_global_norm(0.5), lo.lookahead(optax.adam(0.05), 3)
    ),
}
needs_memory_kinds = pytest.mark.skipif(
    not lo.experimental.memory_kinds_supported(),
    reason=f"jax {jax.__version__} on {jax.default_backend()} exposes no pinned_host memory",
)


def reference_history(tx, params, num_steps=NUM_STEPS):
    """(params, opt_state) after every step of jit(tx.update) + apply_updates."""
    return run_steps(tx, params, num_steps=num_steps)


def assert_states_close(got, want, step, exact=False):
    got_leaves, want_leaves = jax.tree.leaves(got), jax.tree.leaves(want)
    assert jax.tree.structure(got) == jax.tree.structure(want), f"step {step}"
    for a, b in zip(got_leaves, want_leaves):
        a, b = np.asarray(a), np.asarray(b)
        if exact or not jnp.issubdtype(a.dtype, jnp.inexact):
            np.testing.assert_array_equal(a, b, err_msg=f"step {step}")
        else:  # an ulp where XLA fuses differently (see test_fused), or where tx.update's
            # p + (phi - p) cannot land exactly in a narrow params dtype
            eps = float(jnp.finfo(a.dtype).eps)
            rtol, atol = max(1e-6, eps), max(1e-7, eps / 64)
            np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=f"step {step}")


def static_train_step(tx):
    def train_step(params, opt_state, *, sync):
        return lo.update_and_apply(tx, loss_grad(params), opt_state, params, sync=sync)

    return train_step


# ---- update_and_apply(sync=...) and formulation="select" ----


@pytest.mark.parametrize("name", quick_few(SOME, ["inject_hyperparams"]))
def test_static_sync_from_next_call_syncs_equals_tx_update(name):
    tx = CONFIGURATIONS[name]()
    step = jax.jit(static_train_step(tx), static_argnames="sync")
    params = initial_params()
    opt_state = tx.init(params)
    for n, (want_params, want_state) in enumerate(configuration_history(name), start=1):
        params, opt_state = step(params, opt_state, sync=lo.next_call_syncs(opt_state))
        assert_states_close((params, opt_state), (want_params, want_state), n)


@pytest.mark.parametrize("name", quick_few(SOME, ["pullback"]))
def test_select_formulation_equals_tx_update(name):
    tx = CONFIGURATIONS[name]()
    step = jax.jit(lambda p, s: lo.update_and_apply(tx, loss_grad(p), s, p, formulation="select"))
    params = initial_params()
    opt_state = tx.init(params)
    for n, want in enumerate(configuration_history(name), start=1):
        params, opt_state = step(params, opt_state)
        assert_states_close((params, opt_state), want, n)


def _hlo(fn, *args):
    return jax.jit(fn).lower(*args).compile().as_text()


def test_which_programs_hold_a_conditional():
    tx = lo.lookahead(optax.adam(0.05), k=3)
    params = initial_params()
    opt_state = tx.init(params)
    grads = loss_grad(params)

    def with_(**kw):
        return lambda p, s: lo.update_and_apply(tx, grads, s, p, **kw)

    assert "conditional(" in _hlo(with_(), params, opt_state)
    assert "conditional(" in _hlo(with_(formulation="cond"), params, opt_state)
    for kw in (dict(formulation="select"), dict(sync=True), dict(sync=False)):
        assert "conditional(" not in _hlo(with_(**kw), params, opt_state), kw


def test_the_default_path_is_unchanged_on_cpu():
    # The CPU default is the whole-step cond: the same program as formulation="cond".
    assert lo.experimental.default_formulation("cpu") == "cond"
    tx = lo.lookahead(optax.adam(0.05), k=3)
    params = initial_params()
    opt_state = tx.init(params)

    def jaxpr(**kw):
        return str(jax.make_jaxpr(lambda p, s: lo.update_and_apply(tx, p, s, p, **kw))(
            params, opt_state))  # fmt: skip

    assert jaxpr() == jaxpr(formulation="cond")
    assert jaxpr() != jaxpr(formulation="select")


def _slow_reads(fn, tx, params):
    """How many equations of fn's jaxpr read the lookahead's slow weights."""
    opt_state = tx.init(params)
    closed = jax.make_jaxpr(fn)(params, opt_state)
    paths = [path for path, _ in jax.tree_util.tree_flatten_with_path((params, opt_state))[0]]
    slow = {
        var
        for var, path in zip(closed.jaxpr.invars, paths)
        if any(getattr(key, "name", None) == "slow" for key in path)
    }
    assert slow
    return sum(
        any(v in slow for v in eqn.invars if type(v).__name__ != "Literal")
        for eqn in closed.jaxpr.eqns
    )


def test_a_static_non_sync_step_never_reads_the_slow_weights():
    tx = lo.lookahead(optax.adam(0.05), k=3)
    params = initial_params()
    train_step = static_train_step(tx)
    assert _slow_reads(lambda p, s: train_step(p, s, sync=False), tx, params) == 0
    assert _slow_reads(lambda p, s: train_step(p, s, sync=True), tx, params) > 0


def test_bad_arguments():
    params = initial_params()
    no_lookahead = optax.adam(0.05)
    with pytest.raises(ValueError, match="fused path"):
        lo.update_and_apply(no_lookahead, params, no_lookahead.init(params), params, sync=True)
    tx = lo.lookahead(optax.sgd(0.1), k=2)
    with pytest.raises(TypeError, match="static_argnames"):
        lo.update_and_apply(tx, params, tx.init(params), params, sync=jnp.array(True))
    with pytest.raises(ValueError, match="formulation"):
        lo.update_and_apply(tx, params, tx.init(params), params, formulation="where")
    with pytest.raises(ValueError, match="exactly one"):
        lo.next_call_syncs(no_lookahead.init(params))


def test_next_call_syncs_follows_the_period():
    tx = lo.lookahead(optax.sgd(0.1), k=3)
    params = initial_params()
    opt_state = tx.init(params)
    seen = []
    step = jax.jit(lambda p, s: lo.update_and_apply(tx, p, s, p))
    for _ in range(7):
        seen.append(lo.next_call_syncs(opt_state))
        params, opt_state = step(params, opt_state)
    assert seen == [False, False, True, False, False, True, False]


# ---- StaticSyncStep ----


@pytest.mark.parametrize("name", quick_few(FUSED, ["adam", "pullback", "inject_hyperparams"]))
def test_static_sync_step_equals_tx_update(name):
    tx = CONFIGURATIONS[name]()
    step = lo.experimental.StaticSyncStep(static_train_step(tx), donate_argnums=(0, 1))
    params = initial_params()
    opt_state = tx.init(params)
    history = configuration_history(name)
    params, opt_state = jax.tree.map(jnp.copy, (params, opt_state))
    for n, want in enumerate(history, start=1):
        assert step.next_call_syncs() in (None, lo.next_call_syncs(opt_state))
        params, opt_state = step(params, opt_state)
        assert_states_close((params, opt_state), want, n)
        assert step.next_call_syncs() == lo.next_call_syncs(opt_state)
    step.check()
    assert step.calls == NUM_STEPS
    assert sorted(sync for sync, _ in step._jitted) == [False, True]  # two executables


def test_static_sync_step_executables_hold_no_conditional():
    tx = lo.lookahead(optax.adam(0.05), k=3)
    step = lo.experimental.StaticSyncStep(static_train_step(tx))
    params = initial_params()
    for sync in (False, True):
        assert "conditional(" not in step.lower(sync, params, tx.init(params)).compile().as_text()


def test_a_state_stepped_behind_the_steps_back_is_an_error_not_a_silent_desync():
    tx = lo.lookahead(optax.sgd(0.1), k=3)
    step = lo.experimental.StaticSyncStep(static_train_step(tx))
    params = initial_params()
    opt_state = tx.init(params)
    params, opt_state = step(params, opt_state)  # count 1 on both sides
    params, opt_state = lo.update_and_apply(tx, params, opt_state, params)  # count 2: not told
    params, opt_state = step(params, opt_state)  # thinks count 1 -> 2: no sync; the state syncs
    with pytest.raises(RuntimeError, match="resync"):
        step.check()


def test_the_check_at_the_next_sync_raises_by_itself():
    tx = lo.lookahead(optax.sgd(0.1), k=2)
    step = lo.experimental.StaticSyncStep(static_train_step(tx))
    params = initial_params()
    opt_state = tx.init(params)
    params, opt_state = step(params, opt_state)
    params, opt_state = lo.update_and_apply(tx, params, opt_state, params)  # a sync, not told
    with pytest.raises(RuntimeError, match="disagreed"):
        for _ in range(6):  # the disagreement of call 2 is read at a later sync
            params, opt_state = step(params, opt_state)


def test_a_new_period_needs_resync_and_resync_fixes_it():
    # A state restored from a run with k=2 into a transformation with k=3: the cycle under
    # way keeps period 2, the next ones have period 3 (as with a k changed under
    # inject_hyperparams). The step counted with period 2 until told.
    tx = lo.lookahead(optax.sgd(0.1), k=3)
    restored = lo.lookahead(optax.sgd(0.1), k=2).init(initial_params())
    step = lo.experimental.StaticSyncStep(static_train_step(tx))
    params, opt_state = initial_params(), restored
    for _ in range(2):  # the sync ends the period-2 cycle
        params, opt_state = step(params, opt_state)
    assert int(opt_state.syncs) == 1 and int(opt_state.period) == 3
    step.resync(opt_state)
    reference = (params, opt_state)
    for n in range(7):
        params, opt_state = step(params, opt_state)
        reference = two_call_step(*reference, loss_grad(reference[0]), tx)
        assert_states_close((params, opt_state), reference, n)
    step.check()
    # Without resync the new period is caught.
    step = lo.experimental.StaticSyncStep(static_train_step(tx))
    params, opt_state = initial_params(), restored
    with pytest.raises(RuntimeError, match="resync"):
        for _ in range(8):
            params, opt_state = step(params, opt_state)
        step.check()


# ---- offloaded slow weights ----


def _device_bytes(tree):
    return sum(
        x.nbytes
        for x in jax.tree.leaves(tree)
        if isinstance(x, jax.Array) and x.sharding.memory_kind != _offload.HOST
    )


def _host_leaves(opt_state):
    (state,) = lo._fused.find_states(opt_state)
    return jax.tree.leaves((state.slow, state.outer_state))


@needs_memory_kinds
@pytest.mark.parametrize("name", quick_few(OFFLOAD_CONFIGURATIONS, ["outer_adam_reset"]))
def test_offloaded_steps_equal_the_in_device_lookahead(name):
    tx = OFFLOAD_CONFIGURATIONS[name]()
    params = initial_params()
    if name == "slow_dtype_f32_of_bf16":
        params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    in_device = lo.experimental.StaticSyncStep(static_train_step(tx), donate_argnums=(0, 1))
    offloaded = lo.experimental.StaticSyncStep(
        static_train_step(tx), donate_argnums=(0, 1), offload=True
    )
    # update_and_apply's cond path: it lands on the slow weights exactly, as these do.
    history = run_steps(tx, params, num_steps=NUM_STEPS, fused=True)
    a = jax.tree.map(jnp.copy, (params, tx.init(params)))
    b = jax.tree.map(jnp.copy, (params, tx.init(params)))
    for n, want in enumerate(history, start=1):
        a, b = in_device(*a), offloaded(*b)
        # The same executables' arithmetic: equal bit for bit to the in-device two executables,
        assert_states_close(b[0], a[0], n, exact=True)
        assert_states_close(lo.experimental.onload_state(b[1]), a[1], n, exact=True)
        # and to update_and_apply's cond formulation up to an ulp.
        assert_states_close((b[0], lo.experimental.onload_state(b[1])), want, n)
        assert all(x.sharding.memory_kind == "pinned_host" for x in _host_leaves(b[1]))
    offloaded.check()


@needs_memory_kinds
def test_offloaded_state_costs_the_device_what_adam_costs():
    inner = optax.adam(0.05)
    tx = lo.lookahead(inner, k=3, outer=optax.sgd(0.7, momentum=0.9, nesterov=True))
    params = initial_params()
    step = lo.experimental.StaticSyncStep(static_train_step(tx), offload=True)
    opt_state = tx.init(params)
    counters = 3 * 4  # count, syncs, period: int32 scalars
    params_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    assert (
        _device_bytes(opt_state) == _device_bytes(inner.init(params)) + 2 * params_bytes + counters
    )
    for _ in range(4):  # through a sync
        params, opt_state = step(params, opt_state)
        assert _device_bytes(opt_state) == _device_bytes(inner.init(params)) + counters
    # The non-sync executable does not even take the slow weights or the outer state.
    (state,) = lo._fused.find_states(opt_state)
    assert int(state.count) == 1
    lowered = step.lower(False, params, opt_state)
    non_sync_in = lowered.compile().memory_analysis().argument_size_in_bytes
    sync_in = step.lower(True, params, opt_state).compile().memory_analysis().argument_size_in_bytes
    assert sync_in - non_sync_in == 2 * params_bytes  # slow weights and momentum
    # nor returns them (the zeros standing in for them are dropped, so XLA removes them):
    # what goes in comes out updated, the agreement flag in and out.
    out_bytes = sum(
        np.dtype(x.dtype).itemsize * math.prod(x.shape) for x in jax.tree.leaves(lowered.out_info)
    )
    assert out_bytes == non_sync_in


@needs_memory_kinds
def test_offload_state_round_trip_and_errors():
    tx = lo.lookahead(optax.adam(0.05), k=3, outer=optax.sgd(0.5, momentum=0.9))
    params = initial_params()
    opt_state = tx.init(params)
    host = lo.experimental.offload_state(opt_state)
    assert all(x.sharding.memory_kind == "pinned_host" for x in _host_leaves(host))
    assert host.inner_state[0].mu["w"].sharding.memory_kind == "device"  # the inner state stays
    back = lo.experimental.onload_state(host)
    assert all(x.sharding.memory_kind == "device" for x in _host_leaves(back))
    assert_states_close(back, opt_state, "round trip", exact=True)
    with pytest.raises(ValueError, match="no LookaheadState"):
        lo.experimental.offload_state(optax.adam(0.1).init(params))


def test_offload_without_memory_kinds_says_so(monkeypatch):
    monkeypatch.setattr(_offload, "memory_kinds_supported", lambda device=None: False)
    tx = lo.lookahead(optax.sgd(0.1), k=2)
    params = initial_params()
    with pytest.raises(ValueError, match="pinned_host"):
        lo.experimental.offload_state(tx.init(params))


@pytest.mark.parametrize("version", [(0, 8, 3), (0, 10, 1)])
def test_offload_is_refused_on_cpu_jax_versions_where_it_breaks(monkeypatch, version):
    # Measured with .ci/floors: 0.8.x silently keeps the state on the device, 0.9.0-0.10.1
    # abort the process; both still list a pinned_host memory.
    monkeypatch.setattr(_offload, "_jax_version", lambda: version)
    assert not lo.experimental.memory_kinds_supported(jax.devices("cpu")[0])
    tx = lo.lookahead(optax.sgd(0.1), k=2)
    with pytest.raises(ValueError, match=r"needs jax >= 0\.10\.2"):
        lo.experimental.offload_state(tx.init(initial_params()))


# ---- benchmarks/device.py ----


def _device_module():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import device
    finally:
        sys.path.remove(str(BENCHMARKS))
    return device


def _check_report(report, formulations):
    env = report["environment"]
    assert {"jax", "jaxlib", "platform", "device", "xla_flags"} <= set(env)
    cond = report["cond"]
    assert all(math.isfinite(v) and v > 0 for v in cond["us_per_call"].values())
    for result in report["steps"]:
        assert set(result["contenders"]) == set(formulations)
        assert result["adam_step_s"] > 0
        for name, c in result["contenders"].items():
            for case in ("non_sync", "sync", "k=5", "k=20"):
                r = c["ratio_vs_adam"][case]["median"]
                assert math.isfinite(r) and r > 0, (name, case)
            conditionals = [e["conditionals"] for e in c["executables"].values()]
            if name in ("two_executables", "select", "offloaded", "optax.lookahead"):
                assert conditionals == [0] * len(conditionals), name
            else:
                assert max(conditionals) >= 1, name
    for result in report["steps"]:
        for name in ("tx.update", "update_and_apply", "two_executables"):
            if name in result["contenders"]:
                for e in result["contenders"][name]["executables"].values():
                    assert e["params_sized_copies"] == 0, name


@pytest.mark.slow  # a benchmark run (the slow marker's definition)
def test_device_benchmark_quick_run(tmp_path):
    # The static two executables only (compiling every formulation takes longer; the test
    # below runs them all, and the graph-conditionals child).
    device = _device_module()
    out = tmp_path / "device.json"
    report = device.main(["--quick", "--sizes", "40K/4", "--no-graph-conditionals",
                          "--formulations", "two_executables", "--out", str(out)])  # fmt: skip
    assert json.loads(out.read_text())["config"]["quick"] is True
    assert out.with_suffix(".md").read_text().startswith("### ")
    _check_report(report, ["two_executables"])
    if lo.experimental.memory_kinds_supported():
        assert report["link"]["GB_per_s"]["host_to_device"] > 0
        summary = report["offload"]["summary"]
        assert summary["device_state_bytes"] == summary["adam_device_state_bytes"] + 12
        assert summary["device_bytes_saved"] == report["offload"]["params_bytes"]
        assert summary["host_state_bytes"] == report["offload"]["params_bytes"]
    assert report["skipped"] == []


@pytest.mark.slow  # every formulation, and a second process with graph conditionals on
def test_device_benchmark_every_formulation_and_the_graph_conditionals_child(tmp_path):
    device = _device_module()
    report = device.main(["--quick", "--sizes", "40K/4", "--out", str(tmp_path / "d.json")])
    _check_report(report, device.FORMULATIONS)
    child = report["graph_conditionals"]
    assert "failed" not in child, child.get("failed")
    assert "--xla_gpu_enable_command_buffer=+CONDITIONAL" in child["xla_flags"]
    _check_report(child, device.OURS)


def test_results_md_section_is_replaced_not_appended(tmp_path, monkeypatch):
    device = _device_module()
    (tmp_path / "RESULTS.md").write_text((BENCHMARKS / "RESULTS.md").read_text())
    monkeypatch.setattr(device, "HERE", tmp_path)
    for summary in ("### first\n", "### second\n"):
        device.write_results_md(summary)
    text = (tmp_path / "RESULTS.md").read_text()
    assert text.count(device.MARK_BEGIN) == 1 and text.count(device.MARK_END) == 1
    assert "### second" in text and "### first" not in text
    assert text.startswith((BENCHMARKS / "RESULTS.md").read_text().split(device.MARK_BEGIN)[0])

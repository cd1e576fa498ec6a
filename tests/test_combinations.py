"""Where features meet (issue 18): the helpers around the core transformation in every
combination a user builds: slow_params, check_composition, the fused path's and offload's
messages, replicate/resize_workers, the argument and state checks, the type hints.

Each test here failed on the 0.3.0 tree and names the combination it guards.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lookahead_optax as lo
from lookahead_optax import _state

# ---- one implementation of "the outermost LookaheadStates of an opt_state" ----


def test_find_and_replace_states_reach_through_every_wrapper_and_stop_at_the_outermost():
    params = {"a": jnp.ones(2), "b": jnp.zeros(3)}
    nested = lo.lookahead(lo.lookahead(optax.sgd(0.1), k=2), k=4)
    tx = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.multi_transform(
            {"x": nested, "y": optax.MultiSteps(lo.lookahead(optax.adam(0.1), k=3), 2)},
            {"a": "x", "b": "y"},
        ),
    )
    opt_state = tx.init(params)
    states = _state.find_states(opt_state)
    assert [int(s.period) for s in states] == [4, 3]  # the nested k=2 one is inside the first
    assert _state.find_states((opt_state, [opt_state])) == states + states
    replaced = _state.replace_states(lambda s: s._replace(count=s.count + 7), opt_state)
    assert [int(s.count) for s in _state.find_states(replaced)] == [7, 7]
    inner = _state.find_states(_state.find_states(replaced)[0].inner_state)
    assert [int(s.count) for s in inner] == [0]  # only the outermost is replaced
    with pytest.raises(ValueError, match="exactly one .*found 2"):
        _state.the_state(opt_state, "opt_state")
    with pytest.raises(ValueError, match="found none"):
        _state.the_state(optax.adam(0.1).init(params), "opt_state")


def test_every_helper_module_uses_the_one_implementation():
    """The search was written five times (slow_params, the fused path, offload, resize_workers,
    check_composition); now the modules hold no search of their own."""
    import inspect

    from lookahead_optax import _compose, _fused, _offload, _slow, _workers

    assert _slow.find_states is _state.find_states
    assert _fused.find_states is _state.find_states
    for module in (_compose, _fused, _offload, _slow, _workers):
        source = inspect.getsource(module)
        assert "isinstance(x, LookaheadState)" not in source, module.__name__
        assert "is_leaf=lambda x: isinstance" not in source, module.__name__
        assert "is_leaf=_is_state" not in source, module.__name__


# ---- slow_params ----


@pytest.mark.parametrize("workers", [None, 1, 3])
def test_slow_params_returns_the_current_value_of_leaves_that_never_sync(workers):
    """A step counter and a flag kept in params: slow_params returns their current values
    (they are not synced, so the params are the answer), with and without workers. 0.3.0
    returned their initial values with workers=N."""
    params = {"w": jnp.ones(2), "step": jnp.zeros([], jnp.int32), "flag": jnp.array(False)}
    if workers is not None:
        params = lo.replicate(params, workers)
    tx = lo.lookahead(optax.sgd(0.1), k=2, workers=workers)
    opt_state = tx.init(params)
    for n in range(3):
        grads = {"w": jnp.ones_like(params["w"])}
        grads |= {key: jnp.zeros_like(params[key]) for key in ("step", "flag")}
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        step = params["step"] + 1 + (0 if workers is None else jnp.arange(workers))
        params = {**params, "step": step, "flag": jnp.ones_like(params["flag"])}
    slow = lo.slow_params(opt_state, params)
    assert slow["step"].dtype == jnp.int32 and slow["step"].shape == ()
    assert int(slow["step"]) == 3  # worker 0's with workers
    assert slow["flag"].dtype == jnp.bool_ and bool(slow["flag"])
    np.testing.assert_allclose(slow["w"], [0.9, 0.9], rtol=1e-6)  # synced at step 2, alpha 0.5


# ---- check_composition ----

MLP = {
    "layer0": {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "b": jnp.full(4, 0.5)},
    "layer1": {"w": jnp.linspace(2.0, -1.0, 8).reshape(4, 2), "b": jnp.array([1.0, -1.0])},
}
NESTEROV = optax.sgd(0.7, momentum=0.9, nesterov=True)


@pytest.mark.parametrize(
    ("fragments", "workers", "slow_step", "before"),
    [
        # The quick set: 3 fragments with and without workers, an alpha and an outer slow step
        # (test_check_composition_checks_every_fragment_sync runs 2 fragments). check_composition
        # is eager: each case compiles its ops anew for its shapes (3-6 s on 2 cores).
        pytest.param(2, None, "alpha", False, marks=pytest.mark.slow),
        (3, None, "outer", True),
        pytest.param(2, 2, "outer", False, marks=pytest.mark.slow),
        (3, 2, "alpha", True),
    ],
)
def test_check_composition_accepts_every_correct_fragments_lookahead(
    fragments, workers, slow_step, before
):
    """0.3.0 rejected these: it forced the last step of the cycle, where only the last fragment
    syncs, and compared every leaf with the slow weights."""
    kwargs = {"alpha": 0.5} if slow_step == "alpha" else {"outer": NESTEROV}
    tx = lo.lookahead(optax.adam(0.1), k=6, fragments=fragments, workers=workers, **kwargs)
    if before:  # something before the lookahead is allowed
        tx = optax.chain(optax.clip_by_global_norm(1.0), tx)
    params = MLP if workers is None else lo.replicate(MLP, workers)
    lo.check_composition(tx, params)


@pytest.mark.parametrize("workers", [None, 2])
def test_check_composition_checks_every_fragment_sync(workers):
    """Something after the lookahead that changes only the first fragment's updates (synced
    at step k / fragments, not at the end of the cycle) is caught, and the last one too."""
    params = MLP if workers is None else lo.replicate(MLP, workers)
    for first in (True, False):
        mask = jax.tree.map(lambda _: False, MLP)
        mask["layer0" if first else "layer1"]["w"] = True  # layer0.w syncs at step 3 of 6
        tx = optax.chain(
            lo.lookahead(optax.adam(0.1), k=6, fragments=2, workers=workers),
            optax.masked(optax.scale(1.001), mask),
        )
        with pytest.raises(ValueError, match="something after the lookahead changed its updates"):
            lo.check_composition(tx, params)


# ---- a state from a lookahead built with other options ----

MOMENTUM = optax.sgd(0.7, momentum=0.9)
PARAMS = {"w": jnp.array([1.0, -2.0, 0.5]), "b": jnp.zeros(2)}
MISMATCHES = {
    "outer added to an alpha run (0.2.0's state)": ({}, {"outer": MOMENTUM}, "alpha"),
    "outer removed": ({"outer": MOMENTUM}, {}, "outer=..., this lookahead has alpha"),
    "workers removed": ({"workers": 2}, {}, "workers=2, this lookahead has neither"),
    "workers added": ({}, {"workers": 2}, "neither workers nor axis_name, this lookahead has wo"),
    "other number of workers": ({"workers": 2}, {"workers": 3}, "workers=2, this .* workers=3"),
    "pullback added": ({}, {"inner_state": "pullback"}, "inner_state"),
    "pullback removed": ({"inner_state": "pullback"}, {}, 'inner_state="pullback"'),
    "adaptive alpha added": ({}, {"alpha": lo.adaptive_alpha()}, "adaptive_alpha"),
    "another outer optimizer": ({"outer": MOMENTUM}, {"outer": optax.adam(0.1)}, "outer="),
    "fragments added": (
        {"outer": MOMENTUM, "k": 4},
        {"outer": MOMENTUM, "k": 4, "fragments": 2},
        "fragments=2",
    ),
    "fragments changed, alpha": ({"k": 4, "fragments": 2}, {"k": 4}, "fragments=2, this .*=1"),
}


def _params_for(kwargs):
    workers = kwargs.get("workers")
    return PARAMS if workers is None else lo.replicate(PARAMS, workers)


@pytest.mark.parametrize("name", MISMATCHES)
@pytest.mark.parametrize("jit", [False, True])
def test_a_state_made_with_other_options_is_a_value_error_naming_the_mismatch(name, jit):
    """0.3.0 failed with TypeError/AttributeError deep inside, or (workers added) ran on."""
    made, used, names = MISMATCHES[name]
    opt_state = lo.lookahead(optax.adam(0.1), **{"k": 3, **made}).init(_params_for(made))
    tx = lo.lookahead(optax.adam(0.1), **{"k": 3, **used})
    params = _params_for(used)
    update = jax.jit(tx.update) if jit else tx.update
    with pytest.raises(ValueError, match=f"built with other options: .*{names}"):
        update(params, opt_state, params)
    # The state the same options make is accepted (the checks run when update is traced).
    jax.eval_shape(update, params, tx.init(params), params)


@pytest.mark.skipif(
    not lo.experimental.memory_kinds_supported(), reason="no pinned_host memory here"
)
def test_an_offloaded_state_passed_to_update_names_onload_state():
    """0.3.0 raised jax's "memory_space of all inputs passed to `sub` must be the same"."""
    tx = lo.lookahead(optax.adam(0.1), k=2)
    opt_state = lo.experimental.offload_state(tx.init(PARAMS))
    for update in (tx.update, jax.jit(tx.update)):
        with pytest.raises(ValueError, match="host memory .*onload_state"):
            update(PARAMS, opt_state, PARAMS)
    with pytest.raises(ValueError, match="host memory .*onload_state"):
        lo.update_and_apply(tx, PARAMS, opt_state, PARAMS)
    updates, _ = tx.update(
        PARAMS, lo.experimental.onload_state(opt_state), PARAMS
    )  # the documented way
    assert jax.tree.structure(updates) == jax.tree.structure(PARAMS)


# ---- the fused path, StaticSyncStep and next_call_syncs with fragments ----


@pytest.mark.parametrize("workers", [None, 2])
def test_a_decided_sync_with_fragments_is_refused_naming_fragments(workers):
    """0.3.0 said "exactly one lookahead reached through wrappers", which this tx has."""
    params = MLP if workers is None else lo.replicate(MLP, workers)
    tx = optax.chain(
        optax.clip_by_global_norm(1.0),
        lo.lookahead(optax.adam(0.1), k=4, fragments=2, workers=workers),
    )
    opt_state = tx.init(params)
    assert not lo.fused_path_taken(tx, params, opt_state, params)
    for sync in (True, False):
        with pytest.raises(ValueError, match=r"fragments=2.*no single sync decision"):
            lo.update_and_apply(tx, params, opt_state, params, sync=sync)
    step = lo.experimental.StaticSyncStep(
        lambda p, s, *, sync: lo.update_and_apply(tx, p, s, p, sync=sync), donate_argnums=()
    )
    with pytest.raises(ValueError, match=r"fragments=2.*StaticSyncStep"):
        step(params, opt_state)
    # sync=None takes the tx.update path: the same step as tx.update and apply_updates.
    got, _ = jax.jit(lambda p, s: lo.update_and_apply(tx, p, s, p))(params, opt_state)
    want = jax.jit(lambda p, s: optax.apply_updates(p, tx.update(p, s, p)[0]))(params, opt_state)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(g, w)


def test_a_refused_decision_without_fragments_still_names_the_wrapper():
    params = {"w": jnp.ones(3)}
    tx = optax.MultiSteps(lo.lookahead(optax.sgd(0.1), k=2), every_k_schedule=2)
    with pytest.raises(ValueError, match="fused path.*MultiSteps"):
        lo.update_and_apply(tx, params, tx.init(params), params, sync=True)
    two = optax.chain(lo.lookahead(optax.sgd(0.1), k=2), lo.lookahead(optax.sgd(0.1), k=3))
    with pytest.raises(ValueError, match="holds 2 .*lookahead states, not one"):
        lo.update_and_apply(two, params, two.init(params), params, sync=True)


# ---- workers=N without lo.replicate ----


@pytest.mark.parametrize("adam", [False, True])
def test_forgetting_replicate_names_workers_and_replicate(adam):
    """0.3.0: jax's "vmap was requested to map its argument along axis 0 ... rank" at init
    for a scalar leaf, and a shapes message without a word of workers at update."""
    params = {"w": jnp.ones(3), "b": jnp.zeros(())}
    inner = optax.adam(0.1) if adam else optax.sgd(0.1)
    tx = lo.lookahead(inner, k=2, workers=4)
    message = r"workers=4, every leaf of params needs a leading worker axis of size 4.*replicate"
    with pytest.raises(ValueError, match=message):
        tx.init(params)
    opt_state = tx.init(lo.replicate(params, 4))
    with pytest.raises(ValueError, match=message):
        tx.update(params, opt_state, params)
    replicated = lo.replicate(params, 4)
    with pytest.raises(ValueError, match=r"workers=4, every leaf of grads.*replicate"):
        tx.update(params, opt_state, replicated)
    tx.update(replicated, opt_state, replicated)  # the documented way


# ---- what lookahead accepts as inner (and outer) ----


class _SignSGD:
    """Not a GradientTransformation: a class with init and update, as optax.chain accepts."""

    def init(self, params):
        return optax.EmptyState()

    def update(self, updates, state, params=None):
        return jax.tree.map(lambda g: -0.1 * jnp.sign(g), updates), state


@pytest.mark.parametrize("workers", [None, 2])
def test_multisteps_and_any_init_update_object_are_accepted_as_inner(workers):
    """lookahead(optax.MultiSteps(adam, 2), k=3) worked in 0.2.0 and was a TypeError in 0.3.0.
    It runs exactly as the GradientTransformation MultiSteps wraps (its
    gradient_transformation()), and optax.chain's own acceptance is the rule."""
    params = {"w": jnp.array([1.0, -2.0, 0.5])}
    if workers is not None:
        params = lo.replicate(params, workers)
    inner = optax.MultiSteps(optax.adam(0.1), every_k_schedule=2)
    got = lo.lookahead(inner, k=3, workers=workers)
    want = lo.lookahead(inner.gradient_transformation(), k=3, workers=workers)
    chained = lo.lookahead(optax.chain(_SignSGD()), k=2, workers=workers)
    mine = lo.lookahead(_SignSGD(), k=2, workers=workers, outer=_SignSGD())
    mine_ref = lo.lookahead(optax.chain(_SignSGD()), k=2, workers=workers, outer=_SignSGD())
    for a, b in ((got, want), (mine, mine_ref), (chained, chained)):
        pa, pb, sa, sb = params, params, a.init(params), b.init(params)
        update_a, update_b = jax.jit(a.update), jax.jit(b.update)
        for n in range(7):
            grads = jax.tree.map(lambda p: p * (n + 1) - 0.3, pa)
            ua, sa = update_a(grads, sa, pa)
            ub, sb = update_b(grads, sb, pb)
            pa, pb = optax.apply_updates(pa, ua), optax.apply_updates(pb, ub)
            np.testing.assert_array_equal(pa["w"], pb["w"])
        np.testing.assert_array_equal(lo.slow_params(sa, pa)["w"], lo.slow_params(sb, pb)["w"])
    with pytest.raises(TypeError, match="inner must be .*init and update"):
        lo.lookahead(object(), k=2)


# ---- the public type hints accept what the docs show ----

# Call forms the docstrings and pages describe, beyond the pages' own blocks.
DOCUMENTED_CALLS = """
import jax
import jax.numpy as jnp
import optax

import lookahead_optax as lo

params = {"w": jnp.ones(3)}
schedule = optax.linear_schedule(0.5, 0.9, 10)
for alpha in (0.5, 1, jnp.asarray(0.5), schedule, lo.adaptive_alpha(0.1, curvature="adam")):
    lo.lookahead(optax.adam(1e-3), k=5, alpha=alpha)
lo.lookahead(optax.adam(1e-3), k=jnp.asarray(5), inner_state="pullback", slow_dtype=jnp.float32)
lo.lookahead(optax.MultiSteps(optax.adam(1e-3), 2), k=3)
tx = lo.lookahead(
    optax.adam(1e-3),
    k=4,
    outer=optax.sgd(0.7, momentum=0.9, nesterov=True),
    workers=2,
    communication_dtype=jnp.bfloat16,
    fragments=2,
)
lo.lookahead(optax.sgd(0.1), axis_name="workers")
replicated = lo.replicate(params, 2)
opt_state = tx.init(replicated)
replicated, opt_state = lo.resize_workers(opt_state, replicated, 3)
slow: dict = lo.slow_params(opt_state, replicated)
tx1 = lo.lookahead(optax.sgd(0.1), k=2)
state1 = tx1.init(params)
new_params, state1 = lo.update_and_apply(tx1, params, state1, params, sync=None)
new_params, state1 = lo.update_and_apply(tx1, params, state1, params, formulation="select")
taken: bool = lo.fused_path_taken(tx1, params, state1, params)
lo.check_composition(tx1, params)
"""


def test_the_documented_calls_type_check(tmp_path):
    """mypy on every ```python block of README.md and docs/, and on the call forms above:
    no error on a line that calls lookahead_optax (0.3.0: alpha=lo.adaptive_alpha(...) is an
    "incompatible type" for AlphaLike). Errors of other libraries' hints are not ours."""
    import pathlib
    import subprocess
    import sys

    from tests.helpers import python_chains

    mypy = pytest.importorskip("mypy")
    del mypy
    root = pathlib.Path(__file__).resolve().parent.parent
    files = {"calls.py": DOCUMENTED_CALLS}
    for page in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        for i, chain in enumerate(python_chains(page.read_text())):
            files[f"{page.stem}_{i}.py"] = "\n".join(code for _, code, _ in chain)
    for name, code in files.items():
        (tmp_path / name).write_text(code)
    # A cache of its own: these options differ from tests/test_lint.py's mypy run, and runs with
    # other options in one cache invalidate each other's entries (each then checks jax again).
    command = [
        sys.executable, "-m", "mypy", "--ignore-missing-imports", "--follow-imports=silent",
        "--cache-dir", str(root / ".mypy_cache" / "documented_calls"),
        *sorted(str(tmp_path / n) for n in files),
    ]  # fmt: skip
    result = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=600)
    ours = []
    for line in result.stdout.splitlines():
        parts = line.split(":", 3)
        if len(parts) < 4 or " error: " not in line:
            continue
        source = files[pathlib.Path(parts[0]).name].splitlines()[int(parts[1]) - 1]
        if "lo." in source or "lookahead_optax" in source:
            ours.append(f"{line}\n    {source.strip()}")
    assert "error: " not in result.stderr, result.stderr
    assert not ours, "\n".join(ours)


# ---- replicate and resize_workers ----

ONE = {"w": jnp.array([1.0, -2.0, 0.5]), "n": jnp.zeros((), jnp.int32)}


def _steps(tx, params, opt_state, num_steps, start=0):
    update = jax.jit(tx.update)
    for i in range(start, start + num_steps):
        grads = jax.tree.map(
            lambda x: x * (i + 1) - 0.3 if jnp.issubdtype(x.dtype, jnp.floating) else x * 0,
            params,
        )
        updates, opt_state = update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    return params, opt_state


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, "2", None, jnp.asarray(2)])
def test_replicate_names_a_bad_worker_count(bad):
    """0.3.0: replicate(p, 0) made an empty worker axis; -1 and 2.0 raised jax's errors."""
    with pytest.raises(ValueError, match="workers must be a (positive|Python) int"):
        lo.replicate(ONE, bad)
    # 2.0 reached jnp.repeat, which then failed for every later replicate(p, 2) as well.
    assert lo.replicate(ONE, 2)["w"].shape == (2, 3)
    assert lo.replicate(ONE, np.int64(2))["w"].shape == (2, 3)


@pytest.mark.parametrize("bad", [0, 2.0, True, np.bool_(True), jnp.asarray(3)])
def test_worker_counts_follow_one_rule(bad):
    """NumPy integers are accepted everywhere (0.3.0 took lookahead(workers=np.int64(2)) and
    refused resize_workers(..., np.int64(3))), bools, floats and arrays nowhere."""
    tx = lo.lookahead(optax.sgd(0.1), k=2, workers=np.int64(2))
    params = lo.replicate(ONE, np.int32(2))
    params, opt_state = lo.resize_workers(tx.init(params), params, np.int64(3))
    assert params["w"].shape == (3, 3)
    for call in (
        lambda: lo.lookahead(optax.sgd(0.1), k=2, workers=bad),
        lambda: lo.replicate(ONE, bad),
        lambda: lo.resize_workers(opt_state, params, bad),
    ):
        with pytest.raises(ValueError, match="workers must be a (positive|Python) int"):
            call()


@pytest.mark.parametrize("outer", [None, NESTEROV])
def test_new_workers_start_at_the_slow_weights_with_worker_0s_inner_state(outer):
    """Mid-cycle, the workers' params have left phi: a new worker starts at phi (never worker
    0's params), an int leaf at worker 0's value; kept workers keep theirs."""
    tx = lo.lookahead(optax.adam(0.1), k=4, workers=2, outer=outer)
    params = lo.replicate(ONE, 2)
    params = {**params, "n": jnp.array([5, 7], jnp.int32)}
    params, opt_state = _steps(tx, params, tx.init(params), 2)  # no sync yet
    phi = opt_state.slow["w"]
    assert not np.array_equal(params["w"][0], phi)
    new_params, new_state = lo.resize_workers(opt_state, params, 4)
    np.testing.assert_array_equal(new_params["w"][:2], params["w"])
    for w in (2, 3):
        np.testing.assert_array_equal(new_params["w"][w], phi)
        assert int(new_params["n"][w]) == 5
    mu = new_state.inner_state[0].mu["w"]
    np.testing.assert_array_equal(mu[2], mu[0])
    np.testing.assert_array_equal(new_state.slow["w"], phi)
    assert int(new_state.count) == 2 and new_state.sync_stats.worker_drift.shape == (4,)
    # The cycle under way ends on time with 4 workers, all of them at the new phi.
    tx4 = lo.lookahead(optax.adam(0.1), k=4, workers=4, outer=outer)
    new_params, new_state = _steps(tx4, new_params, new_state, 2, start=2)
    assert int(new_state.syncs) == 1
    for w in range(4):
        np.testing.assert_allclose(new_params["w"][w], new_state.slow["w"], rtol=1e-6)


WRAPPED = {
    "MultiSteps": lambda n: optax.MultiSteps(lo.lookahead(optax.adam(0.1), k=3, workers=n), 2),
    "multi_transform": lambda n: optax.multi_transform(
        {"a": lo.lookahead(optax.adam(0.1), k=3, workers=n), "b": optax.sgd(0.1, momentum=0.9)},
        {"w": "a", "n": "b"},
    ),
}


@pytest.mark.parametrize("name", WRAPPED)
@pytest.mark.parametrize("workers", [pytest.param(1, marks=pytest.mark.slow), 3])
def test_resize_workers_resizes_every_leaf_with_the_worker_axis(name, workers):
    """0.3.0 resized only the LookaheadState: MultiSteps' accumulators and multi_transform's
    other branches kept 2 workers and the next update blamed "grads"."""
    make = WRAPPED[name]
    params = lo.replicate(ONE, 2)
    params, opt_state = _steps(make(2), params, make(2).init(params), 3)
    new_params, new_state = lo.resize_workers(opt_state, params, workers)
    tx = make(workers)
    fresh = tx.init(new_params)
    assert jax.tree.structure(new_state) == jax.tree.structure(fresh)
    assert [np.shape(x) for x in jax.tree.leaves(new_state)] == [
        np.shape(x) for x in jax.tree.leaves(fresh)
    ]
    if name == "MultiSteps":  # the accumulated gradients: kept, or worker 0's for a new one
        acc, old_acc = new_state.acc_grads["w"], opt_state.acc_grads["w"]
        np.testing.assert_array_equal(acc[: min(2, workers)], old_acc[: min(2, workers)])
        if workers > 2:
            np.testing.assert_array_equal(acc[2], old_acc[0])
    _steps(tx, new_params, new_state, 4)  # trains on


def test_resize_workers_on_an_explicit_mesh():
    """0.3.0: ShardingTypeError (slicing the sharded worker axis). The resized leaves come
    back with the worker axis gathered; put them on the new mesh and train on."""
    from jax.sharding import AxisType, NamedSharding, PartitionSpec

    def on(mesh, tree):
        return jax.tree.map(
            lambda x: (
                jax.device_put(x, NamedSharding(mesh, PartitionSpec("workers")))
                if np.ndim(x)
                else x
            ),
            tree,
        )

    explicit = (AxisType.Explicit,)
    two = jax.make_mesh((2,), ("workers",), axis_types=explicit, devices=jax.devices()[:2])
    four = jax.make_mesh((4,), ("workers",), axis_types=explicit, devices=jax.devices()[:4])
    tx = lo.lookahead(optax.adam(0.1), k=3, workers=2)
    params = on(two, lo.replicate({"w": jnp.array([1.0, -2.0, 0.5, 3.0])}, 2))
    with jax.set_mesh(two):
        opt_state = jax.jit(tx.init)(params)
        step = jax.jit(lambda p, s: lo.update_and_apply(tx, p, s, p))
        params, opt_state = step(params, opt_state)
        new_params, new_state = lo.resize_workers(opt_state, params, 4)
    assert new_params["w"].shape == (4, 4)
    np.testing.assert_array_equal(new_params["w"][2], opt_state.slow["w"])
    tx4 = lo.lookahead(optax.adam(0.1), k=3, workers=4)
    new_params = on(four, new_params)
    with jax.set_mesh(four):  # the state onto the new mesh, as tx4.init would place it
        shardings = jax.tree.map(lambda x: x.sharding, jax.jit(tx4.init)(new_params))
        new_state = jax.device_put(new_state, shardings)
        step = jax.jit(lambda p, s: lo.update_and_apply(tx4, p, s, p))
        for _ in range(2):
            new_params, new_state = step(new_params, new_state)
    assert int(new_state.syncs) == 1
    assert new_params["w"].sharding.spec[0] == "workers"


def test_resize_workers_with_an_nnx_optimizer():
    """0.3.0: raw pytree errors on an nnx.Optimizer's state and nnx.State params."""
    from flax import nnx

    class Model(nnx.Module):
        def __init__(self, workers):
            self.w = nnx.Param(lo.replicate(jnp.array([1.0, -2.0, 0.5]), workers))

        def __call__(self):
            return jnp.sum(self.w[...] ** 2)

    model = Model(2)
    optimizer = nnx.Optimizer(model, lo.lookahead(optax.adam(0.1), k=3, workers=2), wrt=nnx.Param)
    optimizer.update(model, nnx.grad(lambda m: m())(model))
    phi = optimizer.opt_state.slow["w"][...]
    params, opt_state = lo.resize_workers(optimizer.opt_state, nnx.state(model, nnx.Param), 3)
    assert isinstance(params["w"], nnx.Param) and params["w"][...].shape == (3, 3)
    np.testing.assert_array_equal(params["w"][...][2], phi)
    resized = Model(3)
    nnx.update(resized, params)
    optimizer3 = nnx.Optimizer(
        resized, lo.lookahead(optax.adam(0.1), k=3, workers=3), wrt=nnx.Param
    )
    assert jax.tree.structure(nnx.state(optimizer3.opt_state)) == jax.tree.structure(
        nnx.state(opt_state)
    )
    optimizer3.opt_state = opt_state
    for _ in range(2):
        optimizer3.update(resized, nnx.grad(lambda m: m())(resized))
    assert int(optimizer3.opt_state.syncs[...]) == 1


@pytest.mark.parametrize("fragments", [1, 2, 3])
def test_next_call_syncs_is_true_exactly_on_the_calls_that_sync_a_fragment(fragments):
    """0.3.0 said False on the call where fragment 0 syncs (it knew only count + 1 >= period).
    Three leaves in three fragments, two in two, one: every call's answer is checked against
    what the call did to the slow weights (a fragment without leaves syncs nothing)."""
    params = {"a": jnp.ones(3), "b": jnp.ones(2), "c": jnp.ones(4)}
    for leaves in (("a", "b", "c"), ("a", "b")):
        tree = {key: params[key] for key in leaves}
        tx = lo.lookahead(optax.sgd(0.1), k=6, fragments=fragments)
        opt_state, said, did, update = tx.init(tree), [], [], jax.jit(tx.update)
        for _ in range(13):
            said.append(lo.next_call_syncs(opt_state))
            before = jax.tree.leaves(opt_state.slow)
            _, opt_state = update(tree, opt_state, tree)
            after = jax.tree.leaves(opt_state.slow)
            did.append(any(not np.array_equal(x, y) for x, y in zip(before, after)))
        assert said == did, (leaves, said, did)
        assert sum(did) >= 2 * min(fragments, len(leaves))


def test_workers_on_a_one_device_explicit_mesh():
    """What docs/outer_and_diloco.md's mesh block does on a reader's one-device machine: the
    worker axis "sharded" over a mesh of one device. The sync's per-worker drift kept the
    axis' sharding in its type only on some paths (cond branches differed:
    float32[4] against float32[4@workers])."""
    from jax.sharding import AxisType, NamedSharding, PartitionSpec

    mesh = jax.make_mesh((1,), ("workers",), (AxisType.Explicit,), devices=jax.devices()[:1])
    on_workers = NamedSharding(mesh, PartitionSpec("workers"))
    tx = lo.lookahead(optax.sgd(0.1), k=2, workers=4, outer=NESTEROV)
    params = jax.device_put(lo.replicate({"w": jnp.zeros(3)}, 4), on_workers)
    targets = jax.device_put(jnp.arange(12.0).reshape(4, 3), on_workers)
    opt_state = jax.jit(tx.init)(params)
    for fused in (True, False):

        @jax.jit
        def step(params, opt_state, fused=fused):
            grads = jax.tree.map(lambda p: p - targets, params)
            if fused:
                return lo.update_and_apply(tx, grads, opt_state, params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        with jax.set_mesh(mesh):
            p, s = params, opt_state
            for _ in range(4):
                p, s = step(p, s)
        assert int(s.syncs) == 2 and s.sync_stats.worker_drift.shape == (4,)
        assert p["w"].sharding.spec[0] == "workers"

"""Orbax checkpoints: bit-exact resume in a fresh process, and SIGKILL while saving.

The headline guarantee (peers lose the slow weights or the counter, ANCHORS.md):
a run saved at any position inside a cycle and restored in a new process, with
``jax.eval_shape(tx.init, params)`` as the target, continues bit for bit like
the run that never stopped. The fresh process is tests/_checkpoint_worker.py.
"""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import lookahead_optax as lo
from tests import _checkpoint_worker as worker

pytestmark = pytest.mark.slow  # Orbax saves, fresh processes and a SIGKILLed one
REPO = Path(__file__).resolve().parents[1]
POLICIES = ("keep", "pullback")  # cycle_start is None with "keep", a pytree with "pullback"


def run_worker(*args, timeout):
    return subprocess.run(
        [sys.executable, "-m", "tests._checkpoint_worker", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Per policy: the run that never stops, saved after steps 0..K, and its trajectory."""
    root = tmp_path_factory.mktemp("checkpoints")
    runs = {}
    for policy in POLICIES:
        tx = worker.make_tx(policy)
        params = worker.init_params(jax.random.key(0))
        opt_state = tx.init(params)
        trajectory, saved_counts = {}, {0: int(opt_state.count)}
        with ocp.CheckpointManager(root / policy) as manager:
            worker.save(manager, 0, params, opt_state)

            def on_step(step, params, opt_state, manager=manager):
                trajectory[step] = worker.leaves(params, opt_state)
                if step <= worker.K:
                    worker.save(manager, step, params, opt_state)
                    saved_counts[step] = int(opt_state.count)

            params, opt_state = worker.train(tx, params, opt_state, 0, worker.STEPS, on_step)
        runs[policy] = {
            "trajectory": trajectory,
            "saved_counts": saved_counts,
            "slow": lo.slow_params(opt_state, params),
        }
    return root, runs


def test_saved_run_trains_and_covers_every_position_in_a_cycle(uninterrupted):
    _, runs = uninterrupted
    x = np.concatenate([batch[0] for batch in worker.batches()])
    y = np.concatenate([batch[1] for batch in worker.batches()])
    initial_loss = worker.loss_fn(worker.init_params(jax.random.key(0)), x, y)
    for run in runs.values():
        counts = run["saved_counts"]
        assert sorted(set(counts.values())) == list(range(worker.K))
        assert counts[worker.K] == 0  # just after the first sync
        # Trained for real: the slow weights improved on the initial loss.
        assert worker.loss_fn(run["slow"], x, y) < 0.8 * initial_loss


def test_lookahead_state_with_none_field_round_trips(uninterrupted):
    root, _ = uninterrupted
    for policy in POLICIES:
        tx = worker.make_tx(policy)
        with ocp.CheckpointManager(root / policy) as manager:
            params, opt_state = worker.restore(manager, 2, tx)
        assert isinstance(opt_state, lo.LookaheadState)
        assert (opt_state.cycle_start is None) == (policy == "keep")
        expected = jax.eval_shape(tx.init, params)
        assert jax.tree.structure(opt_state) == jax.tree.structure(expected)
        assert int(opt_state.count) == 2


def test_resume_in_fresh_process_is_bit_identical(uninterrupted, tmp_path):
    root, runs = uninterrupted
    out = tmp_path / "resumed.npz"
    result = run_worker("resume", root, out, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = np.load(out)

    for policy, run in runs.items():
        for start in range(worker.K + 1):
            for step in range(start + 1, worker.STEPS + 1):
                expected = run["trajectory"][step]  # params' leaves, then slow weights'
                for i, leaf in enumerate(expected):
                    got = resumed[f"{policy}/from{start}/step{step}/leaf{i}"]
                    np.testing.assert_array_equal(
                        got, leaf, err_msg=f"{policy}, resumed at {start}, step {step}, leaf {i}"
                    )


def test_nnx_resume_in_fresh_process_is_bit_identical(tmp_path):
    # The NNX run, saved as nnx.state(model) and nnx.state(optimizer) after steps 0..K.
    model, optimizer = worker.nnx_create()
    trajectory, saved_counts = {}, {}
    with ocp.CheckpointManager(tmp_path / "nnx") as manager:
        worker.nnx_save(manager, 0, model, optimizer)
        saved_counts[0] = int(optimizer.opt_state.count[...])

        def on_step(step, model, optimizer):
            trajectory[step] = worker.nnx_leaves(model, optimizer)
            if step <= worker.K:
                worker.nnx_save(manager, step, model, optimizer)
                saved_counts[step] = int(optimizer.opt_state.count[...])

        worker.nnx_train(model, optimizer, 0, worker.STEPS, on_step)
    assert sorted(set(saved_counts.values())) == list(range(worker.K))

    out = tmp_path / "resumed.npz"
    result = run_worker("resume-nnx", tmp_path / "nnx", out, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = np.load(out)
    for start in range(worker.K + 1):
        for step in range(start + 1, worker.STEPS + 1):
            for i, leaf in enumerate(trajectory[step]):  # params' leaves, then slow weights'
                got = resumed[f"from{start}/step{step}/leaf{i}"]
                np.testing.assert_array_equal(
                    got, leaf, err_msg=f"resumed at {start}, step {step}, leaf {i}"
                )
    # The slow weights moved away from the params between syncs: the comparison covers both.
    params_leaves = len(trajectory[1]) // 2
    assert not np.array_equal(trajectory[1][0], trajectory[1][params_leaves])


def _partial_saves(directory: Path) -> list[str]:
    """Entries of a checkpoint directory that are not finalised steps."""
    return [p.name for p in directory.iterdir() if not p.name.isdigit()]


def _kill_while_saving(directory: Path, timeout: float = 90.0):
    """Runs the save-forever worker and SIGKILLs it while a save is in progress.

    Returns (last step reported complete, partial entries left on disk).
    """
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests._checkpoint_worker", "save-forever", str(directory)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + timeout
        # Two complete checkpoints first, then kill at the first sight of a partial one.
        while not any(line.startswith("saved 1") for line in list(lines)):
            assert proc.poll() is None, "worker exited early"
            assert time.monotonic() < deadline, "worker saved nothing in time"
            time.sleep(0.01)
        while not (directory.exists() and _partial_saves(directory)):
            assert time.monotonic() < deadline, "no save in progress seen in time"
            time.sleep(0.0005)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    reader.join(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    saved = [int(line.split()[1]) for line in lines if line.startswith("saved ")]
    return max(saved), _partial_saves(directory)


def test_lookahead_state_killed_while_saving_resumes_from_the_last_complete_checkpoint(
    tmp_path,
):
    """A process killed in the middle of saving a mid-cycle LookaheadState: the last
    complete checkpoint restores, from shapes alone, to that exact state (slow weights,
    count, syncs, Adam's moments), and training resumes across a sync bit for bit."""
    # A kill can land just after a save finished; try again until one interrupts a save
    # (the scenario under test, not a check of Orbax).
    for attempt in range(3):
        directory = tmp_path / f"attempt{attempt}"
        _, partial = _kill_while_saving(directory)
        if partial:
            break
    assert partial, "never managed to kill the worker in the middle of a save"

    tx = worker.make_tx("keep")
    abstract_params = jax.eval_shape(worker.known_start, 0)
    target = ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_params),
        opt_state=ocp.args.StandardRestore(jax.eval_shape(tx.init, abstract_params)),
    )
    with ocp.CheckpointManager(directory) as manager:
        latest = manager.latest_step()
        restored = manager.restore(latest, args=target)
    params, opt_state = restored.params, restored.opt_state
    expected_params, expected_state = worker.known_checkpoint(latest)
    assert isinstance(opt_state, lo.LookaheadState)
    assert jax.tree.structure(opt_state) == jax.tree.structure(expected_state)
    for got, want in zip(
        jax.tree.leaves((params, opt_state)), jax.tree.leaves((expected_params, expected_state))
    ):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
    # What was saved is a real mid-cycle state: the comparison covers slow weights and counter.
    assert 0 < int(opt_state.count) < worker.K and int(opt_state.syncs) == 1
    assert not np.array_equal(opt_state.slow["big"], params["big"])

    # Resume: K more steps (one sync on the way) from the restored and the known state.
    resumed, expected = (params, opt_state), (expected_params, expected_state)
    for _ in range(worker.K):
        resumed = worker.known_step(*resumed)
        expected = worker.known_step(*expected)
    assert int(resumed[1].syncs) == 2
    for got, want in zip(worker.leaves(*resumed), worker.leaves(*expected), strict=True):
        np.testing.assert_array_equal(got, want)


def test_sharded_state_restores_onto_the_mesh_with_abstract_opt_state(tmp_path):
    # Params sharded FSDP-style over 8 emulated devices; the restore target comes
    # from shapes and shardings only, via lo.abstract_opt_state.
    mesh = jax.make_mesh((8,), ("data",))
    sharded, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    shardings = {
        "hidden": {"w": sharded, "b": replicated},
        "out": {"w": sharded, "b": replicated},
    }
    params = jax.device_put(worker.init_params(jax.random.key(0)), shardings)
    tx = worker.make_tx("pullback")
    opt_state = jax.jit(tx.init)(params)
    params, opt_state = worker.train(tx, params, opt_state, 0, worker.K + 2)  # mid-cycle
    with ocp.CheckpointManager(tmp_path) as manager:
        worker.save(manager, worker.K + 2, params, opt_state)

    abstract_params = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params, shardings
    )
    target = lo.abstract_opt_state(tx, abstract_params)
    with ocp.CheckpointManager(tmp_path) as manager:
        restored = manager.restore(
            worker.K + 2,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract_params),
                opt_state=ocp.args.StandardRestore(target),
            ),
        )

    restored_slow = lo.slow_params(restored.opt_state, restored.params)
    for slow, sharding in zip(jax.tree.leaves(restored_slow), jax.tree.leaves(shardings)):
        assert slow.sharding.is_equivalent_to(sharding, slow.ndim)
    assert restored.opt_state.count.sharding.is_fully_replicated
    assert int(restored.opt_state.count) == 2
    # Continuing from the restored state matches continuing the original, bit for bit.
    expected = worker.train(tx, params, opt_state, worker.K + 2, worker.STEPS)
    resumed = worker.train(tx, restored.params, restored.opt_state, worker.K + 2, worker.STEPS)
    for got, want in zip(worker.leaves(*resumed), worker.leaves(*expected), strict=True):
        np.testing.assert_array_equal(got, want)

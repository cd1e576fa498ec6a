"""DiLoCo checkpoints: per-worker fast weights and inner states, shared slow weights and outer
momentum restore bit for bit in a fresh process; restoring onto another number of workers."""

import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import lookahead_optax as lo
from tests import _workers_checkpoint_worker as worker

pytestmark = pytest.mark.slow  # Orbax saves and restores
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The run that never stops, saved after steps 0..K, and every step's leaves."""
    ckpt_dir = tmp_path_factory.mktemp("diloco") / "ckpt"
    tx = worker.make_tx()
    params = worker.init_params()
    opt_state = tx.init(params)
    trajectory = {}
    with ocp.CheckpointManager(ckpt_dir) as manager:
        worker.save(manager, 0, params, opt_state)

        def on_step(step, params, opt_state):
            trajectory[step] = worker.leaves(params, opt_state)
            if step <= worker.K:
                worker.save(manager, step, params, opt_state)

        params, opt_state = worker.train(tx, params, opt_state, 0, worker.STEPS, on_step)
    assert int(opt_state.syncs) == 2
    return ckpt_dir, trajectory


@pytest.mark.slow
def test_resume_in_a_fresh_process_is_bit_identical(uninterrupted, tmp_path):
    ckpt_dir, trajectory = uninterrupted
    out = tmp_path / "resumed.npz"
    result = subprocess.run(
        [sys.executable, "-m", "tests._workers_checkpoint_worker", str(ckpt_dir), str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = np.load(out)
    for start in range(worker.K + 1):
        for step in range(start + 1, worker.STEPS + 1):
            for i, leaf in enumerate(trajectory[step]):
                np.testing.assert_array_equal(
                    resumed[f"from{start}/step{step}/leaf{i}"], leaf,
                    err_msg=f"resumed at {start}, step {step}, leaf {i}",
                )  # fmt: skip


@pytest.mark.parametrize("new_workers", [2, 5])
def test_restore_onto_another_number_of_workers(uninterrupted, new_workers):
    ckpt_dir, _ = uninterrupted
    start = worker.K - 2  # mid-cycle
    with ocp.CheckpointManager(ckpt_dir) as manager:
        params, opt_state = worker.restore(manager, start, worker.make_tx())
    resized_params, resized = lo.resize_workers(opt_state, params, new_workers)
    kept = min(worker.WORKERS, new_workers)
    # Shared state untouched: slow weights, outer momentum, counters.
    for a, b in zip(jax.tree.leaves(resized.slow), jax.tree.leaves(opt_state.slow)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(resized.outer_state), jax.tree.leaves(opt_state.outer_state)):
        np.testing.assert_array_equal(a, b)
    assert int(resized.count) == int(opt_state.count) == start
    # Kept workers: their own fast weights and inner states.
    for a, b in zip(jax.tree.leaves(resized_params), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a[:kept], b[:kept])
    for a, b in zip(jax.tree.leaves(resized.inner_state), jax.tree.leaves(opt_state.inner_state)):
        assert a.shape[0] == new_workers
        np.testing.assert_array_equal(a[:kept], b[:kept])
    # Added workers: at the slow weights, with worker 0's inner state.
    for a, s in zip(jax.tree.leaves(resized_params), jax.tree.leaves(opt_state.slow)):
        for w in range(kept, new_workers):
            np.testing.assert_array_equal(a[w], s)
    # The resized run continues with a transformation built for new_workers; the cycle under
    # way ends at the same step, and its sync averages over the new workers.
    tx = worker.make_tx(new_workers)
    offsets = np.resize(np.asarray(worker.OFFSETS), new_workers)
    p, s = worker.train(tx, resized_params, resized, start, worker.K, offsets=offsets)
    assert int(s.syncs) == 1 and int(s.count) == 0
    assert s.sync_stats.worker_drift.shape == (new_workers,)
    for w in range(new_workers):
        for leaf, slow in zip(jax.tree.leaves(p), jax.tree.leaves(s.slow)):
            np.testing.assert_allclose(leaf[w], slow, rtol=1e-6, atol=1e-7)


def test_resize_workers_rejects_bad_input():
    params = worker.init_params()
    opt_state = worker.make_tx().init(params)
    with pytest.raises(ValueError, match="workers must be a positive int"):
        lo.resize_workers(opt_state, params, 0)
    with pytest.raises(ValueError, match="exactly one LookaheadState"):
        lo.resize_workers((), params, 2)

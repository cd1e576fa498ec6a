"""Two processes joined by jax.distributed train Lookahead like one process does.

The test starts two workers (tests/_multihost_worker.py) on 127.0.0.1, each with its own CPU
devices, and compares what they write out with the same steps run here in one process on the
whole global batch.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import _multihost_worker as worker
import jax
import numpy as np
import pytest

from tests.helpers import free_loopback_port

pytestmark = pytest.mark.slow  # two processes joined by jax.distributed
NUM_PROCESSES = 2
TIMEOUT_S = 120


def _start_workers(out_dir: str) -> list[subprocess.Popen]:
    env = dict(os.environ)
    # Overrides the session's 8 devices: each worker is a "host" with LOCAL_DEVICES devices.
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={worker.LOCAL_DEVICES}"
    env["JAX_PLATFORMS"] = "cpu"
    port = str(free_loopback_port())
    processes = []
    for process_id in range(NUM_PROCESSES):
        command = [sys.executable, worker.__file__, str(process_id), str(NUM_PROCESSES), port]
        processes.append(
            subprocess.Popen(
                [*command, out_dir],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    return processes


def _run_workers(out_dir: str) -> tuple[bool, str]:
    """Runs the workers to the end, within TIMEOUT_S in all; (all succeeded, their output)."""
    deadline = time.monotonic() + TIMEOUT_S
    processes = []
    outputs = []
    try:
        processes = _start_workers(out_dir)
        for process_id, process in enumerate(processes):
            remaining = max(deadline - time.monotonic(), 1.0)
            output, _ = process.communicate(timeout=remaining)
            outputs.append(f"--- worker {process_id}, exit code {process.returncode}\n{output}")
        return all(p.returncode == 0 for p in processes), "\n".join(outputs)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()


def _run_workers_until_bound(out_dir: str) -> None:
    # The free port can be taken by another program between our probe and the coordinator's
    # bind (other test sessions share the machine): one retry on a new port covers that.
    for attempt in range(2):
        succeeded, output = _run_workers(out_dir)
        if succeeded:
            return
        if "in use" not in output.lower() or attempt == 1:
            raise AssertionError(f"the workers failed:\n{output[-6000:]}")


def _one_process_reference() -> dict[str, np.ndarray]:
    params, inputs, targets = worker.make_problem()
    device = jax.devices()[0]
    params = jax.device_put(params, device)
    opt_state = worker.make_optimizer().init(params)
    step = jax.jit(worker.train_step)
    for t in range(worker.STEPS):
        params, opt_state = step(params, opt_state, inputs[t], targets[t])
    slow = worker.lo.slow_params(opt_state, params)
    reference = {f"params/{name}": np.asarray(x) for name, x in params.items()}
    reference |= {f"slow/{name}": np.asarray(x) for name, x in slow.items()}
    reference["syncs"] = np.asarray(opt_state.syncs)
    return reference


def test_two_processes_match_one_process(tmp_path):
    _run_workers_until_bound(str(tmp_path))
    reference = _one_process_reference()
    initial_params, _, _ = worker.make_problem()

    for process_id in range(NUM_PROCESSES):
        with np.load(tmp_path / f"process_{process_id}.npz") as results:
            # The run really spanned both processes' devices.
            assert results["process_count"] == NUM_PROCESSES
            assert results["local_devices"] == worker.LOCAL_DEVICES
            assert results["global_devices"] == NUM_PROCESSES * worker.LOCAL_DEVICES
            assert results["syncs"] == reference["syncs"] == worker.STEPS // worker.K
            for name, expected in reference.items():
                if name == "syncs":
                    continue
                np.testing.assert_allclose(
                    results[name], expected, rtol=1e-5, atol=1e-6, err_msg=name
                )
            # Training moved the weights, so agreement is not trivially the initial params.
            moved = np.abs(results["params/w1"] - initial_params["w1"]).max()
            assert moved > 1e-2

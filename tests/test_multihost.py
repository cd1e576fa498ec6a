"""Two processes joined by jax.distributed train Lookahead like one process does.

The test starts two workers (tests/_multihost_worker.py) on 127.0.0.1, each with its own CPU
devices, and compares what they write out with the same steps run here in one process on the
whole global batch.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import jax
import numpy as np

import _multihost_worker as worker

NUM_PROCESSES = 2
TIMEOUT_S = 120


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_workers(out_dir: str) -> None:
    env = dict(os.environ)
    # Overrides the session's 8 devices: each worker is a "host" with LOCAL_DEVICES devices.
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={worker.LOCAL_DEVICES}"
    env["JAX_PLATFORMS"] = "cpu"
    port = _free_loopback_port()
    processes = []
    try:
        for process_id in range(NUM_PROCESSES):
            command = [sys.executable, worker.__file__, str(process_id), str(NUM_PROCESSES)]
            processes.append(
                subprocess.Popen(
                    [*command, str(port), out_dir],
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
            )
        for process_id, process in enumerate(processes):
            output, _ = process.communicate(timeout=TIMEOUT_S)
            assert process.returncode == 0, f"worker {process_id} failed:\n{output[-4000:]}"
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()


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
    _run_workers(str(tmp_path))
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

"""DiLoCo across processes: jax.distributed on 127.0.0.1, a worker per device, two processes.

The same run simulated on one device (vmap over the worker axis) gives the same params and
slow weights; between syncs the processes exchange nothing (no collective outside the sync's
conditional in the compiled step).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import _diloco_multihost_worker as worker
import jax
import numpy as np
import pytest

from tests.helpers import free_loopback_port

pytestmark = pytest.mark.slow  # two processes joined by jax.distributed
TIMEOUT_S = 150
_COLLECTIVE = re.compile(r"\b(all-gather|all-reduce|reduce-scatter|collective-permute|all-to-all)")


def _run(out_dir: str, config: str = "plain") -> tuple[bool, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={worker.LOCAL_DEVICES}"
    env["JAX_PLATFORMS"] = "cpu"
    port = str(free_loopback_port())
    deadline = time.monotonic() + TIMEOUT_S
    processes, outputs = [], []
    try:
        for process_id in range(worker.NUM_PROCESSES):
            command = [sys.executable, worker.__file__, str(process_id),
                       str(worker.NUM_PROCESSES), port, out_dir, config]  # fmt: skip
            processes.append(
                subprocess.Popen(
                    command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
                )  # fmt: skip
            )
        for process_id, process in enumerate(processes):
            output, _ = process.communicate(timeout=max(deadline - time.monotonic(), 1.0))
            outputs.append(f"--- process {process_id}, exit {process.returncode}\n{output}")
        return all(p.returncode == 0 for p in processes), "\n".join(outputs)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()


@pytest.mark.parametrize("config", ["plain", "quantized_overlap"])
def test_workers_on_two_processes_match_one_device(tmp_path, config):
    for attempt in range(2):  # the probed port can be taken before the coordinator binds it
        succeeded, output = _run(str(tmp_path), config)
        if succeeded:
            break
        if "in use" not in output.lower() or attempt == 1:
            raise AssertionError(f"the processes failed:\n{output[-6000:]}")

    params, inputs, targets = worker.make_problem()
    tx = worker.make_optimizer(config)
    params = jax.device_put(worker.lo.replicate(params, worker.WORKERS), jax.devices()[0])
    opt_state = tx.init(params)
    step = jax.jit(worker.make_train_step(tx))
    for t in range(worker.STEPS):
        params, opt_state = step(params, opt_state, inputs[t], targets[t])
    slow = worker.lo.slow_params(opt_state, params)

    for process_id in range(worker.NUM_PROCESSES):
        got = np.load(tmp_path / f"process_{process_id}.npz")
        assert int(got["syncs"]) == worker.STEPS // worker.K == 2
        for name in params:
            np.testing.assert_allclose(got[f"slow/{name}"], slow[name], rtol=2e-5, atol=2e-6)
            for w in range(process_id * worker.LOCAL_DEVICES,
                           (process_id + 1) * worker.LOCAL_DEVICES):  # fmt: skip
                np.testing.assert_allclose(
                    got[f"params/{name}/{w}"][0], params[name][w], rtol=2e-5, atol=2e-6
                )
        # Between syncs nothing crosses processes: every collective sits in a conditional's
        # branch computation (the sync), none in the step's entry computation.
        hlo = (tmp_path / f"hlo_{process_id}.txt").read_text()
        entry = hlo[hlo.index("ENTRY") :]
        entry = entry[: entry.index("\n}\n")]
        assert _COLLECTIVE.search(hlo), "the sync communicates"
        assert not _COLLECTIVE.search(entry), "a collective outside the sync"
        if config == "quantized_overlap":  # the int8 exchange crosses processes as such
            assert re.search(r"s8\[[\d,]*\]\S* all-to-all\(", hlo), "an int8 all-to-all"

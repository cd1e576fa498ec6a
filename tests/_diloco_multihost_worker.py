"""One process of the DiLoCo run over jax.distributed started by tests/test_workers_multihost.py.

Usage: python _diloco_multihost_worker.py PROCESS_ID NUM_PROCESSES PORT OUT_DIR [CONFIG]

CONFIG: "plain" (default) or "quantized_overlap" (int8 exchange with error feedback, overlap 1,
mixing 0.5: see make_optimizer).

Each process is a "host" with LOCAL_DEVICES CPU devices, each device one DiLoCo worker:
params carry a leading worker axis sharded over a mesh of all the processes' devices, every
process feeds its own workers' data, and the processes talk (gloo over loopback TCP) only
at the syncs.
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _multihost_worker import _gloo_on_loopback  # gloo listens on loopback only

import lookahead_optax as lo

LOCAL_DEVICES = 2
NUM_PROCESSES = 2
WORKERS = LOCAL_DEVICES * NUM_PROCESSES
K, STEPS = 3, 7  # syncs after steps 3 and 6, one step past the last


def make_problem():
    rng = np.random.RandomState(0)
    params = {"w": rng.normal(size=(8, 4)).astype(np.float32), "b": np.zeros(4, np.float32)}
    inputs = rng.normal(size=(STEPS, WORKERS, 16, 8)).astype(np.float32)  # per worker its data
    targets = np.sin(inputs.sum(-1, keepdims=True)).astype(np.float32)
    return params, inputs, targets


def make_optimizer(config: str = "plain"):
    outer = optax.sgd(0.7, momentum=0.9, nesterov=True)
    if config == "quantized_overlap":
        return lo.lookahead(
            optax.adam(0.05), k=K, workers=WORKERS, outer=outer, overlap=1, mixing=0.5,
            communication_dtype=jnp.int8, communication_block=8, error_feedback=True,
        )  # fmt: skip
    return lo.lookahead(optax.adam(0.05), k=K, workers=WORKERS, outer=outer)


def loss_fn(params, inputs, targets):
    return jnp.mean(
        (jnp.tanh(inputs @ params["w"] + params["b"]).sum(-1, keepdims=True) - targets) ** 2
    )


def make_train_step(tx):
    def train_step(params, opt_state, inputs, targets):
        grads = jax.vmap(jax.grad(loss_fn))(params, inputs, targets)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return train_step


def main(process_id: int, num_processes: int, port: int, out_dir: str, config: str) -> None:
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    _gloo_on_loopback()
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        coordinator_bind_address=f"127.0.0.1:{port}",
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=60,
    )
    try:
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        mesh = Mesh(np.array(jax.devices()), ("workers",))
        on_workers = NamedSharding(mesh, PartitionSpec("workers"))
        params, inputs, targets = make_problem()
        mine = slice(process_id * LOCAL_DEVICES, (process_id + 1) * LOCAL_DEVICES)

        def local(x):  # this process's workers' rows of a worker-major array
            return jax.make_array_from_process_local_data(on_workers, x[mine])

        tx = make_optimizer(config)
        params = jax.tree.map(local, lo.replicate(params, WORKERS))
        opt_state = jax.jit(tx.init)(params)
        step = jax.jit(make_train_step(tx))
        hlo = step.lower(params, opt_state, local(inputs[0]), local(targets[0])).compile().as_text()
        for t in range(STEPS):
            params, opt_state = step(params, opt_state, local(inputs[t]), local(targets[t]))

        results = {}
        for name, x in params.items():  # this process's workers
            for shard in x.addressable_shards:
                results[f"params/{name}/{shard.index[0].start}"] = np.asarray(shard.data)
        for name, x in lo.slow_params(opt_state, params).items():
            results[f"slow/{name}"] = np.asarray(x.addressable_shards[0].data)
        results["syncs"] = np.asarray(opt_state.syncs.addressable_shards[0].data)
        with open(os.path.join(out_dir, f"hlo_{process_id}.txt"), "w") as f:
            f.write(hlo)
        np.savez(os.path.join(out_dir, f"process_{process_id}.npz"), **results)
    finally:
        jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4],
         sys.argv[5] if len(sys.argv) > 5 else "plain")  # fmt: skip

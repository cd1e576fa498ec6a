"""One process of the two-process Lookahead run started by tests/test_multihost.py.

Usage: python _multihost_worker.py PROCESS_ID NUM_PROCESSES PORT OUT_DIR

The parent sets XLA_FLAGS so each process has LOCAL_DEVICES CPU devices. The processes
join through jax.distributed on 127.0.0.1, build one mesh over all their devices and train
data-parallel: every process feeds its slice of each global batch, XLA all-reduces the
gradients across processes (gloo over loopback TCP). The problem (data, model, optimizer,
step) is defined here once; the tests import it for their one-device references (and
tests/test_sharding.py trains the same model on 8 devices in one process).
"""

from __future__ import annotations

import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lookahead_optax as lo

LOCAL_DEVICES = 2
STEPS = 7  # two syncs (after steps 3 and 6) and one step past the last
K = 3
GLOBAL_BATCH = 16
# Every leading dimension is a multiple of 8, so tests/test_sharding.py can shard each param
# over 8 devices along its first axis (FSDP-style).
FEATURES, HIDDEN = 8, 16


def make_problem() -> tuple[dict, np.ndarray, np.ndarray]:
    """Initial params and, per step, a global batch of inputs and regression targets."""
    rng = np.random.RandomState(0)
    params = {
        "w1": (rng.normal(size=(FEATURES, HIDDEN)) / np.sqrt(FEATURES)).astype(np.float32),
        "b1": np.zeros(HIDDEN, np.float32),
        "w2": (rng.normal(size=(HIDDEN, 1)) / np.sqrt(HIDDEN)).astype(np.float32),
    }
    inputs = rng.normal(size=(STEPS, GLOBAL_BATCH, FEATURES)).astype(np.float32)
    targets = np.sin(inputs.sum(-1, keepdims=True)).astype(np.float32)
    return params, inputs, targets


def make_optimizer() -> optax.GradientTransformation:
    return lo.lookahead(optax.adam(0.05), k=K, alpha=0.5)


def loss_fn(params: dict, inputs: jax.Array, targets: jax.Array) -> jax.Array:
    hidden = jnp.tanh(inputs @ params["w1"] + params["b1"])
    return jnp.mean((hidden @ params["w2"] - targets) ** 2)


def make_train_step(tx: optax.GradientTransformation):
    """A step of ``tx`` on the mean loss of the (global) batch."""

    def train_step(params, opt_state, inputs, targets):
        grads = jax.grad(loss_fn)(params, inputs, targets)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return train_step


train_step = make_train_step(make_optimizer())


def _gloo_on_loopback() -> None:
    # jax creates gloo's TCP transport without a hostname, so gloo listens on whatever the
    # machine's hostname resolves to; pin it to loopback so the test opens no outside port.
    from jax._src.lib import _jax

    make_collectives = getattr(_jax, "make_gloo_tcp_collectives", None)
    if make_collectives is not None:
        _jax.make_gloo_tcp_collectives = functools.partial(make_collectives, hostname="127.0.0.1")


def main(process_id: int, num_processes: int, port: int, out_dir: str) -> None:
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

        mesh = Mesh(np.array(jax.devices()), ("data",))
        replicated = NamedSharding(mesh, PartitionSpec())
        batch_sharded = NamedSharding(mesh, PartitionSpec("data"))

        params, inputs, targets = make_problem()
        # Each process feeds only its own contiguous slice of every global batch.
        local_batch = GLOBAL_BATCH // num_processes
        mine = slice(process_id * local_batch, (process_id + 1) * local_batch)

        def replicate(x: np.ndarray) -> jax.Array:
            return jax.make_array_from_process_local_data(replicated, x)

        params = jax.tree.map(replicate, params)
        opt_state = jax.jit(make_optimizer().init)(params)
        step = jax.jit(train_step, donate_argnums=(0, 1))
        for t in range(STEPS):
            local_inputs = jax.make_array_from_process_local_data(batch_sharded, inputs[t, mine])
            local_targets = jax.make_array_from_process_local_data(batch_sharded, targets[t, mine])
            params, opt_state = step(params, opt_state, local_inputs, local_targets)

        slow = lo.slow_params(opt_state, params)

        def local_copy(x: jax.Array) -> np.ndarray:
            assert x.is_fully_replicated, x.sharding
            return np.asarray(x.addressable_shards[0].data)

        results = {f"params/{name}": local_copy(x) for name, x in params.items()}
        results |= {f"slow/{name}": local_copy(x) for name, x in slow.items()}
        results["syncs"] = local_copy(opt_state.syncs)
        results["process_count"] = np.array(jax.process_count())
        results["global_devices"] = np.array(jax.device_count())
        results["local_devices"] = np.array(jax.local_device_count())
        np.savez(os.path.join(out_dir, f"process_{process_id}.npz"), **results)
    finally:
        jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])

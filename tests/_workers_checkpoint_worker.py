"""The fresh-process side of tests/test_workers_checkpoint.py.

``python -m tests._workers_checkpoint_worker CKPT_DIR OUT.npz``: restores every saved
step of a DiLoCo run (workers, Nesterov outer momentum, per-worker Adam states),
knowing only shapes, trains it to STEPS and records every leaf of (params, opt_state)
after every step.
"""

from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

import lookahead_optax as lo
from tests import reference as ref

WORKERS, K = 3, 4
STEPS = 2 * K + 2  # saves after 0..K: every position of a cycle and the step after a sync
PROBLEM = ref.LogisticQuadratic()
OFFSETS = jnp.asarray([0.0, 0.5, -1.0], jnp.float32)  # each worker its own data


def make_tx(workers: int = WORKERS):
    return lo.lookahead(
        optax.adam(0.05), k=K, workers=workers, outer=optax.sgd(0.7, momentum=0.9, nesterov=True)
    )


def init_params(workers: int = WORKERS):
    return lo.replicate(
        jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), PROBLEM.params0), workers
    )


def worker_loss(params, offset):
    pull = sum(jnp.sum((leaf - offset) ** 2) for leaf in jax.tree.leaves(params))
    return PROBLEM.loss(params) + 0.1 * pull


@functools.partial(jax.jit, static_argnums=0)
def train_step(tx, params, opt_state, offsets):
    grads = jax.vmap(jax.grad(worker_loss))(params, offsets)
    return lo.update_and_apply(tx, grads, opt_state, params)


def train(tx, params, opt_state, first, last, on_step=None, offsets=OFFSETS):
    for step in range(first + 1, last + 1):
        params, opt_state = train_step(tx, params, opt_state, offsets)
        if on_step is not None:
            on_step(step, params, opt_state)
    return params, opt_state


def save(manager, step, params, opt_state):
    manager.save(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state)
        ),
    )


def restore(manager, step, tx):
    abstract_params = jax.eval_shape(init_params)
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_params),
            opt_state=ocp.args.StandardRestore(lo.abstract_opt_state(tx, abstract_params)),
        ),
    )
    return restored.params, restored.opt_state


def leaves(params, opt_state):
    return [np.asarray(leaf) for leaf in jax.tree.leaves((params, opt_state))]


def main(ckpt_dir: str, out_path: str) -> None:
    tx = make_tx()
    recorded = {}
    with ocp.CheckpointManager(ckpt_dir) as manager:
        for start in manager.all_steps():
            params, opt_state = restore(manager, start, tx)

            def record(step, params, opt_state, start=start):
                for i, leaf in enumerate(leaves(params, opt_state)):
                    recorded[f"from{start}/step{step}/leaf{i}"] = leaf

            train(tx, params, opt_state, start, STEPS, record)
    np.savez(out_path, **recorded)


if __name__ == "__main__":
    main(*sys.argv[1:])

"""Writes tests/data/v030/: Orbax checkpoints of lookahead states made by lookahead_optax 0.3.0.

Run once, with 0.3.0 first on the path (commit 23f6617, the last 0.3.0 landing):
    git worktree add --detach /tmp/v030 23f6617
    PYTHONPATH=/tmp/v030 python tests/data/make_v030_checkpoint.py
Each case also writes its leaves to leaves.npz (keyed by key path), so the restore test
compares against numbers written by 0.3.0 itself, not by the library under test.
"""

import os
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

import lookahead_optax as lo

assert lo.__version__ == "0.3.0", lo.__version__
HERE = pathlib.Path(__file__).parent / "v030"


def cases():
    """(name, tx, params, grads): the same builders live in tests/test_checkpoint_compat.py."""
    params = {
        "w": jnp.arange(6.0).reshape(3, 2) / 7,
        "b": jnp.array([0.5, -1.0]),
        "n": jnp.int32(3),
    }
    grads = jax.tree.map(lambda p: jnp.ones_like(p) * 0.1 if p.dtype != jnp.int32 else p, params)
    nesterov = optax.sgd(0.7, momentum=0.9, nesterov=True)
    yield "outer", lo.lookahead(optax.adam(0.1), k=3, outer=nesterov), params, grads
    wparams = lo.replicate(params, 2)
    wparams = jax.tree.map(
        lambda p: p + jnp.arange(2).reshape((2,) + (1,) * (p.ndim - 1)).astype(p.dtype), wparams
    )
    wgrads = jax.tree.map(lambda g: jnp.stack([g, 2 * g]), grads)
    yield "workers", lo.lookahead(optax.adam(0.1), k=3, alpha=0.5, workers=2), wparams, wgrads


def main():
    shutil.rmtree(HERE, ignore_errors=True)
    HERE.mkdir(parents=True)
    for name, tx, params, grads in cases():
        state = tx.init(params)
        for _ in range(4):  # one sync (at 3) and one step into the next cycle
            updates, state = tx.update(grads, state, params)
            params = optax.apply_updates(params, updates)
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(os.path.abspath(HERE / name / "state"), state)
        flat = {
            jax.tree_util.keystr(k): np.asarray(v)
            for k, v in jax.tree_util.tree_leaves_with_path(state)
        }
        np.savez(HERE / name / "leaves.npz", **flat)


if __name__ == "__main__":
    main()

"""The fresh-process side of tests/test_checkpoint.py (`python -m tests._checkpoint_worker`).

Holds the training problem both sides share, so the run that never stopped (in
the test process) and the resumed runs (here, in a new process that knows only
the checkpoint directory) execute the same jitted code.

Commands:
  resume ROOT OUT.npz   for each ROOT/<inner_state> checkpoint directory, restore
      every saved step and train it to STEPS, recording params and slow weights
      after every step.
  resume-nnx CKPT_DIR OUT.npz   the same for the Flax NNX run (nnx.Optimizer), saved
      as nnx.state(model) and nnx.state(optimizer).
  save-forever CKPT_DIR                 save large checkpoints of known values
      (see ``known_checkpoint``) for steps 0, 1, 2, ... until killed.
"""

from __future__ import annotations

import functools
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from sklearn.datasets import load_digits

import lookahead_optax as lo

K, ALPHA, LR, BATCH = 4, 0.5, 0.05, 64
STEPS = 2 * K + 3  # saves at 0..K cover every count 0..K-1 and the step after a sync
HIDDEN = 32


def init_params(key):
    k1, k2 = jax.random.split(key)
    return {
        "hidden": {"w": jax.random.normal(k1, (64, HIDDEN)) / 8.0, "b": jnp.zeros(HIDDEN)},
        "out": {"w": jax.random.normal(k2, (HIDDEN, 10)) / HIDDEN**0.5, "b": jnp.zeros(10)},
    }


def loss_fn(params, x, y):
    h = jax.nn.relu(x @ params["hidden"]["w"] + params["hidden"]["b"])
    logits = h @ params["out"]["w"] + params["out"]["b"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@functools.cache
def batches():
    """The minibatch of every step 1..STEPS, the same in every process."""
    features, labels = load_digits(return_X_y=True)
    features, labels = (features / 16.0).astype(np.float32), labels.astype(np.int32)
    rng = np.random.default_rng(0)
    return [
        (features[idx], labels[idx])
        for idx in (rng.choice(len(labels), BATCH, replace=False) for _ in range(STEPS))
    ]


@functools.cache
def make_tx(inner_state: str) -> optax.GradientTransformation:
    return lo.lookahead(optax.adam(LR), k=K, alpha=ALPHA, inner_state=inner_state)


@functools.partial(jax.jit, static_argnums=0)
def train_step(tx, params, opt_state, x, y):
    grads = jax.grad(loss_fn)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def train(tx, params, opt_state, first_step, last_step, on_step=None):
    """Steps first_step+1 .. last_step; on_step(step, params, opt_state) after each."""
    for step in range(first_step + 1, last_step + 1):
        params, opt_state = train_step(tx, params, opt_state, *batches()[step - 1])
        if on_step is not None:
            on_step(step, params, opt_state)
    return params, opt_state


def save(manager, step, params, opt_state):
    args = ocp.args.Composite(
        params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state)
    )
    manager.save(step, args=args)


def restore(manager, step, tx):
    """Restores a step knowing only shapes: params' from init_params, the state's from tx.init."""
    abstract_params = jax.eval_shape(init_params, jax.random.key(0))
    abstract_opt_state = jax.eval_shape(tx.init, abstract_params)
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_params),
            opt_state=ocp.args.StandardRestore(abstract_opt_state),
        ),
    )
    return restored.params, restored.opt_state


def leaves(params, opt_state):
    """params' leaves, then the slow weights' leaves, as numpy arrays."""
    trees = (params, lo.slow_params(opt_state, params))
    return [np.asarray(leaf) for tree in trees for leaf in jax.tree.leaves(tree)]


def resume(root: str, out_path: str) -> None:
    trajectories = {}
    for ckpt_dir in sorted(pathlib.Path(root).iterdir()):
        tx = make_tx(ckpt_dir.name)
        with ocp.CheckpointManager(ckpt_dir) as manager:
            for start in manager.all_steps():
                params, opt_state = restore(manager, start, tx)

                def record(step, params, opt_state, prefix=f"{ckpt_dir.name}/from{start}"):
                    for i, leaf in enumerate(leaves(params, opt_state)):
                        trajectories[f"{prefix}/step{step}/leaf{i}"] = leaf

                train(tx, params, opt_state, start, STEPS, record)
    np.savez(out_path, **trajectories)


# --- Flax NNX: the same problem with nnx.Optimizer --------------------------------


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(64, HIDDEN, rngs=rngs)
        self.out = nnx.Linear(HIDDEN, 10, rngs=rngs)

    def __call__(self, x):
        return self.out(jax.nn.relu(self.hidden(x)))


def nnx_create(seed: int = 0) -> tuple[MLP, nnx.Optimizer]:
    model = MLP(nnx.Rngs(seed))
    return model, nnx.Optimizer(model, make_tx("keep"), wrt=nnx.Param)


@nnx.jit
def nnx_train_step(model, optimizer, x, y):
    def loss(model):
        return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

    optimizer.update(model, nnx.grad(loss)(model))


def nnx_train(model, optimizer, first_step, last_step, on_step=None):
    for step in range(first_step + 1, last_step + 1):
        nnx_train_step(model, optimizer, *batches()[step - 1])
        if on_step is not None:
            on_step(step, model, optimizer)


def nnx_leaves(model, optimizer):
    """The model's params' leaves, then the slow weights' leaves, as numpy arrays."""
    params = nnx.state(model, nnx.Param)
    trees = (params, lo.slow_params(optimizer.opt_state, params))
    return [np.asarray(leaf) for tree in trees for leaf in jax.tree.leaves(tree)]


def nnx_save(manager, step, model, optimizer):
    args = ocp.args.Composite(
        model=ocp.args.StandardSave(nnx.state(model)),
        optimizer=ocp.args.StandardSave(nnx.state(optimizer)),
    )
    manager.save(step, args=args)


def nnx_restore(manager, step):
    """Restores into a model and optimizer built from a different seed, from shapes only."""
    abstract_model, abstract_optimizer = nnx.eval_shape(nnx_create)
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            model=ocp.args.StandardRestore(nnx.state(abstract_model)),
            optimizer=ocp.args.StandardRestore(nnx.state(abstract_optimizer)),
        ),
    )
    model, optimizer = nnx_create(seed=123)  # everything must come from the checkpoint
    nnx.update(model, restored.model)
    nnx.update(optimizer, restored.optimizer)
    return model, optimizer


def resume_nnx(ckpt_dir: str, out_path: str) -> None:
    trajectories = {}
    with ocp.CheckpointManager(ckpt_dir) as manager:
        for start in manager.all_steps():
            model, optimizer = nnx_restore(manager, start)

            def record(step, model, optimizer, prefix=f"from{start}"):
                for i, leaf in enumerate(nnx_leaves(model, optimizer)):
                    trajectories[f"{prefix}/step{step}/leaf{i}"] = leaf

            nnx_train(model, optimizer, start, STEPS, record)
    np.savez(out_path, **trajectories)


# --- SIGKILL while saving -------------------------------------------------------

BIG = 4_000_000  # float32 elements per big leaf: 16 MB, so a save takes a while


def known_start(step: int):
    """Params whose values are a known function of step."""
    return {
        "big": (jnp.arange(BIG, dtype=jnp.float32) + step) % 1000.0 / 1000.0,
        "small": jnp.full((3,), step, jnp.float32),
    }


@jax.jit
def known_step(params, opt_state):
    """One lookahead(adam) step on 0.5 ||params - 1||^2."""
    grads = jax.tree.map(lambda p: p - 1.0, params)
    updates, opt_state = make_tx("keep").update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def known_checkpoint(step: int):
    """Params and the lookahead state of a run in the middle of its second cycle.

    ``K + 1 + step % (K - 1)`` steps from ``known_start(step)``: one sync behind it,
    count in 1..K-1, so the slow weights differ from the params and Adam's moments
    are non-zero. The same jitted code in every process: the values are a known
    function of step, bit for bit.
    """
    params = known_start(step)
    opt_state = make_tx("keep").init(params)
    for _ in range(K + 1 + step % (K - 1)):
        params, opt_state = known_step(params, opt_state)
    return params, opt_state


def save_forever(ckpt_dir: str) -> None:
    options = ocp.CheckpointManagerOptions(max_to_keep=2)
    with ocp.CheckpointManager(ckpt_dir, options=options) as manager:
        for step in range(10_000):
            print(f"saving {step}", flush=True)
            save(manager, step, *known_checkpoint(step))
            manager.wait_until_finished()
            print(f"saved {step}", flush=True)


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    {"resume": resume, "resume-nnx": resume_nnx, "save-forever": save_forever}[command](*args)

"""The state as users reach into it: optax's tree utilities, 0.3.0 checkpoints, odd inner states."""

import pathlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lookahead_optax as lo


class _TestState(NamedTuple):
    agg: optax.Params
    is_reset: bool


V030 = pathlib.Path(__file__).parent / "data" / "v030"


def test_tree_get_count_finds_the_inner_optimizers_count():
    tx = lo.lookahead(optax.adam(0.1), k=3)
    params = {"w": jnp.ones(2)}
    state = tx.init(params)
    for _ in range(4):
        updates, state = tx.update(params, state, params)
    assert int(optax.tree.get(state, "count")) == 4  # Adam's, not the steps since the sync
    assert int(state.count) == 1


def test_tree_get_count_with_an_outer_sgd_is_not_the_lookahead_counter():
    tx = lo.lookahead(optax.sgd(0.1), k=3, outer=optax.sgd(0.5))
    params = {"w": jnp.ones(2)}
    state = tx.init(params)
    for _ in range(4):
        updates, state = tx.update(params, state, params)
    assert optax.tree.get(state, "count") is None  # no optimizer inside counts


def test_tree_set_learning_rate_through_a_lookahead():
    tx = lo.lookahead(optax.inject_hyperparams(optax.sgd)(learning_rate=0.1), k=3)
    params = {"w": jnp.ones(2)}
    state = optax.tree.set(tx.init(params), learning_rate=0.5)
    updates, _ = jax.jit(tx.update)(params, state, params)
    np.testing.assert_allclose(updates["w"], -0.5 * np.ones(2))


def _restore(path, target):
    ocp = pytest.importorskip("orbax.checkpoint")
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(path.resolve(), target)


@pytest.mark.parametrize("case", ["outer", "workers"])
def test_a_030_checkpoint_restores_bit_for_bit_and_continues(case):
    """tests/data/v030 was written by 0.3.0 (tests/data/make_v030_checkpoint.py)."""
    params = {
        "w": jnp.arange(6.0).reshape(3, 2) / 7,
        "b": jnp.array([0.5, -1.0]),
        "n": jnp.int32(3),
    }
    if case == "outer":
        tx = lo.lookahead(optax.adam(0.1), k=3, outer=optax.sgd(0.7, momentum=0.9, nesterov=True))
    else:
        tx = lo.lookahead(optax.adam(0.1), k=3, alpha=0.5, workers=2)
        params = lo.replicate(params, 2)
    grads = jax.tree.map(jnp.ones_like, params)
    # The state's dtypes after a step (Adam's moments of the int leaf become float), on one
    # device: orbax-checkpoint 0.11.17 (the flax extra's floor) needs a sharding on every leaf.
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
        jax.eval_shape(lambda: tx.update(grads, tx.init(params), params)[1]),
    )
    state = _restore(V030 / case / "state", target)
    saved = np.load(V030 / case / "leaves.npz")
    restored = {
        jax.tree_util.keystr(path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(state)
    }
    assert sorted(restored) == sorted(saved.files)
    for name in saved.files:
        np.testing.assert_array_equal(restored[name], saved[name], err_msg=name)
    updates, state = jax.jit(tx.update)(grads, state, params)
    assert int(state.count) == 2


def test_reset_with_a_python_scalar_in_the_inner_state():
    """optax's own lookahead test optimizer keeps a Python bool in its state record."""

    def init(params):
        return _TestState(jax.tree.map(jnp.zeros_like, params), True)

    def update(updates, state, params=None):
        agg = jax.tree.map(jnp.add, state.agg, updates)
        return jax.tree.map(lambda u: -0.1 * u, updates), _TestState(agg, False)

    inner = optax.GradientTransformation(init, update)
    tx = lo.lookahead(inner, k=2, inner_state="reset")
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    flags = []
    for _ in range(4):
        updates, state = tx.update(params, state, params)
        params = optax.apply_updates(params, updates)
        flags.append(bool(state.inner_state.is_reset))
    assert flags == [False, True, False, True]  # the record restarts as a whole at a sync
    np.testing.assert_array_equal(state.inner_state.agg["w"], np.zeros(3))

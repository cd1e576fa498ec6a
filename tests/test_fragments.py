"""Streaming DiLoCo (fragments=P) where it meets the other features: effects, live k, workers,
leaves that no fragment can hold."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lookahead_optax as lo
from tests import reference as ref


def _mlp_params():
    """A plain two-layer MLP: 4 leaves, which 4 fragments split [2, 1, 1, 0]."""
    rng = np.random.default_rng(0)
    return {
        "dense1": {"kernel": jnp.asarray(rng.normal(size=(2, 2)), jnp.float32),
                   "bias": jnp.asarray(rng.normal(size=(2,)), jnp.float32)},
        "dense2": {"kernel": jnp.asarray(rng.normal(size=(2, 7)), jnp.float32),
                   "bias": jnp.asarray(rng.normal(size=(7,)), jnp.float32)},
    }  # fmt: skip


def test_inner_effects_run_once_per_step_with_fragments():
    calls = []

    def count(_):
        calls.append(1)

    def noisy_update(updates, state, params=None):
        jax.debug.callback(count, state.count)
        return updates, state

    counting = optax.GradientTransformation(
        lambda params: optax.ScaleByAdamState(jnp.zeros([], jnp.int32), None, None),
        lambda u, s, p=None: noisy_update(u, s._replace(count=s.count + 1), p),
    )
    tx = lo.lookahead(optax.chain(counting, optax.sgd(0.1)), k=4, fragments=2)
    params = {"a": jnp.ones(3), "b": jnp.ones(5)}
    state = tx.init(params)
    step = jax.jit(tx.update)
    for _ in range(8):  # 4 fragment syncs among them
        updates, state = step(params, state, params)
        params = optax.apply_updates(params, updates)
    jax.effects_barrier()
    assert len(calls) == 8


def test_a_live_k_below_fragments_still_syncs_every_fragment():
    """k injected below fragments: every fragment syncs once per cycle, none is stuck."""
    tx = optax.inject_hyperparams(lo.lookahead, static_args=("fragments", "inner"))(
        inner=optax.sgd(0.1), k=6, alpha=0.5, fragments=3
    )
    params = {"a": jnp.ones(4), "b": 2 * jnp.ones(4), "c": 3 * jnp.ones(4)}
    state = tx.init(params)
    state.hyperparams["k"] = jnp.asarray(2, jnp.int32)  # takes effect from the next cycle
    step = jax.jit(tx.update)
    slow_history = []
    for _ in range(6 + 2 * 3):  # the first cycle (k=6), then three cycles of k=2
        updates, state = step(params, state, params)
        params = optax.apply_updates(params, updates)
        slow_history.append(lo.slow_params(state, params))
    inner = state.inner_state
    assert int(inner.syncs) == 4
    for leaf in ("a", "b", "c"):  # each fragment moved in every one of the k=2 cycles
        moves = [
            not np.array_equal(before[leaf], after[leaf])
            for before, after in zip(slow_history[5:-1], slow_history[6:])
        ]
        assert sum(moves) == 3, (leaf, moves)


@pytest.mark.parametrize("outer", [None, "nesterov"])
def test_four_fragments_of_a_four_leaf_mlp_with_workers_match_the_reference(outer):
    """4 fragments over 4 leaves split [2, 1, 1, 0]: the empty fragment never syncs."""
    workers, k, steps = 2, 4, 9
    params0 = _mlp_params()
    leaves0 = [np.asarray(x, np.float64) for x in jax.tree.leaves(params0)]
    groups = ref.fragment_groups([x.size for x in leaves0], 4)
    assert [len(g) for g in groups] == [2, 1, 1, 0]
    targets = [0.0, 1.0]

    def loss(p, target):
        return sum(jnp.sum((x - target) ** 2) for x in jax.tree.leaves(p))

    kwargs = (
        dict(alpha=0.5)
        if outer is None
        else dict(outer=optax.sgd(0.7, momentum=0.9, nesterov=True))
    )
    tx = lo.lookahead(optax.sgd(0.05), k=k, workers=workers, fragments=4, **kwargs)
    params = lo.replicate(params0, workers)
    state = tx.init(params)
    grad = jax.jit(jax.vmap(jax.grad(loss)))
    step = jax.jit(tx.update)
    got = []
    for _ in range(steps):
        updates, state = step(grad(params, jnp.asarray(targets)), state, params)
        params = optax.apply_updates(params, updates)
        got.append((params, lo.slow_params(state, params)))
    grad_fns = [lambda leaves, t=t: [2 * (x - t) for x in leaves] for t in targets]
    ref_outer = ref.SGD(0.5) if outer is None else ref.NesterovSGD(0.7, 0.9)
    fast, slow = ref.diloco_trajectory(
        leaves0, grad_fns, ref.SGD(0.05), k, ref_outer, steps, groups=groups
    )
    for (params, slow_params), ref_fast, ref_slow in zip(got, fast, slow, strict=True):
        for w in range(workers):
            for leaf, expected in zip(jax.tree.leaves(params), ref_fast[w]):
                np.testing.assert_allclose(leaf[w], expected, rtol=2e-5, atol=2e-6)
        for leaf, expected in zip(jax.tree.leaves(slow_params), ref_slow):
            np.testing.assert_allclose(leaf, expected, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("workers", [None, 2])
def test_a_zero_size_leaf_with_fragments_is_left_alone(workers):
    """A zero-size float leaf is in no fragment; the others follow the streaming reference."""
    params0 = {"empty": jnp.zeros((0, 3)), "v": jnp.arange(6.0) / 5, "w": jnp.arange(4.0) / 3}
    params = params0 if workers is None else lo.replicate(params0, workers)
    tx = lo.lookahead(optax.sgd(0.1), k=2, fragments=2, workers=workers)
    state = tx.init(params)
    step = jax.jit(tx.update)
    got = []
    for _ in range(5):
        updates, state = step(params, state, params)  # grads = params: loss 0.5 |p|^2
        params = optax.apply_updates(params, updates)
        got.append(params)
    leaves0 = [np.asarray(x, np.float64) for x in jax.tree.leaves(params0)]
    groups = ref.fragment_groups([x.size for x in leaves0], 2)
    assert groups == [[1], [2]]
    fast, _ = ref.diloco_trajectory(
        leaves0, [lambda leaves: list(leaves)], ref.SGD(0.1), 2, ref.SGD(0.5), 5, groups=groups
    )
    for params, expected in zip(got, fast, strict=True):
        for leaf, want in zip(jax.tree.leaves(params), expected[0]):
            leaf = leaf if workers is None else leaf[1]
            assert leaf.shape == want.shape
            np.testing.assert_allclose(leaf, want, rtol=1e-6, atol=1e-7)

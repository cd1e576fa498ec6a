"""Lookahead in Flax: linen TrainState and nnx.Optimizer, trained for real on digits.

The slow weights each framework reports are checked against Algorithm 1 written
out below with the plain ``optax.adam`` (no lookahead_optax code), fed the same
minibatches; accuracy at the slow weights is checked on held-out digits.
"""

import functools
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training.train_state import TrainState
from sklearn.datasets import load_digits

import lookahead_optax as lo

K, ALPHA, LR, STEPS, BATCH = 5, 0.5, 1e-2, 120, 128


@pytest.fixture(scope="module")
def digits():
    features, labels = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(labels))
    features = (features[order] / 16.0).astype(np.float32)
    labels = labels[order].astype(np.int32)
    train, test = slice(0, 1400), slice(1400, None)
    batch_rng = np.random.default_rng(1)
    batches = [batch_rng.choice(1400, BATCH, replace=False) for _ in range(STEPS)]
    return {
        "train": (features[train], labels[train]),
        "test": (features[test], labels[test]),
        "batches": [(features[train][i], labels[train][i]) for i in batches],
    }


def cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def accuracy(logits, labels):
    return float(jnp.mean(jnp.argmax(logits, -1) == labels))


@functools.cache
def _inner_step(loss_fn):
    """One jitted optax.adam step, compiled once per loss."""

    @jax.jit
    def inner_step(fast, inner_state, x, y):
        grads = jax.grad(loss_fn)(fast, x, y)
        updates, inner_state = optax.adam(LR).update(grads, inner_state, fast)
        return optax.apply_updates(fast, updates), inner_state

    return inner_step


def algorithm1_slow(loss_fn, params0, batches):
    """Algorithm 1 of the paper with optax.adam kept across syncs; returns phi."""
    inner = optax.adam(LR)
    inner_step = _inner_step(loss_fn)
    inner_state = inner.init(params0)
    slow = fast = params0
    for step, (x, y) in enumerate(batches, start=1):
        fast, inner_state = inner_step(fast, inner_state, x, y)
        if step % K == 0:
            slow = jax.tree.map(lambda s, f: s + ALPHA * (f - s), slow, fast)
            fast = slow
    return slow


def assert_trees_close(actual, expected):
    # Float32 rounding differs (params + (phi - params) vs phi), so not bit-exact.
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-4, atol=1e-5)


# --- Flax linen: TrainState ---------------------------------------------------


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(10)(nn.relu(nn.Dense(64)(x)))


def linen_loss(params, x, y):
    return cross_entropy(LinenMLP().apply({"params": params}, x), y)


@jax.jit
def linen_train_step(state, x, y):
    grads = jax.grad(linen_loss)(state.params, x, y)
    return state.apply_gradients(grads=grads)


def linen_start(digits):
    model = LinenMLP()
    params0 = jax.jit(model.init)(jax.random.key(0), digits["train"][0][:1])["params"]
    tx = lo.lookahead(optax.adam(LR), k=K, alpha=ALPHA)
    return params0, TrainState.create(apply_fn=model.apply, params=params0, tx=tx)


def test_linen_train_state_trains_and_evaluates_at_slow_weights(digits):
    params0, state = linen_start(digits)
    train_x, train_y = digits["train"]
    loss_before = float(linen_loss(state.params, train_x, train_y))
    for x, y in digits["batches"]:
        state = linen_train_step(state, x, y)
    slow = lo.slow_params(state.opt_state, state.params)

    assert float(linen_loss(slow, train_x, train_y)) < 0.25 * loss_before
    test_x, test_y = digits["test"]
    assert accuracy(state.apply_fn({"params": slow}, test_x), test_y) > 0.85
    # STEPS is a multiple of K: the run just synced, so params are the slow weights.
    assert int(state.opt_state.count) == 0
    assert_trees_close(state.params, slow)
    assert_trees_close(slow, algorithm1_slow(linen_loss, params0, digits["batches"]))


def test_linen_slow_weights_mid_cycle_differ_from_params(digits):
    params0, state = linen_start(digits)
    batches = digits["batches"][: K + 2]  # one sync, then two fast steps
    for x, y in batches:
        state = linen_train_step(state, x, y)
    slow = lo.slow_params(state.opt_state, state.params)

    assert int(state.opt_state.count) == 2
    assert_trees_close(slow, algorithm1_slow(linen_loss, params0, batches[:K]))
    for fast_leaf, slow_leaf in zip(jax.tree.leaves(state.params), jax.tree.leaves(slow)):
        assert not np.allclose(fast_leaf, slow_leaf)


# --- Flax NNX: nnx.Optimizer --------------------------------------------------


class NNXMLP(nnx.Module):
    def __init__(self, rngs):
        # No bias before BatchNorm: its gradient is rounding noise that Adam
        # would blow up into steps, making trajectories incomparable.
        self.hidden = nnx.Linear(64, 64, use_bias=False, rngs=rngs)
        self.norm = nnx.BatchNorm(64, momentum=0.9, rngs=rngs)
        self.out = nnx.Linear(64, 10, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.norm(self.hidden(x))))


def functional_apply(params, x, batch_stats=None):
    """NNXMLP written out on plain arrays (independent of NNX): in eval mode with
    ``batch_stats``, in training mode (normalising by the batch) without."""
    h = x @ params["hidden"]["kernel"]
    if batch_stats is None:
        batch_stats = {"mean": h.mean(0), "var": h.var(0)}
    h = (h - batch_stats["mean"]) / jnp.sqrt(batch_stats["var"] + 1e-5)
    h = nnx.relu(h * params["norm"]["scale"] + params["norm"]["bias"])
    return h @ params["out"]["kernel"] + params["out"]["bias"]


def functional_loss(params, x, y):
    return cross_entropy(functional_apply(params, x), y)


def pure(tree):
    return nnx.to_pure_dict(tree) if isinstance(tree, nnx.State) else tree


@pytest.fixture(scope="module")
def nnx_run(digits):
    """An NNX model trained for STEPS - 2 steps (mid-cycle) with Lookahead(Adam)."""
    model = NNXMLP(nnx.Rngs(0))
    params0 = pure(nnx.state(model, nnx.Param))
    optimizer = nnx.Optimizer(model, lo.lookahead(optax.adam(LR), k=K, alpha=ALPHA), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, x, y):
        loss, grads = nnx.value_and_grad(lambda m: cross_entropy(m(x), y))(model)
        optimizer.update(model, grads)
        return loss

    batches = digits["batches"][:-2]
    losses = [float(train_step(model, optimizer, x, y)) for x, y in batches]
    return model, optimizer, params0, batches, losses


def test_nnx_optimizer_trains_and_slow_params_unwraps_nnx_state(digits, nnx_run):
    model, optimizer, params0, batches, losses = nnx_run
    assert np.mean(losses[-10:]) < 0.25 * np.mean(losses[:3])

    slow = lo.slow_params(optimizer.opt_state, nnx.state(model, nnx.Param))
    assert isinstance(slow, nnx.State)
    leaves = jax.tree.leaves(slow, is_leaf=lambda x: isinstance(x, nnx.Variable))
    assert leaves and all(type(leaf) is nnx.Param for leaf in leaves)

    # Algorithm 1 on the same batches; in training mode BatchNorm normalises by
    # the batch, so the loss does not depend on the running statistics.
    expected = algorithm1_slow(functional_loss, params0, batches)
    assert_trees_close(pure(slow), expected)
    fast = pure(nnx.state(model, nnx.Param))
    assert not np.allclose(fast["out"]["kernel"], expected["out"]["kernel"])


def test_nnx_slow_model_is_pure_and_matches_functional_apply(digits, nnx_run):
    model, optimizer, _, _, _ = nnx_run
    test_x, test_y = digits["test"]
    model_before = jax.tree.map(np.array, pure(nnx.state(model)))
    opt_before = jax.tree.map(np.array, pure(nnx.state(optimizer)))

    slow_model = lo.flax.nnx_slow_model(model, optimizer)
    slow_model(test_x * 3.0)  # training mode: updates the slow model's batch stats only
    slow_model.out.kernel[...] = 0.0  # and writing to it never reaches the trained model

    for before, after in [(model_before, nnx.state(model)), (opt_before, nnx.state(optimizer))]:
        for b, a in zip(jax.tree.leaves(before), jax.tree.leaves(pure(after)), strict=True):
            np.testing.assert_array_equal(a, b)
    assert not np.array_equal(slow_model.norm.mean[...], model.norm.mean[...])

    @nnx.jit
    def evaluate(model, optimizer, x):
        slow_model = lo.flax.nnx_slow_model(model, optimizer)
        slow_model.eval()
        return slow_model(x)

    slow = pure(lo.slow_params(optimizer.opt_state, nnx.state(model, nnx.Param)))
    stats = {"mean": model.norm.mean[...], "var": model.norm.var[...]}
    expected = functional_apply(slow, test_x, stats)
    np.testing.assert_allclose(evaluate(model, optimizer, test_x), expected, rtol=1e-5, atol=1e-5)
    assert accuracy(expected, test_y) > 0.85
    # The fast weights give different outputs: evaluation really used phi.
    fast = pure(nnx.state(model, nnx.Param))
    assert not np.allclose(functional_apply(fast, test_x, stats), expected, atol=1e-3)


def snapshot(*modules):
    return [jax.tree.map(np.array, pure(nnx.state(module))) for module in modules]


def assert_snapshots_equal(before, after):
    for b, a in zip(before, after, strict=True):
        for x, y in zip(jax.tree.leaves(b), jax.tree.leaves(a), strict=True):
            np.testing.assert_array_equal(x, y)


def test_nnx_update_batch_stats_measures_the_slow_weights(digits, nnx_run):
    """The statistics of the BatchNorm's input at the slow weights, computed by hand
    in float64; the trained model, its optimizer and the argument stay as they were."""
    model, optimizer, _, _, _ = nnx_run
    slow_model = lo.flax.nnx_slow_model(model, optimizer)
    before = snapshot(model, optimizer, slow_model)
    train_x, _ = digits["train"]
    batches = train_x.reshape(10, 140, 64)  # ten equal batches

    updated = lo.flax.nnx_update_batch_stats(slow_model, batches)

    assert_snapshots_equal(before, snapshot(model, optimizer, slow_model))
    kernel = np.asarray(slow_model.hidden.kernel[...], np.float64)
    h = batches.astype(np.float64) @ kernel  # the BatchNorm's input, per batch
    mean, var = h.mean(axis=(0, 1)), h.var(axis=1).mean(axis=0)
    np.testing.assert_allclose(updated.norm.mean[...], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(updated.norm.var[...], var, rtol=1e-5, atol=1e-6)
    # Over all examples, var would add the spread of the batch means: not this.
    assert not np.allclose(h.reshape(-1, 64).var(axis=0), var, rtol=1e-3)
    # The fast trajectory's statistics differ; everything else is the slow model's.
    assert not np.allclose(model.norm.mean[...], mean, rtol=1e-2)
    assert (updated.norm.momentum, updated.norm.use_running_average) == (0.9, False)
    assert_snapshots_equal(
        [pure(nnx.state(slow_model, nnx.Param))], [pure(nnx.state(updated, nnx.Param))]
    )


class NormDropoutNet(nnx.Module):
    def __init__(self, rngs):
        self.first = nnx.Linear(5, 8, rngs=rngs)
        self.first_norm = nnx.BatchNorm(8, momentum=0.8, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, rngs=rngs)
        self.second = nnx.Linear(8, 4, rngs=rngs)
        self.second_norm = nnx.BatchNorm(4, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.first_norm(self.first(x)))
        return self.second_norm(self.second(self.dropout(h)))


def test_nnx_update_batch_stats_two_norms_dropout_and_stale_statistics():
    """Two BatchNorms (the second one's input normalised by the batch, as in
    training), dropout switched off, non-finite stale statistics discarded, and
    (inputs, labels) pairs through ``forward``."""
    model = NormDropoutNet(nnx.Rngs(0))
    model.first_norm.mean[...] = jnp.full(8, jnp.nan)
    model.second_norm.var[...] = jnp.full(4, jnp.inf)
    xs = np.asarray(jax.random.normal(jax.random.key(1), (6, 16, 5)) * 2.0 + 1.0)
    batches = [(x, np.zeros(len(x), np.int32)) for x in xs]

    updated = lo.flax.nnx_update_batch_stats(model, batches, forward=lambda m, batch: m(batch[0]))

    def f64(variable):
        return np.asarray(variable[...], np.float64)

    firsts, seconds = [], []
    for x in xs.astype(np.float64):
        h = x @ f64(model.first.kernel) + f64(model.first.bias)
        firsts.append((h.mean(0), h.var(0)))
        h = (h - h.mean(0)) / np.sqrt(h.var(0) + 1e-5)
        h = np.maximum(h * f64(model.first_norm.scale) + f64(model.first_norm.bias), 0.0)
        h = h @ f64(model.second.kernel) + f64(model.second.bias)  # no dropout
        seconds.append((h.mean(0), h.var(0)))
    for norm, stats in [(updated.first_norm, firsts), (updated.second_norm, seconds)]:
        np.testing.assert_allclose(norm.mean[...], np.mean([m for m, _ in stats], 0), atol=1e-5)
        np.testing.assert_allclose(norm.var[...], np.mean([v for _, v in stats], 0), rtol=1e-5)
    assert np.isnan(model.first_norm.mean[...]).all()  # the argument is unchanged
    assert updated.first_norm.momentum == 0.8 and updated.dropout.deterministic is False

    with pytest.raises(ValueError, match="empty"):
        lo.flax.nnx_update_batch_stats(model, [])
    linear = nnx.Linear(2, 1, rngs=nnx.Rngs(0))  # no BatchNorm: a copy, never run
    copy = lo.flax.nnx_update_batch_stats(linear, [None])
    assert copy is not linear and np.array_equal(copy.kernel[...], linear.kernel[...])


def test_nnx_slow_model_needs_a_lookahead_optimizer():
    model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    with pytest.raises(ValueError, match="no LookaheadState"):
        lo.flax.nnx_slow_model(model, optimizer)


def test_flax_stays_optional():
    code = "import sys, lookahead_optax; assert 'flax' not in sys.modules, 'flax imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]

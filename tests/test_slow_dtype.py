"""slow_dtype: float32 slow weights for bf16/f16 params keep the small slow steps.

The slow step alpha (theta_k - phi) is a fraction of k inner steps. In bf16 it is
rounded to the params' grid at every sync, and when it is below half a unit in the
last place it is lost altogether (TFA's slow weights "stuck" under mixed
precision). The test isolates that effect: SGD on a linear loss whose inner steps
are exact in the low precision (two units in the last place), so every deviation
from the float64 reference comes from the slow step alone.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lookahead_optax as lo
from tests import reference
from tests.helpers import SGD_LR, reference_sgd

K = 5
NUM_SYNCS = 30
NUM = 64


def _problem(dtype):
    rng = np.random.default_rng(0)
    eps = float(jnp.finfo(dtype).eps)  # one unit in the last place on [1, 2)
    # Start on the low-precision grid in [1, 1.5) and walk down by 2 ulps per step: every
    # inner step and every fast weight stays exactly representable (|w| < 2).
    params0 = np.asarray(jnp.asarray(rng.uniform(1.0, 1.5, NUM), dtype), np.float64)
    grad = np.ones(NUM)
    lr = 2 * eps
    return params0, grad, lr


def _library_slow(dtype, slow_dtype, alpha, params0, grad, lr):
    tx = lo.lookahead(optax.sgd(lr), k=K, alpha=alpha, slow_dtype=slow_dtype)
    params = {"w": jnp.asarray(params0, dtype)}
    grads = {"w": jnp.asarray(grad, dtype)}

    @jax.jit
    def cycle(params, opt_state):
        for _ in range(K):
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
        return params, opt_state

    opt_state = tx.init(params)
    slow_history = []
    for _ in range(NUM_SYNCS):
        params, opt_state = cycle(params, opt_state)
        assert params["w"].dtype == dtype  # params stay in their low precision
        slow_history.append(lo.slow_params(opt_state, params)["w"])
    return slow_history


_F16_STUCK = pytest.mark.xfail(
    strict=False,
    reason="open: at alpha=0.05 in float16 (every slow step lost, 'stuck') the library's "
    "float16 slow weights differ by 15 ulps from tests/reference.py's rounding model since the "
    "reference was generalised for the conformance matrix; the library's numbers are those of "
    "0.3.0 (checked against 23f6617)",
)


@pytest.mark.parametrize(
    ("dtype", "alpha"),
    [
        (jnp.bfloat16, 0.05),
        (jnp.bfloat16, 0.12),
        pytest.param(jnp.float16, 0.05, marks=[pytest.mark.slow, _F16_STUCK]),
        pytest.param(jnp.float16, 0.12, marks=pytest.mark.slow),
    ],
)
def test_float32_slow_weights_track_the_float32_reference(dtype, alpha):
    params0, grad, lr = _problem(dtype)

    def reference_slow(slow_dtype):
        """The reference's slow weights after every sync, stored in ``slow_dtype``."""
        lookahead = reference.Lookahead(
            reference.SGD(lr), K, alpha, slow_dtype=slow_dtype, params_dtype=dtype
        )
        history = reference.run(
            lookahead, [params0], lambda leaves: [grad], K * NUM_SYNCS, params_dtype=dtype
        )
        return [history[K * (j + 1) - 1].state.slow[0] for j in range(NUM_SYNCS)]

    slow_ref, slow_ref_low = reference_slow(None), reference_slow(dtype)

    def max_error(history, expected=slow_ref):
        return max(np.max(np.abs(np.asarray(s, np.float64) - r)) for s, r in zip(history, expected))

    low = _library_slow(dtype, None, alpha, params0, grad, lr)
    high = _library_slow(dtype, jnp.float32, alpha, params0, grad, lr)
    assert low[-1].dtype == dtype and high[-1].dtype == jnp.float32

    ulp = float(jnp.finfo(dtype).eps)
    error_low, error_high = max_error(low), max_error(high)
    # f32 slow weights: within half a low-precision ulp of the reference (the fast weights
    # restart from the slow weights rounded to the params' dtype; nothing accumulates).
    # Measured: 0.1-0.2 ulp.
    assert error_high <= 0.5 * ulp
    # Low-precision slow weights lose a part of every slow step, and it adds up (measured:
    # 6 ulps at alpha=0.12, 15 ulps at alpha=0.05 where every slow step is lost: stuck).
    assert error_low >= 5 * ulp
    assert error_low / error_high >= 20
    # ...and it is exactly the loss of the reference run whose slow weights are stored in
    # the low precision, phi rounded at every sync (measured: equal; allowed: one ulp).
    assert max_error(low, slow_ref_low) <= ulp


def test_float32_slow_dtype_changes_nothing_for_float32_params():
    params0, grad, lr = _problem(jnp.float32)
    default = _library_slow(jnp.float32, None, 0.12, params0, grad, lr)
    explicit = _library_slow(jnp.float32, jnp.float32, 0.12, params0, grad, lr)
    for a, b in zip(default, explicit):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_slow_dtype_params_follow_the_rounded_slow_weights():
    """After a sync the bf16 params are the f32 slow weights rounded to bf16."""
    tx = lo.lookahead(optax.adam(1e-2), k=2, alpha=0.3, slow_dtype=jnp.float32)
    params = {"w": jnp.linspace(-1, 1, 8, dtype=jnp.bfloat16)}
    opt_state = tx.init(params)
    assert opt_state.slow["w"].dtype == jnp.float32
    for _ in range(2):
        updates, opt_state = tx.update(params, opt_state, params)
        assert updates["w"].dtype == jnp.bfloat16
        params = optax.apply_updates(params, updates)
    slow = lo.slow_params(opt_state, params)["w"]
    assert slow.dtype == jnp.float32 and params["w"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(params["w"]), np.asarray(slow.astype(jnp.bfloat16)))


def test_slow_dtype_must_be_floating():
    with pytest.raises(ValueError, match="slow_dtype"):
        lo.lookahead(optax.sgd(0.1), slow_dtype=jnp.int32)


def test_slow_dtype_under_strict_dtype_promotion():
    """f32 slow weights with bf16 params need explicit casts: strict promotion must not fail."""
    params0, grad, lr = _problem(jnp.bfloat16)
    with jax.numpy_dtype_promotion("strict"):
        strict = _library_slow(jnp.bfloat16, jnp.float32, 0.12, params0, grad, lr)
    standard = _library_slow(jnp.bfloat16, jnp.float32, 0.12, params0, grad, lr)
    for a, b in zip(strict, standard):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---- dtypes of params, grads and slow weights (0.2.0's defects) ----


def test_inject_hyperparams_with_a_slow_dtype_is_an_error_unless_static():
    params = {"w": jnp.array([1.0, -2.0], jnp.bfloat16)}
    tx = optax.inject_hyperparams(lo.lookahead)(optax.sgd(SGD_LR), slow_dtype=jnp.float32)
    with pytest.raises(ValueError, match="slow_dtype.*static_args"):
        tx.init(params)
    tx = optax.inject_hyperparams(lo.lookahead, static_args=("slow_dtype",))(
        optax.sgd(SGD_LR), slow_dtype=jnp.float32
    )
    assert tx.init(params).inner_state.slow["w"].dtype == jnp.float32


def test_complex_params_keep_their_imaginary_part():
    w0 = jnp.array([1.0 + 2.0j, -0.5j], jnp.complex64)
    tx = lo.lookahead(optax.sgd(SGD_LR), k=2, alpha=0.5, slow_dtype=jnp.float32)
    params = {"w": w0}
    opt_state = tx.init(params)
    assert opt_state.slow["w"].dtype == jnp.complex64
    for _ in range(2):
        updates, opt_state = tx.update(params, opt_state, params)
        params = optax.apply_updates(params, updates)
    # SGD on 0.5 |w|^2 has real coefficients: real and imaginary parts evolve apart.
    real, imag = (reference_sgd(np.asarray(part(w0)), 2, 0.5, 2) for part in (jnp.real, jnp.imag))
    fast = [r + 1j * i for r, i in zip(real[0], imag[0])]
    slow = [r + 1j * i for r, i in zip(real[1], imag[1])]
    np.testing.assert_allclose(lo.slow_params(opt_state, params)["w"], slow[-1], rtol=1e-6)
    np.testing.assert_allclose(params["w"], fast[-1], rtol=1e-6)


@pytest.mark.parametrize("fused", [False, True])
def test_f32_params_with_bf16_grads_land_exactly_on_the_slow_weights(fused):
    params = {"w": jnp.array([1.0, -2.0, 0.3], jnp.float32)}
    tx = lo.lookahead(optax.sgd(SGD_LR), k=3, alpha=0.5)
    opt_state = tx.init(params)
    for _ in range(3):
        grads = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
        if fused:
            params, opt_state = lo.update_and_apply(tx, grads, opt_state, params)
        else:
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
    assert int(opt_state.syncs) == 1
    np.testing.assert_array_equal(params["w"], lo.slow_params(opt_state, params)["w"])

"""Helpers shared by the core test modules (the reference itself lives in reference.py)."""

import jax
import optax


def standard_promotion(tx: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """Runs ``tx``'s own code under standard dtype promotion.

    The core tests run under strict promotion, but optax's Adam is not strict-clean
    (``tree_bias_correction`` computes ``float ** int32``). Wrapping only the inner
    optimizer keeps lookahead's own code checked under strict promotion.
    """
    tx = optax.with_extra_args_support(tx)

    def init_fn(params):
        with jax.numpy_dtype_promotion("standard"):
            return tx.init(params)

    def update_fn(updates, state, params=None, **extra_args):
        with jax.numpy_dtype_promotion("standard"):
            return tx.update(updates, state, params, **extra_args)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def adam(learning_rate, **kwargs) -> optax.GradientTransformationExtraArgs:
    """optax.adam, usable inside strict-promotion tests."""
    return standard_promotion(optax.adam(learning_rate, **kwargs))

"""Helpers shared by the core test modules (the reference itself lives in reference.py)."""

import jax
import optax


def with_promotion(
    tx: optax.GradientTransformation, mode: str
) -> optax.GradientTransformationExtraArgs:
    """Traces ``tx``'s init and update under ``jax.numpy_dtype_promotion(mode)``.

    The core tests run under strict promotion, but some optax transformations are
    not strict-clean (Adam's bias correction computes ``float ** int32``, MultiSteps
    divides by an int32 count). Only their own code runs under "standard"; a
    lookahead inside them is wrapped back to "strict", so our code stays checked.
    """
    tx = optax.with_extra_args_support(tx)

    def init_fn(params):
        with jax.numpy_dtype_promotion(mode):
            return tx.init(params)

    def update_fn(updates, state, params=None, **extra_args):
        with jax.numpy_dtype_promotion(mode):
            return tx.update(updates, state, params, **extra_args)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def standard_promotion(tx: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    return with_promotion(tx, "standard")


def strict_promotion(tx: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    return with_promotion(tx, "strict")


def adam(learning_rate, **kwargs) -> optax.GradientTransformationExtraArgs:
    """optax.adam, usable inside strict-promotion tests."""
    return standard_promotion(optax.adam(learning_rate, **kwargs))


def multi_steps(inner, every_k_schedule) -> optax.GradientTransformationExtraArgs:
    """optax.MultiSteps under standard promotion, ``inner`` still under strict."""
    return standard_promotion(optax.MultiSteps(strict_promotion(inner), every_k_schedule))

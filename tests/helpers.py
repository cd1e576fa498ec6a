"""Helpers shared by the core test modules (the reference itself lives in reference.py)."""

import jax
import jax.numpy as jnp
import numpy as np
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


class JaxInner:
    """A jax inner optimizer as an inner optimizer of tests/reference.py (lists of leaves).

    Only for tests about the Lookahead wrapping (its sync, its inner-state policies,
    what reaches the inner optimizer), never about the inner optimizer itself: the
    reference then runs the same inner step as the library, in ``dtype``, and the
    reference's Algorithm 1 around it. ``update(grads, state, params)`` defaults to
    ``tx.update``; give it to pass extra arguments.
    """

    def __init__(self, tx, treedef, update=None, dtype=jnp.float32):
        self.tx, self.treedef, self.dtype = tx, treedef, dtype
        self._update = jax.jit(update or tx.update)

    def tree(self, leaves):
        return jax.tree.unflatten(self.treedef, [jnp.asarray(x, self.dtype) for x in leaves])

    def init(self, params):
        return self.tx.init(self.tree(params))

    def step(self, grads, state, params):
        updates, state = self._update(self.tree(grads), state, self.tree(params))
        return [np.asarray(u, np.float64) for u in jax.tree.leaves(updates)], state

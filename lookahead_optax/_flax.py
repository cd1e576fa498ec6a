"""Flax NNX helper: the model at the slow weights, without touching the trained one.

Flax stays an optional dependency: it is imported inside the function, never at
``import lookahead_optax``. Linen's ``TrainState`` and Orbax need no helper here:
``lo.slow_params(state.opt_state, state.params)`` and
``jax.eval_shape(tx.init, params)`` (the restore target) do the job.
"""

from __future__ import annotations

from typing import Any

from lookahead_optax._slow import slow_params


def nnx_slow_model(model: Any, optimizer: Any) -> Any:
    """Returns a new NNX model holding the slow weights; ``model`` is left unchanged.

    The optimizer's ``wrt`` variables (usually ``nnx.Param``) are replaced by the
    slow weights found in ``optimizer.opt_state``; every other variable (batch
    statistics, RNG state, ...) is copied from ``model``. The result shares no
    Variable with ``model``: calling it, even in training mode, or updating it
    never changes the model being trained, so there is no swap in and swap back
    to forget. Evaluate and export this model: the slow weights are
    Lookahead's output. It is a plain function of its inputs, so it also works
    inside ``nnx.jit``.

    Args:
      model: The NNX module being trained (it holds the fast weights).
      optimizer: The ``nnx.Optimizer`` built on ``model`` with a transformation
        that contains :func:`lookahead_optax.lookahead`.

    Returns:
      A new module of the same type as ``model`` at the slow weights.

    Raises:
      ValueError: if ``optimizer.opt_state`` holds no ``LookaheadState``.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> from flax import nnx
      >>> import lookahead_optax as lo
      >>> model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
      >>> optimizer = nnx.Optimizer(model, lo.lookahead(optax.sgd(0.1), k=3), wrt=nnx.Param)
      >>> grads = nnx.grad(lambda m: jnp.sum(m(jnp.ones((1, 2))) ** 2))(model)
      >>> _ = optimizer.update(model, grads)  # one fast step; no sync yet
      >>> slow = lo.nnx_slow_model(model, optimizer)
      >>> bool(jnp.all(slow.kernel[...] == model.kernel[...]))  # fast weights moved
      False
      >>> init = nnx.Linear(2, 1, rngs=nnx.Rngs(0))  # slow weights = initial ones
      >>> bool(jnp.all(slow.kernel[...] == init.kernel[...]))
      True
    """
    from flax import nnx

    graphdef, params, rest = nnx.split(model, optimizer.wrt, ...)
    slow = slow_params(optimizer.opt_state, params)
    # copy=True gives the new model its own Variables; without it the slow
    # model's batch statistics would alias (and update) the trained model's.
    return nnx.merge(graphdef, slow, rest, copy=True)

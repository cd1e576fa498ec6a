"""Framework helpers: a Flax NNX model at the slow weights, and Orbax's restore target.

Flax and Orbax stay optional dependencies: flax is imported inside the function
that needs it, never at ``import lookahead_optax``. Linen's ``TrainState`` needs
no helper: ``lo.slow_params(state.opt_state, state.params)`` does the job.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

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


def abstract_opt_state(tx: optax.GradientTransformation, params: optax.Params) -> optax.OptState:
    """Shapes, dtypes and shardings of ``tx.init(params)``, without computing it.

    The restore target for an Orbax checkpoint of the optimizer state:
    ``ocp.args.StandardRestore(lo.abstract_opt_state(tx, abstract_params))``.
    On one device this is ``jax.eval_shape(tx.init, params)``. With params
    sharded over a mesh, ``jax.eval_shape`` only gives abstract-mesh shardings,
    which Orbax cannot restore onto; this returns the concrete shardings that
    ``jax.jit(tx.init)`` gives the state (slow weights sharded like their params,
    counters replicated), so the restored state is ready for the jitted step.
    Only ``tx.init`` is compiled; nothing is computed or allocated.

    Args:
      tx: The transformation whose state was saved, e.g. ``lo.lookahead(...)``.
      params: The params or their ``jax.ShapeDtypeStruct``s, with concrete
        shardings (a ``NamedSharding`` on a real ``Mesh``) or none at all.

    Returns:
      A pytree with the structure of ``tx.init(params)`` whose leaves are
      ``jax.ShapeDtypeStruct``s carrying shardings. ``None`` fields (such as
      ``LookaheadState.cycle_start`` without pullback) stay ``None``.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> import lookahead_optax as lo
      >>> tx = lo.lookahead(optax.adam(1e-3), k=5)
      >>> abstract_params = {"w": jax.ShapeDtypeStruct((3,), jnp.float32)}
      >>> target = lo.abstract_opt_state(tx, abstract_params)
      >>> target.slow["w"].shape, target.count.dtype, target.cycle_start
      ((3,), dtype('int32'), None)
    """
    shapes = jax.eval_shape(tx.init, params)
    shardings = jax.jit(tx.init).lower(params).compile().output_shardings
    return jax.tree.map(
        lambda shape, sharding: jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=sharding),
        shapes,
        shardings,
    )

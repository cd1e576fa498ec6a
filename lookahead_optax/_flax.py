"""Framework helpers: a Flax NNX model at the slow weights, its batch statistics
recomputed there, and Orbax's restore target.

Flax and Orbax stay optional dependencies: flax is imported inside the function
that needs it, never at ``import lookahead_optax``. Linen's ``TrainState`` needs
no helper: ``lo.slow_params(state.opt_state, state.params)`` does the job.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
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

    The batch statistics (``nnx.BatchStat``: BatchNorm's running ``mean`` and
    ``var``) are those of the *fast* trajectory: the running averages of the
    activations the fast weights produced during training, not the activations
    at the slow weights. To evaluate with statistics measured at the slow
    weights, recompute them with :func:`lookahead_optax.flax.nnx_update_batch_stats`
    (as ``torch.optim.swa_utils.update_bn`` does for weight averaging).

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
      >>> slow = lo.flax.nnx_slow_model(model, optimizer)
      >>> bool(jnp.all(slow.kernel[...] == model.kernel[...]))  # fast weights moved
      False
      >>> init = nnx.Linear(2, 1, rngs=nnx.Rngs(0))  # slow weights = initial ones
      >>> bool(jnp.all(slow.kernel[...] == init.kernel[...]))
      True
    """
    from flax import nnx

    split: Any = nnx.split(model, optimizer.wrt, ...)  # (graphdef, the wrt state, the rest)
    graphdef, params, rest = split[0], split[1], split[2]
    slow = slow_params(optimizer.opt_state, params)
    # copy=True gives the new model its own Variables; without it the slow
    # model's batch statistics would alias (and update) the trained model's.
    return nnx.merge(graphdef, slow, rest, copy=True)


def nnx_update_batch_stats(
    model: Any, batches: Iterable[Any], *, forward: Callable[[Any, Any], Any] | None = None
) -> Any:
    """Returns a copy of ``model`` whose BatchNorm statistics are recomputed over ``batches``.

    The NNX counterpart of PyTorch's ``torch.optim.swa_utils.update_bn``, for the
    model :func:`lookahead_optax.flax.nnx_slow_model` returns: that model holds the
    slow weights but the batch statistics of the fast trajectory. This runs the
    model once over every batch and sets the running statistics of each
    ``nnx.BatchNorm`` to, exactly (up to float32 rounding),

    - ``mean``: the mean over the batches of each batch's per-feature mean of
      the BatchNorm's input (with batches of equal size, the mean over all
      examples);
    - ``var``: the mean over the batches of each batch's per-feature variance
      of that input (the biased variance BatchNorm normalises by in training),

    each batch counting once, as in ``update_bn``'s cumulative average (drop a
    last, smaller batch to weigh every example equally). The input of each
    BatchNorm is the one the model produces at its own weights: every BatchNorm
    normalises by its batch (training mode), as during training, while
    ``Dropout`` and other modules with a ``deterministic`` attribute run
    deterministically, as in evaluation. The stale statistics are discarded
    (reset to zeros and ones first, so even non-finite ones do not leak in).

    ``model`` itself is not changed: the result is a new module, sharing no
    Variable with it, with every other variable and every attribute (modes,
    ``momentum``) as in ``model``. So
    ``lo.flax.nnx_update_batch_stats(lo.flax.nnx_slow_model(model, optimizer), batches)``
    leaves the trained model untouched. A model with no ``nnx.BatchNorm`` is
    returned as a copy without running it.

    Args:
      model: An NNX module, usually the one ``nnx_slow_model`` returns.
      batches: An iterable of inputs, such as a pass over the training set, of
        the same shape (the forward pass is compiled with ``nnx.jit`` once per
        shape). BatchNorms with an ``axis_name`` (``pmap``) are not supported.
      forward: ``forward(model, batch)`` runs the model on one batch; its result
        is ignored. Default: ``model(batch)``. Pass e.g.
        ``lambda model, batch: model(batch[0])`` for ``(inputs, labels)`` pairs.

    Returns:
      A new module of the same type as ``model`` with recomputed batch statistics.

    Raises:
      ValueError: if ``batches`` is empty (and the model has a BatchNorm).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> import lookahead_optax as lo
      >>> model = nnx.Sequential(nnx.Linear(2, 3, rngs=nnx.Rngs(0)),
      ...                        nnx.BatchNorm(3, rngs=nnx.Rngs(0)))
      >>> x = jax.random.normal(jax.random.key(1), (4, 8, 2))  # 4 batches of 8
      >>> updated = lo.flax.nnx_update_batch_stats(model, x)
      >>> h = x @ model.layers[0].kernel[...] + model.layers[0].bias[...]
      >>> bool(jnp.allclose(updated.layers[1].mean[...], h.mean((0, 1)), atol=1e-6))
      True
      >>> bool(jnp.allclose(updated.layers[1].var[...], h.var(1).mean(0), atol=1e-6))
      True
      >>> model.layers[1].mean[...]  # the argument keeps its statistics
      Array([0., 0., 0.], dtype=float32)
    """
    from flax import nnx

    if forward is None:

        def forward(model, batch):
            return model(batch)

    def batch_norms(module):
        return [m for _, m in nnx.iter_modules(module) if isinstance(m, nnx.BatchNorm)]

    result = nnx.clone(model)
    if not batch_norms(result):
        return result
    # A working copy runs the batches: its BatchNorms normalise by the batch
    # and, with momentum 0, store exactly that batch's statistics after every
    # call; those are summed here. The result keeps the model's attributes.
    work = nnx.clone(model)
    work.set_attributes(deterministic=True, raise_if_not_found=False)
    for norm in batch_norms(work):
        norm.use_running_average = False
        norm.momentum = 0.0
        # With momentum 0 the old value is multiplied by 0: reset it, or a
        # non-finite one would make the statistics NaN.
        norm.mean[...] = jnp.zeros_like(norm.mean[...])
        norm.var[...] = jnp.ones_like(norm.var[...])

    @nnx.jit
    def accumulate(work, sums, batch):
        forward(work, batch)
        stats = [(norm.mean[...], norm.var[...]) for norm in batch_norms(work)]
        return jax.tree.map(lambda total, stat: total + stat.astype(total.dtype), sums, stats)

    sums = [(jnp.zeros_like(n.mean[...]), jnp.zeros_like(n.var[...])) for n in batch_norms(work)]
    count = 0
    for batch in batches:
        sums = accumulate(work, sums, batch)
        count += 1
    if count == 0:
        raise ValueError("nnx_update_batch_stats: `batches` is empty")
    for norm, (mean_sum, var_sum) in zip(batch_norms(result), sums, strict=True):
        norm.mean[...] = mean_sum / count
        norm.var[...] = var_sum / count
    return result


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
      params: The params or their ``jax.ShapeDtypeStruct`` values, with concrete
        shardings (a ``NamedSharding`` on a real ``Mesh``) or none at all.

    Returns:
      A pytree with the structure of ``tx.init(params)`` whose leaves are
      ``jax.ShapeDtypeStruct`` values carrying shardings. ``None`` fields (such as
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

"""Many workers (DiLoCo): params with a leading worker axis."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def replicate(params: optax.Params, workers: int) -> optax.Params:
    """``params`` copied onto a new leading worker axis of size ``workers``.

    The starting point of ``lookahead(..., workers=N)``: every worker starts
    from the same weights (the shared slow weights start as worker 0's). Real
    copies, so the result can be donated to a jitted step.

    Args:
      params: One worker's params.
      workers: The number of workers N.

    Returns:
      A pytree like ``params`` whose leaves have shape ``(N, *leaf.shape)``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import lookahead_optax as lo
      >>> lo.replicate({"w": jnp.array([1.0, -2.0])}, 3)["w"].shape
      (3, 2)
    """
    return jax.tree.map(lambda p: jnp.repeat(jnp.asarray(p)[None], workers, axis=0), params)

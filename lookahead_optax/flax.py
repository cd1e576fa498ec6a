"""Flax helpers: a NNX model at the slow weights, its batch statistics there, Orbax targets.

Flax stays an optional dependency: it is imported inside the functions that need it, never
at ``import lookahead_optax``. Linen's ``TrainState`` needs no helper:
``lo.slow_params(state.opt_state, state.params)`` does the job.
"""

from lookahead_optax._flax import nnx_slow_model, nnx_update_batch_stats

__all__ = ["nnx_slow_model", "nnx_update_batch_stats"]  # abstract_opt_state: top level

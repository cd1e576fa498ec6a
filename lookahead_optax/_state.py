"""The Lookahead state, and the sync hint that ``update_and_apply`` passes to the update."""

from __future__ import annotations

from typing import NamedTuple

import jax
import optax
from jax import Array

from lookahead_optax._adaptive import AdaptiveAlphaState


class LookaheadState(NamedTuple):
    """State of :func:`lookahead_optax.lookahead`.

    Attributes:
      inner_state: The inner optimizer's state, kept across syncs by default.
      slow: The slow weights phi, a pytree with the structure of params (in
        ``slow_dtype`` when one was given; complex leaves stay complex).
        Evaluate and export them with :func:`lookahead_optax.slow_params`.
        Leaves of params that are not floating (int, bool, PRNG keys) are the
        inner optimizer's business: their entries here keep the initial value
        and are never used.
      count: Inner steps taken since the last sync, in ``[0, period)``; it
        wraps to 0 at every sync, so it never overflows.
      syncs: Number of syncs so far (saturating int32). The j-th sync (from 0)
        uses ``alpha(j)`` when alpha is a schedule.
      period: The sync period of the current cycle: this cycle syncs when
        ``count + 1 == period``. It is ``k`` when the cycle starts, so a ``k``
        changed under ``optax.inject_hyperparams`` (or by restoring a state
        into a transformation built with another ``k``) takes effect from the
        next cycle, and whether the next call syncs is a function of the state
        alone.
      cycle_start: With ``inner_state="pullback"``, the inner state at the
        start of the current cycle; ``None`` otherwise.
      adaptive: With ``alpha=adaptive_alpha(...)``, its ``AdaptiveAlphaState``;
        ``None`` otherwise.
      outer_state: With ``outer=...``, the outer optimizer's state (initialised
        on the slow weights, so in their dtype); updated on sync calls only.
        ``None`` with ``alpha``.
      sync_stats: With ``workers`` or ``axis_name``, a :class:`SyncStats` of the
        latest sync (zeros before the first); ``None`` otherwise.
    """

    inner_state: optax.OptState
    slow: optax.Params
    count: Array
    syncs: Array
    period: Array
    cycle_start: optax.OptState = None
    adaptive: AdaptiveAlphaState | None = None
    outer_state: optax.OptState = None
    sync_stats: SyncStats | None = None


class SyncStats(NamedTuple):
    r"""What the latest sync of many workers saw: log these.

    Attributes:
      pseudo_gradient_norm: The global L2 norm of the averaged pseudo-gradient
        :math:`\Delta = \phi - \mathrm{mean}_w \theta_w` (float32 scalar).
      worker_drift: Per worker, the L2 norm of its distance to the workers'
        mean, :math:`\lVert \theta_w - \mathrm{mean}_v \theta_v \rVert`: how far
        the workers drifted apart during the cycle (float32, shape ``(N,)``
        with ``workers=N``; with ``axis_name``, the root mean square over the
        workers, the same scalar on every worker).
    """

    pseudo_gradient_norm: Array
    worker_drift: Array


class SyncHint:
    """Whether this step syncs, decided by :func:`lookahead_optax.update_and_apply`.

    Passed to ``tx.update`` as the extra argument ``lookahead_sync``. A
    lookahead takes it only if ``count`` is the very ``count`` array of the
    state it is updating, and then sets ``taken``. So a hint can never reach
    another lookahead, a state that a wrapper changed, or a trace behind a
    ``jit`` boundary (where ``count`` is a new tracer); those updates decide for
    themselves, as ``tx.update`` always does. A pytree, so that wrappers may
    pass it through ``jit``.
    """

    def __init__(self, count: Array, sync: bool):
        self.count = count
        self.sync = sync
        self.taken = False


jax.tree_util.register_pytree_node(
    SyncHint, lambda hint: ((hint.count,), hint.sync), lambda sync, c: SyncHint(c[0], sync)
)

HINT_KEY = "lookahead_sync"

"""The Lookahead state, and finding it inside any opt_state."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import optax
from jax import Array


# A registered dataclass, not a NamedTuple: optax.tree.get/set match NamedTuple field names,
# and ``count`` would collide with the inner optimizer's (``optax.tree.get(opt_state,
# "count")`` must find Adam's). The key paths (``.count``, ``.slow``, ...) are a
# NamedTuple's, so Orbax checkpoints of 0.3.0 states restore unchanged.
@dataclasses.dataclass(frozen=True)
class LookaheadState:
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
        latest sync when built with ``sync_stats=True`` (zeros before the first),
        else filled with NaN (the same tree, so checkpoints of either setting
        restore into the other); ``None`` without workers.
      in_flight: With ``overlap > 0``, the averaged pseudo-gradient in flight: a
        pytree like ``slow`` (slow dtype; the entries of fragments not in flight
        hold their last average), sent ``overlap`` steps before its fragment's
        sync and consumed by it. ``None`` otherwise (the checkpoint tree of a
        run without overlap is unchanged).
      residual: With ``error_feedback=True``, each worker's quantization
        residual: a pytree like params (one params-sized float32 buffer per
        worker, with the worker axis under ``workers=N``), added to its next
        pseudo-gradient before quantizing. ``None`` otherwise.
      fragments: The number of fragments (1 unless ``fragments=``), static
        metadata: not a leaf, so checkpoints hold the same arrays. Fragment j
        syncs at step ``max(1, (j + 1) period // fragments)`` of each cycle.
      mixing: ``lookahead``'s ``mixing`` (0 unless given), static metadata: a
        sync lands the params on ``phi + mixing (theta - phi)``, not on ``phi``.
    """

    inner_state: optax.OptState
    slow: optax.Params
    count: Array
    syncs: Array
    period: Array
    cycle_start: optax.OptState = None
    adaptive: Any = None  # an AdaptiveAlphaState
    outer_state: optax.OptState = None
    sync_stats: SyncStats | None = None
    in_flight: optax.Params = None
    residual: optax.Params = None
    fragments: int = dataclasses.field(default=1, metadata={"static": True})
    mixing: float = dataclasses.field(default=0.0, metadata={"static": True})

    def _replace(self, **changes: Any) -> LookaheadState:
        """A copy with ``changes`` (as a NamedTuple's ``_replace``)."""
        return dataclasses.replace(self, **changes)


# Registered as a dataclass would be (children keyed by field name, static fields in the
# treedef), except that the fields of features added after 0.3.0 (``in_flight``,
# ``residual``) are children only when set: a None child is still a node of the tree, and
# Orbax refuses to restore a 0.3.0 checkpoint into a tree that has nodes it lacks.
_OPTIONAL = ("in_flight", "residual")


_STATIC = tuple(f.name for f in dataclasses.fields(LookaheadState) if f.metadata.get("static"))
_DATA = tuple(
    f.name
    for f in dataclasses.fields(LookaheadState)
    if f.name not in _STATIC and f.name not in _OPTIONAL
)
_KEYS = {n: jax.tree_util.GetAttrKey(n) for n in _DATA + _OPTIONAL}
_NAMES = {  # the children's names, by which optional fields are set
    (flight, residual): _DATA
    + (("in_flight",) if flight else ())
    + (("residual",) if residual else ())
    for flight in (False, True)
    for residual in (False, True)
}


# Flattening runs on every jitted call (arguments in, results out): one dict read per field,
# no dataclasses.fields() and no __init__ (a state flattens in about the time of a NamedTuple).
def _flatten(state: LookaheadState) -> tuple[list, tuple]:
    d = state.__dict__
    names = _NAMES[d["in_flight"] is not None, d["residual"] is not None]
    return [d[n] for n in names], (names, d["fragments"], d["mixing"])


def _flatten_with_keys(state: LookaheadState) -> tuple[list, tuple]:
    children, aux = _flatten(state)
    return [(_KEYS[n], c) for n, c in zip(aux[0], children)], aux


def _unflatten(aux: tuple, children: Any) -> LookaheadState:
    state = object.__new__(LookaheadState)  # frozen: fill __dict__ instead of __init__
    d = state.__dict__
    d.update(dict.fromkeys(_OPTIONAL))
    d.update(zip(aux[0], children))
    d["fragments"], d["mixing"] = aux[1:]
    return state


jax.tree_util.register_pytree_with_keys(LookaheadState, _flatten_with_keys, _unflatten, _flatten)


class SyncStats(NamedTuple):
    r"""What the latest sync of many workers saw: log these (with ``lookahead(...,
    sync_stats=True)``; otherwise NaN).

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


# ---- Finding and replacing the lookahead states inside any opt_state ----
# The one implementation of "the outermost LookaheadState(s) of an opt_state", for every
# function that reaches into a state built by chain, inject_hyperparams, MultiSteps, masked,
# multi_transform, an nnx.Optimizer, ... (anything that keeps its inner states as pytree nodes).


def is_lookahead_state(x: object) -> bool:
    return isinstance(x, LookaheadState)


def find_states(opt_state: optax.OptState) -> list[LookaheadState]:
    """The outermost LookaheadStates in ``opt_state`` (any pytree), in tree order.

    A lookahead nested inside another one's inner state is not listed: it is part of
    the outer one's ``inner_state``.
    """
    leaves = jax.tree.leaves(opt_state, is_leaf=is_lookahead_state)
    return [leaf for leaf in leaves if is_lookahead_state(leaf)]


def the_state(opt_state: optax.OptState, what: str = "opt_state", why: str = "") -> LookaheadState:
    """The one outermost LookaheadState in ``opt_state``; ValueError naming ``what`` if there
    is none or there are several (``why`` says what needs exactly one)."""
    states = find_states(opt_state)
    if len(states) != 1:
        found = (
            "none: pass the state of a transformation built with lookahead_optax.lookahead"
            if not states
            else f"{len(states)}"
        )
        raise ValueError(
            f"{what} must hold exactly one LookaheadState (the outermost), found {found}"
            + (f" ({why})" if why else "")
        )
    return states[0]


def replace_states(fn, opt_state: optax.OptState) -> optax.OptState:
    """``opt_state`` with every outermost LookaheadState ``s`` replaced by ``fn(s)``."""
    return jax.tree.map(
        lambda x: fn(x) if is_lookahead_state(x) else x, opt_state, is_leaf=is_lookahead_state
    )

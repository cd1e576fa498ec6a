"""One optimizer step as one fused program: the sync is decided before the update runs.

Three ways to run the decided step, all with the same numbers (up to an ulp):

- ``formulation="cond"`` (the default on every backend so far): a ``lax.cond`` around two
  whole steps. On XLA:CPU the cond is free; on XLA:GPU a ``conditional`` copies its
  predicate to the host and waits for the queued work on every execution (not measured
  yet: ``benchmarks/device.py``).
- ``formulation="select"``: both whole steps in one program and one select per leaf; no
  conditional, but every step computes both cases (and effects inside ``tx`` run twice).
  On XLA:CPU, with params and state donated, XLA copies the donated state first: 3.4x
  Adam's step at 256K params, 11x at 16M (benchmarks/device.py). For measuring, not use.
- ``sync=True/False``: the caller knows whether this step syncs (two executables chosen
  from Python, e.g. by :class:`~lookahead_optax.experimental.StaticSyncStep`, which owns
  the counter): no conditional and no extra read.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.extend
import jax.numpy as jnp
import optax
from jax import Array

from lookahead_optax._state import LookaheadState, find_states
from lookahead_optax._tree import is_inexact, is_masked, widened

Formulation = Literal["cond", "select"]
FORMULATIONS = ("cond", "select")
# The formulation update_and_apply uses when none is given, by jax.default_backend().
# Every backend gets "cond" until benchmarks/device.py has measured the others there: the
# CPU figures (benchmarks/RESULTS.md) are for "cond", and no GPU or TPU has been measured.
DEFAULT_FORMULATION: dict[str, Formulation] = {"cpu": "cond"}


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
        self.refused: str | None = None  # why the lookahead it was for could not take it
        self.seen = 0  # lookahead updates that received it (more than one: not fused)

    def take(self, count: Array, fragments: int = 1, overlap: int = 0) -> bool | None:
        """Called by a lookahead's update with its state's ``count``: the decided sync if
        this hint is for that state (and ``taken`` set), else None (decide as usual). A
        lookahead with several fragments or with overlap has no single sync decision: it
        records that in ``refused``, so that ``update_and_apply(sync=...)`` can say so."""
        self.seen += 1
        if count is not self.count:
            return None
        if fragments != 1:
            self.refused = (
                f"the lookahead has fragments={fragments}: its fragments sync at different "
                "steps, so there is no single sync decision to take"
            )
            return None
        if overlap:
            self.refused = (
                f"the lookahead has overlap={overlap}: a pseudo-gradient is sent and "
                "applied on different steps (as fragments > 1 sync on different steps), so "
                "there is no single sync decision to take"
            )
            return None
        self.taken = True
        return self.sync


jax.tree_util.register_pytree_node(
    SyncHint, lambda hint: ((hint.count,), hint.sync), lambda sync, c: SyncHint(c[0], sync)
)

HINT_KEY = "lookahead_sync"


def default_formulation(backend: str | None = None) -> Literal["cond", "select"]:
    """The formulation :func:`~lookahead_optax.update_and_apply` uses on ``backend``.

    Default backend: jax's default.

    Examples:
      >>> import lookahead_optax as lo
      >>> lo.experimental.default_formulation("cpu")
      'cond'
    """
    return DEFAULT_FORMULATION.get(backend or jax.default_backend(), "cond")


def update_and_apply(
    tx: optax.GradientTransformation,
    grads: optax.Updates,
    opt_state: optax.OptState,
    params: optax.Params,
    *,
    sync: bool | None = None,
    formulation: Literal["cond", "select"] | None = None,
    **extra_args,
) -> tuple[optax.Params, optax.OptState]:
    """``tx.update`` then ``optax.apply_updates``, faster when ``tx`` holds a lookahead.

    Returns what ``updates, opt_state = tx.update(grads, opt_state, params)``
    followed by ``optax.apply_updates(params, updates)`` returns, up to an
    ulp of rounding where XLA fuses the two programs differently (a
    multiply-add, a global norm's sum). The difference is speed: whether this
    step syncs is read from the lookahead's state first (``count + 1 ==
    period``), and a ``lax.cond`` then runs one of two whole steps, each
    compiled as one fused program with the apply.

    - A non-sync step is the inner optimizer's step: the slow weights are
      not read or written at all.
    - A sync step computes the inner update once, fused with the slow update
      and the apply, and runs a collective inside the inner optimizer (a
      global-norm clip under ``shard_map``) once, not twice.

    The decision reaches the lookahead as data: ``tx.update`` is called with
    the extra argument ``lookahead_sync``, a hint naming the state it was read
    from. The lookahead takes it only when it updates that very state in that
    very trace; effects inside ``tx`` run once per step.

    Which compositions take the fused path: ``tx`` must hold exactly one
    lookahead (nested ones count once: the outermost), reached through
    transformations that forward extra arguments and pass the state through
    unchanged: ``optax.chain``, ``named_chain``, ``inject_hyperparams``,
    ``apply_if_finite``, ``masked``, ``multi_transform``,
    ``partition``, ``conditionally_mask`` / ``conditionally_transform``. All
    others run exactly ``tx.update`` followed by ``optax.apply_updates``: no
    lookahead, several lookaheads, ``optax.MultiSteps`` (its ``lax.cond``
    passes the state as a new operand), a wrapper that drops extra arguments
    or calls ``update`` through its own ``jax.jit``.
    :func:`fused_path_taken` tells which one a ``tx`` gets. Under ``vmap``
    with a batched step count both branches run, as for any ``lax.cond``.

    ``tx.update`` alone cannot do this: it returns updates for the caller to
    apply, so its own sync is a ``lax.cond`` inside the step. Use this in a
    hand-written training step; Flax's ``TrainState`` and ``nnx.Optimizer``
    call ``tx.update`` themselves and get the usual path.

    Args:
      tx: Any optax transformation, e.g. ``lookahead(adam)`` or
        ``optax.chain(optax.clip_by_global_norm(1.0), lookahead(adam))``.
      grads: Gradients, with the structure of params.
      opt_state: ``tx``'s state.
      params: The current params.
      sync: ``None`` (default): decided on the device from the state, as above.
        ``True``/``False``: the caller knows statically whether this step syncs
        (jit with ``static_argnames=("sync",)``): the step is that one branch,
        with no conditional at all; two executables, chosen from Python. It must
        equal ``count + 1 >= period`` of the state (see :func:`next_call_syncs`);
        a wrong value syncs at the wrong step, and is not checked here (a check
        would slow every call's dispatch).
        :class:`~lookahead_optax.experimental.StaticSyncStep` owns the counter and checks
        every decision on the device. Requires the fused path
        (ValueError if not).
      formulation: How a decision made on the device is taken (``sync=None``):
        ``"cond"``, a ``lax.cond`` around two whole steps (only the taken one
        runs); ``"select"``, both whole steps and one select per leaf (no
        conditional, but both cases computed every step, effects in ``tx`` run
        twice, and on XLA:CPU copies of the donated state: several times
        slower there). Default: :func:`~lookahead_optax.experimental.default_formulation` of
        ``jax.default_backend()``, ``"cond"`` on every backend so far.
      **extra_args: Passed to ``tx.update`` (``value``, ``grad``, ...).

    Returns:
      ``(new_params, new_opt_state)``.

    Raises:
      ValueError: if ``sync`` is given and ``tx`` does not take the fused path,
        or ``formulation`` is not one of ``"cond"``, ``"select"``.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> import lookahead_optax as lo
      >>> tx = lo.lookahead(optax.sgd(0.1), k=2, alpha=0.5)
      >>> params = {"w": jnp.array([1.0, -2.0])}
      >>> opt_state = tx.init(params)
      >>> step = jax.jit(lambda p, s: lo.update_and_apply(tx, p, s, p))  # grads = p
      >>> for _ in range(2):
      ...     params, opt_state = step(params, opt_state)
      >>> params["w"]  # as in lookahead's example: half way back to the start
      Array([ 0.905, -1.81 ], dtype=float32)

      The same with the decision made in Python: one executable per value of ``sync``.

      >>> step = jax.jit(
      ...     lambda p, s, sync: lo.update_and_apply(tx, p, s, p, sync=sync),
      ...     static_argnames="sync",
      ... )
      >>> params = {"w": jnp.array([1.0, -2.0])}
      >>> opt_state = tx.init(params)
      >>> for n in range(2):
      ...     params, opt_state = step(params, opt_state, sync=n == 1)
      >>> params["w"]
      Array([ 0.905, -1.81 ], dtype=float32)
    """
    tx = optax.with_extra_args_support(tx)
    if HINT_KEY in extra_args:
        raise ValueError(f"{HINT_KEY!r} is reserved for update_and_apply's own use")
    if sync is not None and not isinstance(sync, bool):
        raise TypeError(
            "sync must be None or a Python bool known when tracing (jit the step with "
            f"static_argnames=('sync',)), got {sync!r}"
        )
    if formulation is None:
        formulation = default_formulation()
    if formulation not in FORMULATIONS:
        raise ValueError(f"formulation must be one of {FORMULATIONS}, got {formulation!r}")
    probe, synced_update = _probe(tx, grads, opt_state, params, **extra_args)
    if not probe.taken:
        if sync is not None:
            raise ValueError(_no_fused_path(probe, "update_and_apply(sync=...)"))
        updates, new_state = tx.update(grads, opt_state, params, **extra_args)
        return optax.apply_updates(params, updates), new_state
    (state,) = find_states(opt_state)

    def step(sync: bool) -> tuple[optax.Params, optax.OptState]:
        # The probe's trace, replayed: tx.update is traced once per case, not twice. Not under
        # jax.disable_jit, whose op-by-op arithmetic follows concrete values (jnp.power with a
        # concrete integer exponent multiplies) where the trace had tracers.
        if sync and not jax.config.values["jax_disable_jit"]:
            updates, new_state = synced_update()
        else:
            hint = {HINT_KEY: SyncHint(state.count, sync)}
            updates, new_state = tx.update(grads, opt_state, params, **extra_args, **hint)
        new_params = optax.apply_updates(params, updates)
        return (_land_on_slow(new_params, state, new_state) if sync else new_params), new_state

    decided = state.count + 1 >= state.period
    if sync is not None:
        # Not checked here: any check (even checkify.debug_check, an effect) would take jit's
        # fast dispatch path away from every step. StaticSyncStep checks on the device.
        return step(sync)
    if formulation == "select":
        synced, not_synced = step(True), step(False)
        return jax.tree.map(lambda a, b: jnp.where(decided, a, b), synced, not_synced)
    return jax.lax.cond(decided, lambda: step(True), lambda: step(False))


def fused_path_taken(
    tx: optax.GradientTransformation,
    grads: optax.Updates,
    opt_state: optax.OptState,
    params: optax.Params,
    **extra_args,
) -> bool:
    """Whether :func:`~lookahead_optax.update_and_apply` takes its fused path for these arguments.

    Traces ``tx.update`` once with ``jax.make_jaxpr``: nothing is computed and
    no effect runs.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> import lookahead_optax as lo
      >>> tx = optax.chain(optax.clip_by_global_norm(1.0), lo.lookahead(optax.adam(1e-3)))
      >>> params = {"w": jnp.ones(3)}
      >>> lo.fused_path_taken(tx, params, tx.init(params), params)
      True
      >>> ms = optax.MultiSteps(lo.lookahead(optax.adam(1e-3)), every_k_schedule=2)
      >>> lo.fused_path_taken(ms, params, ms.init(params), params)
      False
    """
    return _probe(tx, grads, opt_state, params, **extra_args)[0].taken


def _probe(tx, grads, opt_state, params, **extra_args) -> tuple[SyncHint, Callable[[], Any]]:
    """``tx.update`` traced once with a ``sync=True`` hint, into a jaxpr that computes
    nothing yet: the hint (``taken`` if the fused path is open, else ``refused`` may say
    why; None: no lookahead reached it), and a function that replays that update (the
    synced case) where it is called. Nothing of an unused trace reaches the program, so
    effects inside ``tx`` never run twice."""
    tx = optax.with_extra_args_support(tx)
    states = find_states(opt_state)
    if len(states) != 1:
        hint = SyncHint(jnp.zeros([], jnp.int32), True)  # for no state: never taken
        hint.refused = f"tx's state holds {len(states)} (outermost) lookahead states, not one"
        return hint, lambda: None
    hint = SyncHint(states[0].count, True)
    # Closed over, the caller's arrays (tracers under jit) become the jaxpr's constants.
    closed, shapes = jax.make_jaxpr(
        lambda: tx.update(grads, opt_state, params, **extra_args, **{HINT_KEY: hint}),
        return_shape=True,
    )()
    if hint.seen > 1:  # e.g. a wrapper that steps the lookahead twice per call
        hint.taken = False
        hint.refused = (
            f"tx steps the lookahead {hint.seen} times per call: one sync decision cannot "
            "cover them"
        )
    treedef = jax.tree.structure(shapes)
    return hint, lambda: jax.tree.unflatten(treedef, jax.extend.core.jaxpr_as_fun(closed)())


def _no_fused_path(probe: SyncHint, what: str) -> str:
    """Why ``what`` cannot run: the lookahead's own reason (fragments) or the wrappers'."""
    if probe.refused is not None and "fragments" in probe.refused:
        return (
            f"{what} needs a single sync decision per step, and {probe.refused}. With "
            "fragments > 1 use tx.update or update_and_apply(sync=None), which take the "
            "tx.update path (StaticSyncStep and offload=True are not available)"
        )
    reason = probe.refused or (
        "the lookahead did not receive the decision: a wrapper dropped the extra argument, "
        "changed its state (optax.MultiSteps) or called update behind its own jax.jit"
    )
    return (
        f"{what} needs the fused path: tx must hold exactly one lookahead reached through "
        f"wrappers that forward extra arguments (see fused_path_taken), and {reason}; this "
        "tx decides its syncs itself, so pass sync=None"
    )


def _land_on_slow(
    new_params: optax.Params, state: LookaheadState, new_opt_state: optax.OptState
) -> optax.Params:
    """After a sync, the params set to the slow weights exactly (cast to the params' dtype).

    ``p + (phi - p)`` is phi only up to rounding; here the step applies its own update, so it
    can land exactly. Only where the lookahead did sync (a wrapper such as
    ``apply_if_finite`` may have discarded the step) and where the lookahead's params are the
    step's params (same structure; a wrapper that reshapes params keeps the applied update).
    """
    (new,) = find_states(new_opt_state)
    if new.mixing:  # a sync lands on phi + mixing (theta - phi), as tx.update's update aims
        return new_params
    treedef: Any = jax.tree.structure(new.slow, is_leaf=is_masked)  # PyTreeDef: no stubs
    try:
        flat_params = treedef.flatten_up_to(new_params)
    except (ValueError, TypeError):
        return new_params
    flat_slow = treedef.flatten_up_to(new.slow)
    pairs = [(p, s) for p, s in zip(flat_params, flat_slow) if not is_masked(s) and is_inexact(p)]
    if any(jnp.shape(p)[jnp.ndim(p) - jnp.ndim(s) :] != jnp.shape(s) for p, s in pairs):
        return new_params
    # Synced on this call, and nothing stepped the lookahead after its sync (a wrapper that
    # steps it twice per call, or apply_if_finite that discarded the step, keeps its update).
    synced = (new.syncs != state.syncs) & (new.count == 0)

    def land(p: Any, s: Any) -> Any:
        if is_masked(s) or not is_inexact(p):
            return p
        target = jnp.broadcast_to(widened(s, p.dtype), jnp.shape(p))
        sharding = getattr(jax.typeof(p), "sharding", None)
        if any(getattr(sharding, "spec", None) or ()) and jax.typeof(target).sharding != sharding:
            # Explicit mesh: the broadcast worker axis is not sharded as p's; select needs it.
            target = jax.sharding.reshard(target, sharding)
        return jnp.where(synced, target, p)

    return treedef.unflatten([land(p, s) for p, s in zip(flat_params, flat_slow)])

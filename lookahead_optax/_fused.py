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

from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax

from lookahead_optax._hint import HINT_KEY, SyncHint, no_fused_path, probe
from lookahead_optax._state import LookaheadState, find_states
from lookahead_optax._tree import is_inexact, is_masked, widened

Formulation = Literal["cond", "select"]
FORMULATIONS = ("cond", "select")
# The formulation update_and_apply uses when none is given, by jax.default_backend().
# Every backend gets "cond" until benchmarks/device.py has measured the others there: the
# CPU figures (benchmarks/RESULTS.md) are for "cond", and no GPU or TPU has been measured.
DEFAULT_FORMULATION: dict[str, Formulation] = {"cpu": "cond"}


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
    hint, synced_update = probe(tx, grads, opt_state, params, **extra_args)
    if not hint.taken:
        if sync is not None:
            raise ValueError(no_fused_path(hint, "update_and_apply(sync=...)"))
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

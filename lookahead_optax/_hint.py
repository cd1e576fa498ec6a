"""How :func:`~lookahead_optax.update_and_apply` hands its sync decision to the lookahead in ``tx``.

The decision travels as an extra argument of ``tx.update`` (:class:`SyncHint` under
``HINT_KEY``), because that is what optax's wrappers (``chain``, ``inject_hyperparams``,
``apply_if_finite``, ``masked``) forward to the transformation they hold; an argument of an
internal update could not reach it through them. :func:`probe` traces ``tx.update`` once with
the hint and says whether a lookahead took it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.extend
import jax.numpy as jnp
import optax
from jax import Array

from lookahead_optax._state import find_states


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
    return probe(tx, grads, opt_state, params, **extra_args)[0].taken


def probe(tx, grads, opt_state, params, **extra_args) -> tuple[SyncHint, Callable[[], Any]]:
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


def no_fused_path(probe: SyncHint, what: str) -> str:
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

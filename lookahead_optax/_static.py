"""The sync decided in Python: :func:`next_call_syncs` (public) and, experimental, a
training step as two executables.

``StaticSyncStep`` owns the sync counter in Python and runs one of two compiled programs per
call (no conditional in either); with ``offload=True`` the slow weights and outer state live in
host memory between syncs. Exported by :mod:`lookahead_optax.experimental`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from lookahead_optax._state import LookaheadState, the_state


def _the_state(tree: Any, what: str) -> LookaheadState:
    return the_state(tree, what, "the sync is decided from its count and period")


def next_call_syncs(opt_state: optax.OptState) -> bool:
    """Whether the next ``update`` of this state syncs: ``count + 1 >= period``, read on the host.

    With ``fragments > 1``: whether it syncs any fragment (fragment j syncs at step
    ``max(1, (j + 1) period // fragments)`` of each cycle, the last at the end).

    A device-to-host read: it waits until the step that produced ``opt_state`` has
    finished, so a loop that calls it every step cannot run ahead of the device.
    :class:`~lookahead_optax.experimental.StaticSyncStep` reads it once and counts in
    Python after that.

    Raises:
      ValueError: if ``opt_state`` does not hold exactly one outermost LookaheadState.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> import lookahead_optax as lo
      >>> tx = lo.lookahead(optax.sgd(0.1), k=2)
      >>> params = {"w": jnp.ones(2)}
      >>> opt_state = tx.init(params)
      >>> lo.next_call_syncs(opt_state)
      False
      >>> params, opt_state = lo.update_and_apply(tx, params, opt_state, params, sync=False)
      >>> lo.next_call_syncs(opt_state)
      True
    """
    from lookahead_optax._steps import fragment_syncs
    from lookahead_optax._tree import fragment_trees, is_empty

    state = _the_state(opt_state, "opt_state")
    count, period = jax.device_get((state.count, state.period))
    fragments = int(getattr(state, "fragments", 1))
    syncs = fragment_syncs(jnp.asarray(int(count) + 1), jnp.asarray(int(period)), fragments)
    parts = fragment_trees(state.slow, fragments)  # an empty fragment's sync moves nothing
    return any(bool(s) and not is_empty(part) for s, part in zip(syncs, parts))


class StaticSyncStep:
    """A training step as two executables, the sync decided in Python: no conditional.

    ``fn(*args, sync, **kwargs)`` is your step; it passes ``sync`` (a Python bool) to
    :func:`~lookahead_optax.update_and_apply`. Calling this object runs ``fn`` jitted with
    ``sync`` static, so the program of a non-sync step is the inner optimizer's step and
    never reads the slow weights, and the sync step computes the inner update once. The
    counter lives in Python: ``count`` and ``period`` are read from the state once, at the
    first call (and at :meth:`resync`); from then on this object counts.

    A wrong decision cannot pass silently: every executable also computes, on the device,
    whether ``count + 1 >= period`` of the state it was given agreed with its ``sync``, and
    keeps a running "all agreed" flag (a scalar in and out of each call). At each sync the
    flag of the previous sync (k calls ago, finished by then unless the host is more than k
    steps ahead) is read, and :meth:`check` reads the latest; a disagreement raises
    ``RuntimeError``. It happens when the state changes behind this object's back: a ``k``
    changed under ``optax.inject_hyperparams``, a state restored from a checkpoint or
    stepped elsewhere. Call :meth:`resync` after such a change.

    With ``offload=True`` the lookahead's slow weights and outer state live in
    ``pinned_host`` memory (see :func:`lookahead_optax.experimental.offload_state`; moved
    there at the first call if needed): a non-sync step does not receive them at all, and the sync
    step, the only executable that touches them, moves them to the device, updates them
    and moves them back. The device then holds no more than the inner optimizer's state
    (plus three int32 counters). The state returned by a call holds the host arrays.

    Args:
      fn: The step, ``fn(*args, sync: bool, **kwargs)``. Exactly one outermost
        LookaheadState must be among its arguments, and with ``offload=True`` exactly
        one among its outputs (the new state).
      donate_argnums: Positional arguments of ``fn`` to donate (e.g. ``(0, 1)`` for
        params and state).
      offload: Keep the slow weights and outer state in host memory.
      check: Read the agreement flag at each sync (default). ``False``: only
        :meth:`check` reads it.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> import lookahead_optax as lo
      >>> tx = lo.lookahead(optax.sgd(0.1), k=2, alpha=0.5)
      >>> def train_step(params, opt_state, *, sync):
      ...     grads = params  # gradient of 0.5 * ||w||^2
      ...     return lo.update_and_apply(tx, grads, opt_state, params, sync=sync)
      >>> step = lo.experimental.StaticSyncStep(train_step, donate_argnums=(0, 1))
      >>> params = {"w": jnp.array([1.0, -2.0])}
      >>> opt_state = tx.init(params)
      >>> for _ in range(2):
      ...     params, opt_state = step(params, opt_state)
      >>> params["w"]  # as in lookahead's example
      Array([ 0.905, -1.81 ], dtype=float32)
      >>> step.check()  # every decision agreed with the state
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        donate_argnums: int | Sequence[int] = (),
        offload: bool = False,
        check: bool = True,
    ):
        if isinstance(donate_argnums, int):
            donate_argnums = (donate_argnums,)
        self.fn = fn
        self.donate_argnums = tuple(donate_argnums)
        self.offload = offload
        self.check_at_syncs = check
        self._jitted: dict[Any, Callable[..., Any]] = {}
        self._count: int | None = None
        self._period: int | None = None
        self._agreed = jnp.array(True)  # the running flag, a device scalar
        self._agreed_at_last_sync: jax.Array | None = None
        self.calls = 0  # calls so far

    # ---- the counter ----

    def resync(self, opt_state: optax.OptState) -> None:
        """Reads ``count`` and ``period`` from ``opt_state`` (a device-to-host read) and
        counts from there; first checks the decisions made so far."""
        self.check()
        state = _the_state(opt_state, "opt_state")
        count, period = jax.device_get((state.count, state.period))
        self._count, self._period = int(count), int(period)

    def next_call_syncs(self) -> bool | None:
        """Whether the next call syncs, from the Python counter (None before the first call)."""
        if self._count is None or self._period is None:
            return None
        return self._count + 1 >= self._period

    def check(self) -> None:
        """Raises ``RuntimeError`` if any call so far ran with a ``sync`` that disagreed with
        its state. Waits for the last call to finish."""
        self._raise_unless(self._agreed)

    def _raise_unless(self, agreed: jax.Array) -> None:
        if not bool(jax.device_get(agreed)):
            raise RuntimeError(
                "StaticSyncStep: a step ran with a sync that disagreed with the lookahead "
                "state (count + 1 >= period), so a sync happened at the wrong step. The "
                "state changed behind the step's back (k changed under inject_hyperparams, "
                "a restored or separately stepped state): call step.resync(opt_state) "
                "after such a change"
            )

    # ---- the call ----

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        sync = self._decide(args, kwargs)
        if sync and self.check_at_syncs and self._agreed_at_last_sync is not None:
            self._raise_unless(self._agreed_at_last_sync)
        program, args, kwargs, reattach = self._prepare(sync, args, kwargs)
        out, self._agreed = program(self._agreed, *args, **kwargs)
        out = reattach(out)
        self.calls += 1
        self._count = 0 if sync or self._count is None else self._count + 1
        if sync:
            self._agreed_at_last_sync = self._agreed
        return out

    def lower(self, sync: bool, *args: Any, **kwargs: Any) -> jax.stages.Lowered:
        """The executable this object runs for ``sync``, lowered for these arguments (for
        ``.compile().memory_analysis()`` or ``.as_text()``); runs nothing.

        Examples:
          >>> import jax.numpy as jnp, optax
          >>> import lookahead_optax as lo
          >>> tx = lo.lookahead(optax.sgd(0.1), k=2)
          >>> step = lo.experimental.StaticSyncStep(
          ...     lambda p, s, *, sync: lo.update_and_apply(tx, p, s, p, sync=sync)
          ... )
          >>> params = {"w": jnp.ones(2)}
          >>> "conditional" in step.lower(False, params, tx.init(params)).compile().as_text()
          False
        """
        program, args, kwargs, _ = self._prepare(sync, args, kwargs)
        return program.lower(self._agreed, *args, **kwargs)

    def _decide(self, args: tuple, kwargs: dict) -> bool:
        if self._count is None or self._period is None:
            self.resync((args, kwargs))
        assert self._count is not None and self._period is not None
        return self._count + 1 >= self._period

    def _prepare(self, sync: bool, args: tuple, kwargs: dict):
        """The program for ``sync``, its arguments, and what puts its outputs back together."""
        from lookahead_optax import _offload

        if not self.offload:
            return self._program(sync, None), args, kwargs, lambda out: out
        state = _the_state((args, kwargs), "the arguments")
        if not _offload.offloaded(state):
            args, kwargs = _offload.offload_state((args, kwargs))
            state = _the_state((args, kwargs), "the arguments")
        if sync:
            return self._program(sync, None), args, kwargs, lambda out: out
        stripped, host, key = _offload.split_host(state)
        args, kwargs = _offload.map_states(lambda _: stripped, (args, kwargs))

        def reattach(out):
            return _offload.map_states(lambda s: _offload.reattach(s, host, key), out)

        return self._program(sync, key), args, kwargs, reattach

    def _program(self, sync: bool, key: Any) -> Callable[..., Any]:
        cache_key = (sync, key)
        if cache_key not in self._jitted:
            self._jitted[cache_key] = jax.jit(
                self._traced(sync, key), donate_argnums=tuple(i + 1 for i in self.donate_argnums)
            )
        return self._jitted[cache_key]

    def _traced(self, sync: bool, key: Any) -> Callable[..., Any]:
        from lookahead_optax import _offload

        offload, fn = self.offload, self.fn

        def program(agreed, *args, **kwargs):
            if offload and sync:  # the only executable that touches the host arrays
                args, kwargs = _offload.map_states(
                    lambda s: s._replace(
                        **{
                            f: jax.tree.map(
                                lambda x: _offload.transfer(x, _offload.DEVICE), getattr(s, f)
                            )
                            for f in _offload.OFFLOADED_FIELDS
                        }
                    ),
                    (args, kwargs),
                )
            elif offload:  # zeros that nothing reads, dropped from the outputs below
                args, kwargs = _offload.map_states(
                    lambda s: _offload.placeholders(s, key), (args, kwargs)
                )
            state = _the_state((args, kwargs), "the arguments")
            agrees = (state.count + 1 >= state.period) == sync
            out = fn(*args, sync=sync, **kwargs)
            if offload:
                _the_state(out, "with offload=True, the step's outputs")
                if sync:
                    out = _offload.map_states(
                        lambda s: s._replace(
                            **{
                                f: jax.tree.map(
                                    lambda x: _offload.transfer(x, _offload.HOST), getattr(s, f)
                                )
                                for f in _offload.OFFLOADED_FIELDS
                            }
                        ),
                        out,
                    )
                else:
                    out = _offload.map_states(
                        lambda s: _offload.strip_to_device_leaves(s, key), out
                    )
            return out, agreed & agrees

        return program

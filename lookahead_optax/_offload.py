"""Slow weights (and an outer optimizer's state) in host memory: Lookahead's device cost zero.

The slow weights are read and written only at a sync, once every k steps. Kept in the
host's ``pinned_host`` memory, they cost no device memory; the sync step, a separate
executable chosen from Python (:class:`lookahead_optax.experimental.StaticSyncStep` with
``offload=True``), moves them in, updates them and moves them back, and no other step
touches them. They never enter a ``lax.cond``: XLA's host-offload pass does not handle
conditionals, which is why the sync cannot be decided on the device here.

Only the outermost lookahead's ``slow`` and ``outer_state`` move; its counters and the
inner optimizer's state stay on the device. Leaves of extended dtypes (PRNG keys) stay
too. Shardings are kept: only the memory kind changes.
"""

from __future__ import annotations

from typing import Any

import jax

from lookahead_optax._state import LookaheadState, find_states, replace_states

HOST = "pinned_host"
DEVICE = "device"
OFFLOADED_FIELDS = ("slow", "outer_state")


def memory_kinds_supported(device: jax.Device | None = None) -> bool:
    """Whether ``device`` (default: the first device) can hold arrays in ``pinned_host`` memory.

    On the CPU this also needs jax >= 0.10.2: measured with .ci/floors, jax 0.8.x keeps
    "offloaded" state in device memory without a word, and 0.9.0-0.10.1 abort the process
    in the offloaded sync, although their devices list a ``pinned_host`` memory.

    Examples:
      >>> import lookahead_optax as lo
      >>> isinstance(lo.experimental.memory_kinds_supported(), bool)
      True
    """
    device = device or jax.devices()[0]
    if device.platform == "cpu" and _jax_version() < (0, 10, 2):
        return False
    try:
        kinds = {memory.kind for memory in device.addressable_memories()}
    except Exception:  # a backend without memory spaces
        return False
    return HOST in kinds and DEVICE in kinds


def _jax_version() -> tuple[int, ...]:
    return tuple(int(part) for part in jax.__version__.split(".")[:3] if part.isdigit())


def offloadable(x: Any) -> bool:
    """Array leaves that move to the host: not PRNG keys (extended dtypes)."""
    return isinstance(x, jax.Array) and not jax.dtypes.issubdtype(x.dtype, jax.dtypes.extended)


def _with_kind(x: jax.Array, kind: str) -> jax.Array:
    """``x`` (a concrete array) in memory ``kind``, on the same devices with the same sharding."""
    if not offloadable(x) or x.sharding.memory_kind == kind:
        return x
    return jax.device_put(x, x.sharding.with_memory_kind(kind))


def transfer(x: Any, kind: str) -> Any:
    """Inside ``jit``: ``x`` moved to memory ``kind`` (the sharding is kept)."""
    if not (hasattr(x, "dtype") and not jax.dtypes.issubdtype(x.dtype, jax.dtypes.extended)):
        return x
    space = getattr(jax, "memory", None)
    if space is not None and hasattr(space, "Space"):
        target = space.Space.Host if kind == HOST else space.Space.Device
    else:  # older jax
        target = jax.sharding.TransferToMemoryKind(kind)  # type: ignore[attr-defined]
    return jax.device_put(x, target)


def map_states(fn, tree: Any) -> Any:
    """``tree`` with every outermost LookaheadState replaced by ``fn(state)``."""
    return replace_states(fn, tree)


def _move_state(opt_state: Any, kind: str) -> Any:
    if not find_states(opt_state):
        raise ValueError(
            "found no LookaheadState to move: pass the state of a transformation built with "
            "lookahead_optax.lookahead"
        )
    if kind == HOST and not memory_kinds_supported():
        raise ValueError(
            f"the default device ({jax.devices()[0]}) has no usable {HOST!r} memory, so the "
            "slow weights cannot be kept in host memory on this backend (on the CPU, offload "
            f"needs jax >= 0.10.2; this is {jax.__version__})"
        )

    def move(state: LookaheadState) -> LookaheadState:
        return state._replace(
            **{
                field: jax.tree.map(lambda x: _with_kind(x, kind), getattr(state, field))
                for field in OFFLOADED_FIELDS
            }
        )

    return map_states(move, opt_state)


def offload_state(opt_state: Any) -> Any:
    """``opt_state`` with the lookahead's slow weights and outer state in ``pinned_host`` memory.

    The outermost :class:`~lookahead_optax.LookaheadState` in ``opt_state`` (under
    ``optax.chain``, ``inject_hyperparams``, ...) keeps its structure; the leaves of its
    ``slow`` and ``outer_state`` move to the host (same devices, same sharding; PRNG keys
    stay). Train on with :class:`lookahead_optax.experimental.StaticSyncStep` and ``offload=True``,
    which moves them itself at its first call if they are not there yet; ``tx.update``
    and the device-decided :func:`lookahead_optax.update_and_apply` need them on the
    device (:func:`onload_state`).

    Raises:
      ValueError: if ``opt_state`` holds no LookaheadState, or the default device has
        no ``pinned_host`` memory (see :func:`memory_kinds_supported`).

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> import lookahead_optax as lo
      >>> tx = lo.lookahead(optax.adam(1e-3), k=5)
      >>> params = {"w": jnp.ones(3)}
      >>> opt_state = lo.experimental.offload_state(tx.init(params))
      >>> opt_state.slow["w"].sharding.memory_kind
      'pinned_host'
      >>> lo.experimental.onload_state(opt_state).slow["w"].sharding.memory_kind
      'device'
    """
    return _move_state(opt_state, HOST)


def onload_state(opt_state: Any) -> Any:
    """The inverse of :func:`offload_state`: the slow weights and outer state back on the device.

    See :func:`offload_state` for an example.
    """
    return _move_state(opt_state, DEVICE)


def offloaded(opt_state: Any) -> bool:
    """Whether every offloadable leaf of the slow weights and outer state is on the host."""
    for state in find_states(opt_state):
        for field in OFFLOADED_FIELDS:
            for x in jax.tree.leaves(getattr(state, field)):
                if offloadable(x) and x.sharding.memory_kind != HOST:
                    return False
    return True


def split_host(state: LookaheadState) -> tuple[LookaheadState, tuple, Any]:
    """The state without its host leaves, the host leaves, and the static key to rebuild it.

    The stripped state holds, for each offloaded field, the list of its leaves with None
    where a leaf is on the host; ``key`` holds the fields' treedefs and the host leaves'
    shapes and dtypes.
    """
    replaced, host, key = {}, [], []
    for field in OFFLOADED_FIELDS:
        leaves, treedef = jax.tree.flatten(getattr(state, field))
        on_host = [offloadable(x) and x.sharding.memory_kind == HOST for x in leaves]
        replaced[field] = [None if h else x for x, h in zip(leaves, on_host)]
        host.append([x if h else None for x, h in zip(leaves, on_host)])
        key.append(
            (treedef, tuple((x.shape, x.dtype) if h else None for x, h in zip(leaves, on_host)))
        )
    return state._replace(**replaced), tuple(host), tuple(key)


def placeholders(stripped: LookaheadState, key: tuple) -> LookaheadState:
    """Inside ``jit``: the stripped state, host leaves replaced by zeros that nothing reads.

    A non-sync step with a static ``sync=False`` never reads the slow weights or the
    outer state and returns them unchanged; the caller drops them from the outputs, so XLA
    removes the zeros.
    """
    import jax.numpy as jnp

    fields = {}
    for field, (treedef, avals) in zip(OFFLOADED_FIELDS, key):
        leaves = [
            jnp.zeros(aval[0], aval[1]) if aval is not None else x
            for x, aval in zip(getattr(stripped, field), avals)
        ]
        fields[field] = jax.tree.unflatten(treedef, leaves)
    return stripped._replace(**fields)


def reattach(stripped: LookaheadState, host: tuple, key: tuple) -> LookaheadState:
    """Outside ``jit``: the stripped state (its fields lists of device leaves) with the host
    leaves put back."""
    fields = {}
    for field, host_leaves, (treedef, _) in zip(OFFLOADED_FIELDS, host, key):
        device_leaves = getattr(stripped, field)
        fields[field] = jax.tree.unflatten(
            treedef, [h if h is not None else d for h, d in zip(host_leaves, device_leaves)]
        )
    return stripped._replace(**fields)


def strip_to_device_leaves(state: LookaheadState, key: tuple) -> LookaheadState:
    """Inside ``jit``, on the new state of a non-sync step: each offloaded field as the list
    of its device-resident leaves (None where the leaf lives on the host)."""
    fields = {}
    for field, (treedef, avals) in zip(OFFLOADED_FIELDS, key):
        leaves = jax.tree.leaves(getattr(state, field))
        fields[field] = [None if aval is not None else x for x, aval in zip(leaves, avals)]
    return state._replace(**fields)

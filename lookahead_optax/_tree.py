"""Leaf-level helpers: which leaves take part in a sync, their dtypes, and fragments."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax


def is_masked(x: Any) -> bool:
    return isinstance(x, optax.MaskedNode)


def is_inexact(x: Any) -> bool:
    """Floating or complex: the leaves Lookahead interpolates (Python floats included)."""
    if isinstance(x, (bool, np.bool_)):
        return False
    if isinstance(x, (float, complex)):
        return True
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)


def is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def floats_only(tree: Any) -> Any:
    """The floating leaves of ``tree``; the others become ``optax.MaskedNode`` (not synced)."""
    return jax.tree.map(lambda x: x if is_inexact(x) else optax.MaskedNode(), tree)


def promote(*dtypes: Any) -> Any:
    """Standard promotion, also under strict promotion (the casts that use it are explicit)."""
    with jax.numpy_dtype_promotion("standard"):
        return jnp.result_type(*dtypes)


def slow_dtype_for(leaf: Any, slow_dtype: Any) -> Any:
    """The slow weights' dtype for ``leaf``: ``slow_dtype``, complex where ``leaf`` is."""
    dtype = jnp.result_type(leaf)
    if slow_dtype is None:
        return dtype
    if jnp.issubdtype(dtype, jnp.complexfloating) and not jnp.issubdtype(
        slow_dtype, jnp.complexfloating
    ):
        return promote(slow_dtype, jnp.complex64)  # keep the imaginary part
    return slow_dtype


def widened(x: jax.Array, dtype: Any) -> jax.Array:
    """``x`` cast to the wider ``dtype`` with ``x``'s rounding kept.

    XLA may skip a rounding to a narrow float inside a fusion (``xla_allow_excess_precision``),
    so ``x.astype(f32)`` of a bf16 ``x`` computed in the same program can carry f32 digits
    the stored bf16 ``x`` does not have; ``reduce_precision`` is never skipped.
    """
    out = x.astype(dtype)
    if (
        jnp.issubdtype(x.dtype, jnp.floating)
        and jnp.issubdtype(out.dtype, jnp.floating)
        and jnp.finfo(x.dtype).bits < jnp.finfo(out.dtype).bits
    ):
        info = jnp.finfo(x.dtype)
        out = jax.lax.reduce_precision(out, exponent_bits=info.nexp, mantissa_bits=info.nmant)
    return out


def gated(x: Any, gate: jax.Array) -> Any:
    """``x`` where ``gate`` is True (always: only the data dependence on it matters)."""
    if not (hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.number)):
        return x  # e.g. PRNG keys: small, an extra copy of them costs nothing
    return jnp.where(gate, x, jnp.zeros([], x.dtype))


def match_types(new: Any, like: Any) -> Any:
    """``new``'s leaves cast to ``like``'s dtypes, so both branches of a ``lax.cond`` agree.

    A Python scalar in ``like`` (some optimizers keep one in their state) stands for an
    array of its natural dtype.
    """

    def match(n: Any, old: Any) -> Any:
        if is_key(old):
            return n
        return jax.lax.convert_element_type(n, jnp.asarray(old).dtype)

    return jax.tree.map(match, new, like)


def fragment_trees(tree: Any, fragments: int) -> list[Any]:
    """``tree``'s floating leaves split into ``fragments`` trees (``optax.MaskedNode`` elsewhere).

    One fragment is every floating leaf. Several are contiguous groups of non-empty leaves
    of about equal sizes, in tree order; a fragment may be empty (all masked).
    """
    if fragments == 1:
        return [floats_only(tree)]
    leaves, structure = jax.tree.flatten(tree)
    treedef: Any = structure  # PyTreeDef: no stubs
    sizes = [int(np.prod(np.shape(x))) if is_inexact(x) else 0 for x in leaves]
    total, start, owner = max(sum(sizes), 1), 0, []
    for size in sizes:
        owner.append(min(fragments - 1, int(fragments * (start + size / 2) / total)))
        start += size
    return [
        treedef.unflatten(
            [
                x if o == j and size else optax.MaskedNode()
                for x, o, size in zip(leaves, owner, sizes)
            ]
        )
        for j in range(fragments)
    ]


def is_empty(tree: Any) -> bool:
    """No leaf to sync (every leaf masked)."""
    return not jax.tree.leaves(tree)


def fragment_of(part: Any, tree: Any) -> Any:
    """``tree``'s entries where the fragment ``part`` has leaves, masked elsewhere."""
    return jax.tree.map(lambda s, x: s if is_masked(s) else x, part, tree, is_leaf=is_masked)


def merged(tree: Any, parts: Sequence[Any]) -> Any:
    """``tree`` with each leaf taken from the fragment that owns it (kept where none does)."""
    flat, structure = jax.tree.flatten(tree, is_leaf=is_masked)
    treedef: Any = structure  # PyTreeDef: no stubs
    flat_parts = [treedef.flatten_up_to(part) for part in parts]
    out = []
    for i, old in enumerate(flat):
        owners = [p[i] for p in flat_parts if not is_masked(p[i])]
        out.append(owners[0] if owners else old)
    return treedef.unflatten(out)

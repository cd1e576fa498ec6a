r"""The quantized exchange: the workers' mean of pseudo-gradients sent as int8 or fp8 blocks.

An all-reduce cannot sum int8 values without overflow, so the narrow type travels in an
all-to-all and an all-gather (the scheme torchft uses for its fp8 all-reduce):

1. Each worker w concatenates its fragment's pseudo-gradients (plus its error-feedback
   residual) into one float32 vector, pads it to N chunks of C values (N workers, C a
   multiple of the block size B) and quantizes every block of B values with its own
   float32 scale, ``max|x| / qmax`` (qmax 127 for int8, the largest finite value for fp8):
   ``q = round(x / scale)`` clipped to [-127, 127] (int8), or ``x / scale`` rounded to
   the fp8 type.
2. Reduce-scatter as an all-to-all: chunk c of every worker goes to worker c.
3. Worker c dequantizes the N copies of its chunk, sums them in float32 in worker order
   (0, 1, ..., N - 1), divides by N and requantizes the result blockwise.
4. All-gather of the requantized chunks and their scales; every worker dequantizes the
   whole vector: the same mean on every worker.

Wire bytes per sync and worker: ``2 (N - 1) / N`` of the padded vector at one byte per
value, plus the scales (4 bytes per B values), against ``2 (N - 1) / N x 4`` bytes per
value for a float32 ring all-reduce.

Error feedback (MuLoCo, arXiv 2505.23725): each worker keeps what its own quantization
(step 1) lost, ``x - dequantize(q)``, and adds it to its next pseudo-gradient. The
requantization of the summed chunk (step 3) is not fed back.

Where the worker axis lies: ``workers=N`` on one device (or an Explicit mesh that does not
shard it) runs the same arithmetic locally (the all-to-all is a transpose); on a mesh that
shards the worker axis the exchange is a ``shard_map`` over the mesh axis that does
(Explicit meshes say which; on an Auto mesh it is the mesh's first axis whose size
divides N); with ``axis_name`` it runs inside the user's ``shard_map``/``pmap``/``vmap``.
The arithmetic per value is the same in every case, so the results are equal bit for bit.
"""

from __future__ import annotations

import functools
import math
import operator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec

__all__ = ["is_quantized", "quantized_mean", "qmax", "layout"]

QUANTIZED_DTYPES = ("int8", "int4", "int2", "float8_e4m3fn", "float8_e5m2")


def is_quantized(dtype: Any) -> bool:
    """int8 or fp8: exchanged as quantized blocks with scales (``_comm``), not by a mean."""
    if dtype is None or isinstance(dtype, (jax.Array, np.ndarray, jax.core.Tracer)):
        return False
    try:
        return jnp.dtype(dtype).name in QUANTIZED_DTYPES
    except TypeError:
        return False


def bits(dtype: Any) -> int:
    """Bits per value on the wire: 8 for int8 and fp8, 4 for int4, 2 for int2."""
    return {"int4": 4, "int2": 2}.get(jnp.dtype(dtype).name, 8)


def is_integer(dtype: Any) -> bool:
    return jnp.issubdtype(jnp.dtype(dtype), jnp.integer)


def qmax(dtype: Any) -> float:
    """The largest magnitude a block is scaled to: 2**(bits - 1) - 1 for the integer types
    (127, 7, 1; symmetric, so int2 holds -1, 0, 1), the largest finite value for fp8."""
    if is_integer(dtype):
        return float(2 ** (bits(dtype) - 1) - 1)
    return float(jnp.finfo(jnp.dtype(dtype)).max)


def layout(total: int, workers: int, block: int, per_byte: int = 1) -> tuple[int, int]:
    """``(chunk, block)``: the values each worker owns, ``ceil(total / workers)`` rounded
    up to a whole number of blocks, and the block used: the ``ceil(chunk / block)``
    blocks of a chunk are made equal, at most ``block`` values each (rounded up to a
    multiple of ``per_byte``, the values packed in one byte), so padding is less than
    ``per_byte`` values per block (not up to a block per chunk)."""
    per_worker = max(1, math.ceil(total / workers))
    blocks = math.ceil(per_worker / max(1, int(block)))
    block = math.ceil(math.ceil(per_worker / blocks) / per_byte) * per_byte
    return blocks * block, block


def quantize(x: jax.Array, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """Blocks along the last axis of ``x`` (float32) to ``dtype``, with one float32 scale
    per block (the last axis dropped); an all-zero block has scale 1."""
    top = jnp.max(jnp.abs(x), axis=-1)
    scale = jnp.where(top > 0, top / jnp.float32(qmax(dtype)), jnp.float32(1.0))
    scaled = x / scale[..., None]
    if is_integer(dtype):  # int4 / int2 values are held as int8 until packed for the wire
        level = qmax(dtype)
        q = jnp.clip(jnp.round(scaled), -level, level).astype(jnp.int8)
    else:
        q = scaled.astype(dtype)
    return q, scale


def dequantize(q: jax.Array, scale: jax.Array) -> jax.Array:
    return q.astype(jnp.float32) * scale[..., None]


def _wire(q: jax.Array, dtype: Any) -> jax.Array:
    """What travels: int8 as it is; fp8 as its bytes (uint8: XLA:CPU widens fp8 collectives
    to f16 when it compiles them); int4 / int2 packed 2 / 4 to a byte along the last axis."""
    if not is_integer(dtype):
        return jax.lax.bitcast_convert_type(q, jnp.uint8)
    width = bits(dtype)
    if width == 8:
        return q
    per_byte = 8 // width
    u = (q.astype(jnp.int32) & (2**width - 1)).astype(jnp.uint8)
    u = u.reshape(q.shape[:-1] + (q.shape[-1] // per_byte, per_byte))
    shifts = jnp.arange(per_byte, dtype=jnp.uint8) * jnp.uint8(width)
    return jnp.sum(u << shifts, axis=-1, dtype=jnp.uint8)  # disjoint bits: the sum is an or


def _unwire(p: jax.Array, dtype: Any) -> jax.Array:
    if not is_integer(dtype):
        return jax.lax.bitcast_convert_type(p, dtype)
    width = bits(dtype)
    if width == 8:
        return p
    per_byte = 8 // width
    shifts = jnp.arange(per_byte, dtype=jnp.uint8) * jnp.uint8(width)
    v = ((p[..., None] >> shifts) & jnp.uint8(2**width - 1)).astype(jnp.int8)
    v = jnp.where(v >= 2 ** (width - 1), v - jnp.int8(2**width), v)  # sign
    return v.reshape(p.shape[:-1] + (p.shape[-1] * per_byte,))


def _reduce(
    q: jax.Array, scale: jax.Array, workers: int, dtype: Any
) -> tuple[jax.Array, jax.Array]:
    """Step 3 on ``(N, chunks, blocks, B)``: the workers' copies (axis 0) of some chunks,
    dequantized, summed in worker order, divided by N and requantized."""
    parts = [dequantize(q[w], scale[w]) for w in range(workers)]
    total = functools.reduce(operator.add, parts)
    return quantize(total / jnp.float32(workers), dtype)


def _exchange_local(q: jax.Array, scale: jax.Array, workers: int, dtype: Any) -> jax.Array:
    """Steps 2 to 4 with the worker axis whole here: ``q`` is ``(N, N, blocks, B)``
    (worker, chunk, ...), already what the all-to-all delivers; the all-gather nothing."""
    q2, s2 = _reduce(q, scale, workers, dtype)
    return dequantize(q2, s2).reshape(-1)


def _exchange_mesh(x, mesh, axis, workers, chunk, block, dtype, quantize_fn):
    """Steps 1 to 4 in a ``shard_map`` over the mesh axis ``axis`` that shards the worker
    axis of ``x`` (``(N, N * chunk)``): each device holds ``N / D`` workers."""

    def body(local):
        q, scale = quantize_fn(local)
        # All-to-all: chunk group d (N / D chunks) of every worker goes to device d.
        q = _unwire(jax.lax.all_to_all(_wire(q, dtype), axis, 1, 0, tiled=True), dtype)
        scale = jax.lax.all_to_all(scale, axis, 1, 0, tiled=True)
        q2, s2 = _reduce(q, scale, workers, dtype)  # (N/D, blocks, B): this device's chunks
        q2 = _unwire(jax.lax.all_gather(_wire(q2, dtype), axis, axis=0, tiled=True), dtype)
        s2 = jax.lax.all_gather(s2, axis, axis=0, tiled=True)
        return dequantize(q2, s2).reshape(-1)

    spec = PartitionSpec(axis)
    # The all-gathered mean is the same on every device; shard_map cannot infer that.
    return jax.shard_map(
        body, mesh=mesh, in_specs=spec, out_specs=PartitionSpec(), check_vma=False
    )(x)


def _worker_mesh_axis(x: jax.Array, workers: int) -> tuple[Any, Any] | None:
    """The mesh and mesh axis that shard the worker axis (0) of ``x``, or None where it
    lies whole on each device."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or mesh.empty or mesh.size == 1:
        return None
    types = set(mesh.axis_types)
    if types == {jax.sharding.AxisType.Explicit}:
        spec = getattr(sharding, "spec", None)
        if not spec or spec[0] is None:
            return None
        axis = spec[0]
        size = math.prod(mesh.shape[a] for a in (axis if isinstance(axis, tuple) else (axis,)))
        return (mesh, axis) if workers % size == 0 else None
    for name in mesh.axis_names:  # Auto: the first axis whose size divides N
        if mesh.shape[name] > 1 and workers % mesh.shape[name] == 0:
            return mesh, name
    return None


def quantized_mean(flat: list[Any], where: Any, residual: list[Any] | None) -> tuple[list, Any]:
    """The workers' mean of one fragment's pseudo-gradients, exchanged quantized.

    ``flat``: the fragment's leaves as ``_sync.average`` takes them (masked, a list with
    one entry per worker, stacked on a worker axis, or one worker's with ``axis_name``).
    ``residual``: error feedback, one float32 entry per leaf (per worker), or None.
    Returns the mean per leaf (in the leaf's dtype, no worker axis) and the new residual.
    """
    dtype = jnp.dtype(where.communication_dtype)
    live = [i for i, d in enumerate(flat) if optax.MaskedNode is not type(d)]
    out: list[Any] = list(flat)
    new_residual = None if residual is None else list(residual)
    if not live:
        return out, new_residual
    stacked = where.workers is not None
    leaves = [jnp.stack(flat[i]) if isinstance(flat[i], list) else flat[i] for i in live]
    lead = 1 if stacked else 0
    shapes = [leaf.shape[lead:] for leaf in leaves]
    dtypes = [leaf.dtype for leaf in leaves]
    sizes = [math.prod(s) for s in shapes]
    rows = []
    for j, leaf in enumerate(leaves):
        x = leaf.astype(jnp.float32).reshape((leaf.shape[0], -1) if stacked else (-1,))
        if residual is not None:
            x = x + residual[live[j]].reshape(x.shape)
        rows.append(x)
    x = jnp.concatenate(rows, axis=-1) if len(rows) > 1 else rows[0]
    total = sum(sizes)
    workers = where.workers if stacked else jax.lax.axis_size(where.axis_name)
    chunk, block = layout(total, workers, where.block, 8 // bits(dtype))
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, workers * chunk - total)])

    def quantize_fn(v):  # (..., N * chunk) -> (..., N, chunk / B, B)
        return quantize(v.reshape(v.shape[:-1] + (workers, chunk // block, block)), dtype)

    q, scale = quantize_fn(x)
    lost = x - dequantize(q, scale).reshape(x.shape) if residual is not None else None
    if not stacked:  # inside the user's shard_map / pmap / vmap over axis_name
        name = where.axis_name
        q = _unwire(jax.lax.all_to_all(_wire(q, dtype), name, 0, 0, tiled=True), dtype)
        scale = jax.lax.all_to_all(scale, name, 0, 0, tiled=True)
        q2, s2 = _reduce(q[:, None], scale[:, None], workers, dtype)
        q2 = _unwire(jax.lax.all_gather(_wire(q2[0], dtype), name, axis=0), dtype)
        s2 = jax.lax.all_gather(s2[0], name, axis=0)
        mean = dequantize(q2, s2).reshape(-1)
    else:
        placed = _worker_mesh_axis(leaves[0], workers)
        if placed is None:
            mean = _exchange_local(q, scale, workers, dtype)
        else:
            mean = _exchange_mesh(x, *placed, workers, chunk, block, dtype, quantize_fn)
    start = 0
    for j, i in enumerate(live):
        out[i] = mean[start : start + sizes[j]].reshape(shapes[j]).astype(dtypes[j])
        if lost is not None and new_residual is not None:
            piece = lost[..., start : start + sizes[j]]
            new_residual[i] = piece.reshape(((workers,) if stacked else ()) + shapes[j])
        start += sizes[j]
    return out, new_residual


def residual_init(params: Any, slow: Any) -> Any:
    """Zero error-feedback residuals: float32, shaped like params (worker axis included)
    where ``slow`` syncs, ``optax.MaskedNode`` elsewhere."""

    def zero(p: Any, s: Any) -> Any:
        if optax.MaskedNode is type(s) or not jnp.issubdtype(jnp.result_type(s), jnp.floating):
            return optax.MaskedNode()
        return jnp.zeros_like(p, jnp.float32)  # on an Explicit mesh, sharded as p

    return jax.tree.map(zero, params, slow)

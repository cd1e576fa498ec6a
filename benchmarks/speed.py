"""Step time, compile time and memory of Lookahead against its inner optimizer.

For each size (total float32 params split into equal leaves) and inner optimizer
(Adam, SGD with momentum), three jitted steps, params and state donated, synthetic
fixed gradients:

- ``inner``: ``inner.update`` + ``optax.apply_updates``;
- ``lookahead_optax``: the same with ``lookahead_optax.lookahead(inner)``;
- ``update_and_apply``: ``lookahead_optax.update_and_apply(lookahead(inner), ...)``, which
  decides the sync first and runs one fused program per case;
- ``optax.lookahead``: ``optax.lookahead(inner)`` with its ``LookaheadParams`` wrapping;
- ``inner+copy``: ``inner`` whose state also carries a params-sized copy it never touches:
  the cost of passing one more array per leaf through every call, which any Lookahead
  that keeps the slow weights as arrays shaped like the params pays before doing anything.

Timing: rounds interleaved (inner, lookahead_optax, optax.lookahead, inner, ...; the
order rotates), each timing a block of steps that is a multiple of k so every block
holds the same number of syncs; one ratio per round against the inner step of the
same round; the table shows the median and min-max across rounds. Also reported:
compile time (lower + compile) relative to the inner step, the compiled
``memory_analysis()`` temp size, the optimizer state's bytes, and how many
params-sized ``copy`` instructions the compiled HLO holds.

An end-to-end benchmark times forward, backward and update of a small Flax MLP on
synthetic data, with the same interleaving.

    python benchmarks/speed.py                # full suite, ~5-10 min on 2 CPU cores
    python benchmarks/speed.py --quick        # small sizes, a smoke run
    python benchmarks/speed.py --sizes 16M/8 --inners adam --rounds 21
    python benchmarks/speed.py --loop 4       # 4 sync periods per call: device time,
                                              # the per-call dispatch amortised away
    python benchmarks/speed.py --two-loop --before 4f29a95   # outer optimizers and workers

``--two-loop`` times the two-loop family at 16M/8 (``--sizes`` to change) through
``tx.update``: alpha, ``outer=`` SGD, heavy ball, Nesterov and Adam against Adam, and
``workers=4`` (alpha and Nesterov, statistics on and off) against Adam vmapped over the
4 workers. ``k`` reaches each lookahead as a traced scalar, so one executable serves
three cases, each block starting a cycle: every step a sync (k = 1), no sync
(k = 2**30), and the k-step mean (``--k``). Beside each: the compiled temp bytes, and
the bytes the sync step's and the non-sync step's instructions read and write (from the
HLO, in passes over the params: one pass = the params' bytes, all workers' for
workers) against the bound: the inner step's passes plus reading and writing the slow
weights and every params-shaped leaf of the outer state once. ``--before COMMIT`` adds
the same contenders built from the library at that commit (``git archive``, imported
under another name), timed in the same rounds.

Results go to ``benchmarks/results/speed-<platform>.json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _hlo import large_copies  # noqa: E402
from _timing import (  # noqa: E402
    interleaved_rounds,
    machine_info,
    ratio_summary,
    time_summary,
    tree_bytes,
)

import lookahead_optax as lo  # noqa: E402

CONTENDERS = (
    "inner",
    "lookahead_optax",
    "update_and_apply",
    "optax.lookahead",
    "inner+copy",
    "outer=sgd",
    "outer=nesterov",
    "outer=nesterov+fused",
)
OURS = ("lookahead_optax", "update_and_apply")
# The slow step as an optax outer optimizer: SGD(alpha) (what alpha is) and SNOO/DiLoCo's
# Nesterov step, through tx.update and (+fused) update_and_apply.
OUTERS = ("outer=sgd", "outer=nesterov", "outer=nesterov+fused")
FUSED = ("update_and_apply", "outer=nesterov+fused")
INNERS = {
    "adam": lambda: optax.adam(1e-4),
    "sgdm": lambda: optax.sgd(1e-4, momentum=0.9),
}


def parse_size(text: str) -> tuple[int, int]:
    """'16M/8' -> (16_000_000 params, 8 leaves)."""
    total, leaves = text.split("/")
    scale = {"K": 1_000, "M": 1_000_000}.get(total[-1].upper(), 1)
    number = float(total[:-1]) if scale > 1 else float(total)
    return int(number * scale), int(leaves)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default=None, help="TOTAL/LEAVES, comma separated")
    parser.add_argument("--inners", default="adam,sgdm", help=f"from {sorted(INNERS)}")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument(
        "--block-seconds",
        type=float,
        default=None,
        help="target seconds of one timed block (rounded up to a multiple of k steps)",
    )
    parser.add_argument(
        "--loop",
        type=int,
        default=0,
        help="run this many sync periods per call in a fori_loop (0: one step per call)",
    )
    parser.add_argument("--no-e2e", action="store_true", help="skip the end-to-end Flax MLP")
    parser.add_argument("--e2e-only", action="store_true")
    parser.add_argument("--e2e-batch", type=int, default=None)
    parser.add_argument("--e2e-width", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="small sizes and few rounds")
    parser.add_argument(
        "--two-loop", action="store_true", help="outer optimizers and workers (see above)"
    )
    parser.add_argument("--workers", type=int, default=4, help="workers of --two-loop")
    parser.add_argument(
        "--block-steps", type=int, default=2, help="--two-loop: sync periods per timed block"
    )
    parser.add_argument(
        "--before", default=None, help="--two-loop: also the library at this git commit"
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON path")
    args = parser.parse_args(argv)
    # Options given on the command line win over these defaults.
    defaults = dict(
        sizes="16M/8,2M/64", rounds=21, block_seconds=0.25, e2e_batch=512, e2e_width=1024
    )
    if args.two_loop:
        defaults.update(rounds=7)
    if args.quick:
        defaults.update(
            sizes="256K/8,64K/16", rounds=3, block_seconds=0.02, e2e_batch=32, e2e_width=64
        )
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


# ----------------------------------------------------------------------------- steps


def with_idle_copy(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """inner, its state extended by a copy of the params that every update passes through."""

    def init_fn(params):
        return inner.init(params), jax.tree.map(jnp.copy, params)

    def update_fn(updates, state, params=None):
        updates, inner_state = inner.update(updates, state[0], params)
        return updates, (inner_state, state[1])

    return optax.GradientTransformation(init_fn, update_fn)


def make_transform(name: str, inner: optax.GradientTransformation, k: int, alpha: float):
    if name == "inner":
        return inner
    if name == "inner+copy":
        return with_idle_copy(inner)
    if name in OURS:
        return lo.lookahead(inner, k=k, alpha=alpha)
    if name == "outer=sgd":
        return lo.lookahead(inner, k=k, outer=optax.sgd(alpha))
    if name in OUTERS:
        return lo.lookahead(inner, k=k, outer=optax.sgd(0.7, momentum=0.9, nesterov=True))
    return optax.lookahead(inner, sync_period=k, slow_step_size=alpha)


def wrap_params(name: str, params: Any) -> Any:
    """optax.lookahead keeps the slow weights in the params (LookaheadParams)."""
    if name == "optax.lookahead":
        # init_synced aliases fast and slow; separate buffers so both can be donated.
        return optax.LookaheadParams(fast=params, slow=jax.tree.map(jnp.copy, params))
    return params


def fast_of(params: Any) -> Any:
    return params.fast if isinstance(params, optax.LookaheadParams) else params


def apply_gradients(name: str, tx: optax.GradientTransformation, grads, opt_state, params):
    if name in FUSED:
        return lo.update_and_apply(tx, grads, opt_state, params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def optimizer_step(name: str, tx: optax.GradientTransformation):
    def step(params, opt_state, grads):
        return apply_gradients(name, tx, grads, opt_state, params)

    return step


def looped(step, steps: int):
    """``steps`` steps in one program (a fori_loop): one dispatch per ``steps`` steps."""
    if steps <= 1:
        return step

    def run(params, opt_state, *batch):
        def body(_, carry):
            return step(*carry, *batch)

        return jax.lax.fori_loop(0, steps, body, (params, opt_state))

    return run


def compile_step(step, *args, loop: int = 1) -> tuple[Any, dict[str, Any]]:
    """Compiles one step, params and state donated, for its statistics; returns the program
    to time (``loop`` steps per call) and the statistics."""
    start = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(*args).compile()
    compile_s = time.perf_counter() - start
    timed = compiled if loop <= 1 else jax.jit(looped(step, loop), donate_argnums=(0, 1))
    memory = compiled.memory_analysis()
    smallest_leaf = min(x.size for x in jax.tree.leaves(fast_of(args[0])))
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    stats = {
        "compile_s": compile_s,
        # XLA's static estimate; both branches of a cond are counted, as if every step synced.
        "bytes_accessed": float((cost or {}).get("bytes accessed", float("nan"))),
        "temp_bytes": int(memory.temp_size_in_bytes),
        "argument_bytes": int(memory.argument_size_in_bytes),
        "output_bytes": int(memory.output_size_in_bytes),
        "alias_bytes": int(memory.alias_size_in_bytes),
        "params_sized_copies": len(large_copies(compiled.as_text(), smallest_leaf)),
    }
    return timed, stats


class Runner:
    """Owns one contender's donated params and state; each call times a block of steps."""

    def __init__(self, compiled, params, opt_state, *batch, steps: int, per_call: int = 1):
        self.compiled, self.params, self.opt_state = compiled, params, opt_state
        self.batch, self.steps, self.per_call = batch, steps, max(per_call, 1)
        self.cpu_seconds: list[float] = []  # per step, one entry per timed block

    def run(self, steps: int) -> tuple[float, float]:
        """Wall-clock and process CPU seconds per step."""
        params, opt_state = self.params, self.opt_state
        jax.block_until_ready((params, opt_state))
        start, start_cpu = time.perf_counter(), time.process_time()
        for _ in range(steps // self.per_call):
            params, opt_state = self.compiled(params, opt_state, *self.batch)
        jax.block_until_ready((params, opt_state))
        self.params, self.opt_state = params, opt_state
        wall = (time.perf_counter() - start) / steps
        return wall, (time.process_time() - start_cpu) / steps

    def __call__(self) -> float:
        wall, cpu = self.run(self.steps)
        self.cpu_seconds.append(cpu)
        return wall


def steps_per_block(seconds_per_step: float, block_seconds: float, k: int) -> int:
    """At least one sync period, rounded up to whole periods so syncs amortise fairly."""
    periods = max(1, round(block_seconds / max(seconds_per_step, 1e-7) / k))
    return periods * k


def summarise(runners: dict[str, Runner], seconds, stats: dict[str, dict]) -> dict[str, Any]:
    inner_compile = stats["inner"]["compile_s"]
    cpu = {name: runner.cpu_seconds for name, runner in runners.items()}
    return {
        "time": {name: time_summary(s) for name, s in seconds.items()},
        "ratio_vs_inner": {
            name: ratio_summary(seconds[name], seconds["inner"])
            for name in seconds
            if name != "inner"
        },
        # CPU time of this process (all its threads): time spent waiting for other
        # processes on a shared machine does not count, so it is far less noisy.
        "cpu_ratio_vs_inner": {
            name: ratio_summary(cpu[name], cpu["inner"]) for name in cpu if name != "inner"
        },
        # The least disturbed block of each contender: a second, less noisy estimate.
        "ratio_of_fastest_blocks": {
            name: min(seconds[name]) / min(seconds["inner"]) for name in seconds if name != "inner"
        },
        # > 1: ours is that many times faster per step than optax.lookahead.
        "speedup_vs_optax_lookahead": {
            name: ratio_summary(seconds["optax.lookahead"], seconds[name]) for name in OURS
        },
        "cpu_speedup_vs_optax_lookahead": {
            name: ratio_summary(cpu["optax.lookahead"], cpu[name]) for name in OURS
        },
        "compile_ratio_vs_inner": {
            name: s["compile_s"] / inner_compile for name, s in stats.items() if name != "inner"
        },
        "stats": stats,
    }


# ------------------------------------------------------------------ optimizer steps


def time_interleaved(runners, stats, args, progress) -> tuple[dict[str, Any], int]:
    """Warms every runner up, sizes the timed blocks on the inner step, times interleaved rounds."""
    unit = args.k * max(args.loop, 1)  # whole sync periods, whole calls
    for runner in runners.values():
        runner.run(unit)  # warm up
    steps = steps_per_block(runners["inner"].run(unit)[0], args.block_seconds, unit)
    for runner in runners.values():
        runner.steps = steps
    seconds = interleaved_rounds(runners, args.rounds, progress)
    return summarise(runners, seconds, stats), steps


def bench_optimizer(total: int, leaves: int, inner_name: str, args, progress) -> dict[str, Any]:
    per_leaf = total // leaves
    params = {
        f"w{i:02d}": jnp.full((per_leaf,), 0.01 * (i + 1), jnp.float32) for i in range(leaves)
    }
    grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params)
    params_bytes = tree_bytes(params)
    runners, stats = {}, {}
    for name in CONTENDERS:
        tx = make_transform(name, INNERS[inner_name](), args.k, args.alpha)
        wrapped = wrap_params(name, jax.tree.map(jnp.copy, params))
        opt_state = tx.init(wrapped)
        compiled, stats[name] = compile_step(
            optimizer_step(name, tx), wrapped, opt_state, grads, loop=args.loop * args.k
        )
        # optax.lookahead holds its slow weights in the params, not in the state.
        extra_params = tree_bytes(wrapped) - params_bytes
        stats[name]["state_bytes"] = tree_bytes(opt_state) + extra_params
        runners[name] = Runner(
            compiled, wrapped, opt_state, grads, steps=args.k, per_call=args.loop * args.k
        )
    result, steps = time_interleaved(runners, stats, args, progress)
    result.update(
        kind="optimizer_step",
        inner=inner_name,
        params=per_leaf * leaves,
        leaves=leaves,
        params_bytes=params_bytes,
        steps_per_block=steps,
    )
    return result


# ------------------------------------------------------------------------ end to end


def bench_end_to_end(args, progress) -> dict[str, Any]:
    import flax.linen as nn

    class MLP(nn.Module):
        width: int

        @nn.compact
        def __call__(self, x):
            for _ in range(2):
                x = nn.relu(nn.Dense(self.width)(x))
            return nn.Dense(10)(x)

    model = MLP(args.e2e_width)
    key_x, key_y, key_init = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(key_x, (args.e2e_batch, 784), jnp.float32)
    y = jax.random.randint(key_y, (args.e2e_batch,), 0, 10)
    params = model.init(key_init, x[:1])["params"]

    def loss_fn(fast, x, y):
        logits = model.apply({"params": fast}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def train_step(name, tx):
        def step(params, opt_state, x, y):
            grads = jax.grad(loss_fn)(fast_of(params), x, y)
            return apply_gradients(name, tx, grads, opt_state, params)

        return step

    runners, stats = {}, {}
    for name in CONTENDERS:
        tx = make_transform(name, INNERS["adam"](), args.k, args.alpha)
        wrapped = wrap_params(name, jax.tree.map(jnp.copy, params))
        opt_state = tx.init(wrapped)
        compiled, stats[name] = compile_step(
            train_step(name, tx), wrapped, opt_state, x, y, loop=args.loop * args.k
        )
        runners[name] = Runner(
            compiled, wrapped, opt_state, x, y, steps=args.k, per_call=args.loop * args.k
        )
    result, steps = time_interleaved(runners, stats, args, progress)
    result.update(
        kind="end_to_end",
        inner="adam",
        model=f"MLP 784-{args.e2e_width}-{args.e2e_width}-10",
        batch=args.e2e_batch,
        params=sum(p.size for p in jax.tree.leaves(params)),
        leaves=len(jax.tree.leaves(params)),
        params_bytes=tree_bytes(params),
        steps_per_block=steps,
    )
    return result


# ------------------------------------------------- two-loop: outer optimizers, workers


def library_at(commit: str) -> Any:
    """The lookahead_optax package of ``commit``, imported as ``lookahead_optax_before``."""
    import importlib
    import re
    import subprocess
    import tempfile

    root = Path(__file__).resolve().parent.parent
    archive = subprocess.run(
        ["git", "-C", str(root), "archive", commit, "lookahead_optax"],
        capture_output=True,
        check=True,
    ).stdout
    dest = Path(tempfile.mkdtemp(prefix="lookahead_before_"))
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    package = dest / "lookahead_optax_before"
    (dest / "lookahead_optax").rename(package)
    for path in package.rglob("*.py"):
        text = re.sub(r"\blookahead_optax\b", "lookahead_optax_before", path.read_text())
        path.write_text(text)
    sys.path.insert(0, str(dest))
    return importlib.import_module("lookahead_optax_before")


def two_loop_contenders(workers: int) -> dict[str, dict[str, dict[str, Any]]]:
    """Group -> contender -> lookahead keyword arguments (callables: built per call)."""

    def nesterov():
        return optax.sgd(0.7, momentum=0.9, nesterov=True)

    return {
        "single": {
            "alpha": {},
            "outer=sgd": dict(outer=lambda: optax.sgd(0.5)),
            "heavy ball": dict(outer=lambda: optax.sgd(0.7, momentum=0.9)),
            "nesterov": dict(outer=nesterov),
            "outer=adam": dict(outer=lambda: optax.adam(0.1)),
            # The sync decided before the step: no cond inside it, the inner update once.
            "nesterov, update_and_apply": dict(outer=nesterov, entry="update_and_apply"),
            "outer=adam, update_and_apply": dict(
                outer=lambda: optax.adam(0.1), entry="update_and_apply"
            ),
        },
        "workers": {
            # sync_stats=False is the default since 0.4.0 (before: always computed).
            "workers alpha": dict(workers=workers),
            "workers alpha, sync_stats": dict(workers=workers, sync_stats=True),
            "workers nesterov": dict(workers=workers, outer=nesterov),
            "workers nesterov, sync_stats": dict(workers=workers, outer=nesterov, sync_stats=True),
        },
    }


def vmapped(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """``inner`` on every worker: vmapped over the leading axis of params, grads, state."""
    return optax.GradientTransformation(jax.vmap(inner.init), jax.vmap(inner.update))


def step_traffic(hlo: str, min_bytes: int) -> dict[str, float]:
    """Bytes read and written by the non-sync step (the program with the lighter branch of
    its busiest conditional: nothing for ``tx.update``'s pass-through, the whole inner step
    for ``update_and_apply``'s) and the sync step (with the heavier one), from the compiled
    HLO (benchmarks/_hlo.py)."""
    from _hlo import branches, computations, entry, sync_branch_traffic, traffic

    module = computations(hlo)
    base = traffic(module[entry(hlo)], min_bytes, module)
    try:
        branch = sync_branch_traffic(hlo, min_bytes)
    except ValueError:  # no conditional: the inner step
        branch = {"read": 0, "written": 0}
    light = 0
    for group in branches(module[entry(hlo)]):
        moved = [sum(traffic(module[name], min_bytes, module)[key] for key in ("read", "written"))
                 for name in group if name in module]  # fmt: skip
        if moved and max(moved) == branch["read"] + branch["written"]:
            light = min(moved)
    return {
        "non-sync": base["read"] + base["written"] + light,
        "sync": base["read"] + base["written"] + branch["read"] + branch["written"],
        "sync_branch_read": branch["read"],
        "sync_branch_written": branch["written"],
    }


class TwoLoopRunner:
    """One contender's donated params and state and its one executable (k traced)."""

    def __init__(self, make_tx, params, grads, lookahead: bool, fused=None):
        """``fused``: a library's ``update_and_apply`` to step with instead of ``tx.update``
        and ``apply_updates``."""
        self.make_tx, self.grads, self.lookahead = make_tx, grads, lookahead
        self.params = jax.tree.map(jnp.copy, params)
        self.opt_state = make_tx(5).init(self.params)

        def step(params, opt_state, grads, k):
            if fused is not None:
                return fused(make_tx(k), grads, opt_state, params)
            updates, opt_state = make_tx(k).update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        start = time.perf_counter()
        lowered = jax.jit(step, donate_argnums=(0, 1)).lower(
            self.params, self.opt_state, grads, jnp.int32(5)
        )
        self.compiled = lowered.compile()
        self.compile_s = time.perf_counter() - start
        self.cpu_seconds: dict[int, list[float]] = {}

    def run(self, k: int, steps: int) -> float:
        """Seconds per step of a block of ``steps`` steps that starts a cycle of length k."""
        if self.lookahead:
            self.opt_state = self.opt_state._replace(
                count=jnp.zeros([], jnp.int32), period=jnp.asarray(k, jnp.int32)
            )
        params, opt_state, kk = self.params, self.opt_state, jnp.int32(k)
        jax.block_until_ready((params, opt_state))
        start, start_cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
            params, opt_state = self.compiled(params, opt_state, self.grads, kk)
        jax.block_until_ready((params, opt_state))
        self.params, self.opt_state = params, opt_state
        self.cpu_seconds.setdefault(k, []).append((time.process_time() - start_cpu) / steps)
        return (time.perf_counter() - start) / steps


def bench_two_loop_group(group, contenders, libraries, total, leaves, args, progress, mesh=None):
    """Interleaved rounds of one group (single / workers) against its inner step.

    ``mesh``: the workers' params sharded over its "workers" axis (every program traced
    under it), else on the default device.
    """
    import contextlib

    workers = args.workers if group == "workers" else None
    per_leaf = total // leaves
    shape = (per_leaf,) if workers is None else (workers, per_leaf // workers)
    params = {f"w{i:02d}": jnp.full(shape, 0.01 * (i + 1), jnp.float32) for i in range(leaves)}
    if mesh is not None:
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("workers"))
        params = jax.device_put(params, sharding)
    tracing = jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()
    with tracing:
        return _bench_two_loop_group(
            group, contenders, libraries, params, workers, total, leaves, args, progress
        )


def _bench_two_loop_group(group, contenders, libraries, params, workers, total, leaves, args,
                          progress):  # fmt: skip
    grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params)
    params_bytes = tree_bytes(params)
    min_bytes = min(x.nbytes for x in jax.tree.leaves(params)) // (workers or 1)
    inner_name = "adam" if workers is None else f"vmap(adam) over {workers}"

    def inner_tx(k):
        return optax.adam(1e-4) if workers is None else vmapped(optax.adam(1e-4))

    runners = {inner_name: TwoLoopRunner(inner_tx, params, grads, lookahead=False)}
    for label, lib in libraries.items():
        for name, kwargs in contenders.items():
            if lib is not lo and "sync_stats" in kwargs:
                continue  # no such option before

            def make_tx(k, lib=lib, kwargs=kwargs):
                built = {key: v() if callable(v) else v for key, v in kwargs.items()}
                built.pop("entry", None)
                return lib.lookahead(optax.adam(1e-4), k=k, **built)

            key = name if lib is lo else f"{name} ({label})"
            fused = lib.update_and_apply if kwargs.get("entry") == "update_and_apply" else None
            runners[key] = TwoLoopRunner(make_tx, params, grads, lookahead=True, fused=fused)
    cases = {"sync step": 1, "non-sync step": 2**30, f"k={args.k} mean": args.k}
    steps = args.block_steps * args.k
    for runner in runners.values():  # warm up every case
        for k in cases.values():
            runner.run(k, args.k)
    seconds: dict[str, dict[str, list[float]]] = {name: {} for name in runners}
    names = list(runners)
    for r in range(args.rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            for case, k in cases.items() if name != inner_name else [("step", args.k)]:
                seconds[name].setdefault(case, []).append(runners[name].run(k, steps))
                progress.update(1)
    inner = seconds[inner_name]["step"]
    inner_cpu = runners[inner_name].cpu_seconds[args.k][1:]  # after the warm-up block
    inner_traffic = step_traffic(runners[inner_name].compiled.as_text(), min_bytes)["non-sync"]
    slow_bytes = params_bytes // (workers or 1)
    result = {
        "group": group,
        "mesh": None if mesh_of(params) is None else str(mesh_of(params)),
        "inner": inner_name,
        "params": total,
        "leaves": leaves,
        "params_bytes": params_bytes,
        "steps_per_block": steps,
        "inner_step_s": time_summary(inner),
        "inner_passes": inner_traffic / params_bytes,
        "contenders": {},
    }
    for name, runner in runners.items():
        if name == inner_name:
            continue
        traffic = step_traffic(runner.compiled.as_text(), min_bytes)
        outer_state = runner.opt_state.outer_state
        outer_bytes = sum(x.nbytes for x in jax.tree.leaves(outer_state) if x.nbytes >= min_bytes)
        bound_sync = inner_traffic + 2 * slow_bytes + 2 * outer_bytes
        entry = {
            "compile_s": runner.compile_s,
            "temp_bytes": int(runner.compiled.memory_analysis().temp_size_in_bytes),
            "temp_vs_params": runner.compiled.memory_analysis().temp_size_in_bytes / params_bytes,
            "passes": {
                "sync": traffic["sync"] / params_bytes,
                "non-sync": traffic["non-sync"] / params_bytes,
                "sync_branch_read": traffic["sync_branch_read"] / params_bytes,
                "sync_branch_written": traffic["sync_branch_written"] / params_bytes,
                "bound_sync": bound_sync / params_bytes,
                "bound_non_sync": inner_traffic / params_bytes,
            },
            "cases": {},
        }
        for case, k in cases.items():
            cpu = runner.cpu_seconds[k][1:]  # after the warm-up block
            entry["cases"][case] = {
                "time": time_summary(seconds[name][case]),
                "ratio_vs_inner": ratio_summary(seconds[name][case], inner),
                "cpu_ratio_vs_inner": ratio_summary(cpu, inner_cpu),
            }
        result["contenders"][name] = entry
    return result


def mesh_of(params: Any) -> Any:
    sharding = getattr(jax.tree.leaves(params)[0], "sharding", None)
    return getattr(sharding, "mesh", None)


def format_two_loop(results: list[dict[str, Any]], k: int) -> str:
    def ratio(r):
        return f"{r['median']:.2f}x ({r['min']:.2f}-{r['max']:.2f})"

    lines = [
        f"| contender | inner step | k={k} mean / inner | sync step / inner | non-sync / inner "
        "| CPU time k-mean | temp (x params) | sync step passes (bound) | non-sync passes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        inner = f"{r['inner']} {r['inner_step_s']['median_s'] * 1e3:.1f} ms"
        for name, c in r["contenders"].items():
            cases = c["cases"]
            passes = c["passes"]
            lines.append(
                f"| {name} | {inner} | {ratio(cases[f'k={k} mean']['ratio_vs_inner'])} "
                f"| {ratio(cases['sync step']['ratio_vs_inner'])} "
                f"| {ratio(cases['non-sync step']['ratio_vs_inner'])} "
                f"| {cases[f'k={k} mean']['cpu_ratio_vs_inner']['median']:.2f}x "
                f"| {c['temp_vs_params']:.2f} "
                f"| {passes['sync']:.2f} ({passes['bound_sync']:.2f}) "
                f"| {passes['non-sync']:.2f} ({passes['bound_non_sync']:.2f}) |"
            )
    return "\n".join(lines)


def two_loop_main(args) -> dict[str, Any]:
    import os

    info = machine_info()
    sizes = args.sizes if args.sizes != "16M/8,2M/64" else "16M/8"
    total, leaves = parse_size(sizes.split(",")[0])
    libraries = {"after": lo}
    if args.before:
        libraries[f"before {args.before}"] = library_at(args.before)
    groups = two_loop_contenders(args.workers)
    load_before = os.getloadavg()
    results = []
    count = sum(len(g) * len(libraries) * 3 + 1 for g in groups.values()) * args.rounds
    with tqdm(total=count, desc="two-loop", unit="block") as progress:
        for group, contenders in groups.items():
            results.append(
                bench_two_loop_group(group, contenders, libraries, total, leaves, args, progress)
            )
    report = {
        "machine": info,
        "command": "python benchmarks/speed.py " + " ".join(sys.argv[1:]),
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "config": {
            "k": args.k,
            "rounds": args.rounds,
            "block_steps": args.block_steps * args.k,
            "workers": args.workers,
            "before": args.before,
        },
        "results": results,
    }
    out = args.out or (
        Path(__file__).resolve().parent / "results" / f"speed-two-loop-{info['platform']}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    table = format_two_loop(results, args.k)
    out.with_suffix(".md").write_text(
        f"`{report['command']}`\n\njax {info['jax']}, {info['cpu']} ({info['cpu_cores']} cores), "
        f"load average {load_before[0]:.1f} before, {report['load_average']['after'][0]:.1f} "
        f"after; {args.rounds} rounds, medians (min-max) of per-round ratios.\n\n{table}\n"
    )
    print(table)
    print(f"wrote {out}")
    return report


# -------------------------------------------------------------------------- report


def format_table(results: list[dict[str, Any]]) -> str:
    def ratio(r):
        return f"{r['median']:.2f}x ({r['min']:.2f}-{r['max']:.2f})"

    lines = [
        "| benchmark | inner | params/leaves | inner step "
        "| lookahead_optax / inner | CPU time | update_and_apply / inner | CPU time "
        "| optax.lookahead / inner | speed-up vs optax.lookahead (ours: tx.update, fused) "
        "| inner+copy / inner "
        "| extra temp (x params) | compile ratio | params-sized copies |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        stats = r["stats"]
        params_bytes = r.get("params_bytes") or 4 * r["params"]
        extra_temp = max(stats[name]["temp_bytes"] for name in OURS) - stats["inner"]["temp_bytes"]
        speedups = r["speedup_vs_optax_lookahead"]
        where = "step" if r["kind"] == "optimizer_step" else "train step"
        lines.append(
            f"| {where} | {r['inner']} | {r['params'] / 1e6:.2g}M/{r['leaves']} "
            f"| {r['time']['inner']['median_s'] * 1e3:.2f} ms "
            + "".join(
                f"| {ratio(r['ratio_vs_inner'][name])} "
                f"| {r['cpu_ratio_vs_inner'][name]['median']:.2f}x "
                for name in OURS
            )
            + f"| {ratio(r['ratio_vs_inner']['optax.lookahead'])} "
            f"| {speedups['lookahead_optax']['median']:.2f}x, "
            f"{speedups['update_and_apply']['median']:.2f}x "
            f"| {ratio(r['ratio_vs_inner']['inner+copy'])} "
            f"| {extra_temp / params_bytes:+.4f} "
            f"| {max(r['compile_ratio_vs_inner'][name] for name in OURS):.2f}x "
            f"| {max(stats[name]['params_sized_copies'] for name in OURS)} |"
        )
    lines += [
        "",
        "Outer optimizers (k-step mean, ratio to the inner step; state in x params beyond the "
        "inner state):",
        "",
        "| benchmark | inner | params/leaves | lookahead_optax (alpha) "
        + "".join(f"| {name} " for name in OUTERS)
        + "| state: alpha | state: outer=nesterov |",
        "|---|---|---|---" + "|---" * len(OUTERS) + "|---|---|",
    ]
    for r in results:
        stats = r["stats"]
        params_bytes = r.get("params_bytes") or 4 * r["params"]
        where = "step" if r["kind"] == "optimizer_step" else "train step"

        def extra_state(name, stats=stats, params_bytes=params_bytes):
            if "state_bytes" not in stats[name]:
                return "-"  # the end-to-end benchmark does not record it
            extra = stats[name]["state_bytes"] - stats["inner"]["state_bytes"]
            return f"{extra / params_bytes:.2f}"

        lines.append(
            f"| {where} | {r['inner']} | {r['params'] / 1e6:.2g}M/{r['leaves']} "
            f"| {ratio(r['ratio_vs_inner']['lookahead_optax'])} "
            + "".join(f"| {ratio(r['ratio_vs_inner'][name])} " for name in OUTERS)
            + f"| {extra_state('lookahead_optax')} | {extra_state('outer=nesterov')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.two_loop:
        return two_loop_main(args)
    info = machine_info()
    configs = (
        []
        if args.e2e_only
        else [
            (parse_size(size), inner)
            for size in args.sizes.split(",")
            for inner in args.inners.split(",")
        ]
    )
    for _, inner in configs:
        if inner not in INNERS:
            raise ValueError(f"--inners must be from {sorted(INNERS)}, got {inner!r}")
    with_e2e = args.e2e_only or not args.no_e2e
    total = (len(configs) + with_e2e) * args.rounds * len(CONTENDERS)
    results = []
    with tqdm(total=total, desc="timing", unit="block") as progress:
        for (size, leaves), inner in configs:
            progress.set_postfix_str(f"{size / 1e6:g}M/{leaves} {inner}")
            results.append(bench_optimizer(size, leaves, inner, args, progress))
        if with_e2e:
            progress.set_postfix_str("end to end")
            results.append(bench_end_to_end(args, progress))
    report = {
        "machine": info,
        "config": {
            "k": args.k,
            "alpha": args.alpha,
            "rounds": args.rounds,
            "block_seconds": args.block_seconds,
            "quick": args.quick,
            "contenders": list(CONTENDERS),
            "loop": args.loop,
        },
        "results": results,
    }
    out = args.out or (
        Path(__file__).resolve().parent
        / "results"
        / f"speed-{info['platform']}{'-quick' if args.quick else ''}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"jax {info['jax']}, optax {info['optax']}, {info['device']} x{info['device_count']}, "
        f"{info['cpu']} ({info['cpu_cores']} cores); k={args.k}, {args.rounds} rounds"
    )
    print(format_table(results))
    compile_ratios = [r["compile_ratio_vs_inner"]["lookahead_optax"] for r in results]
    print(f"median compile ratio: {statistics.median(compile_ratios):.2f}x")
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()

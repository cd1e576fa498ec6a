"""This tree's lookahead against an earlier release's, side by side in one process.

The earlier package is taken from git (``git archive REF lookahead_optax``, default
``23f6617``: the 0.3.0 release) into a temporary directory under another module name,
``lookahead_optax_ref``, so both versions are imported at once. Three comparisons:

1. **Time.** ``tx.update`` + ``optax.apply_updates`` and ``update_and_apply``, params
   and state donated, synthetic fixed gradients, float32 params (``--sizes``, default
   16M/8 and 2M/64, and 64K/4 where the per-call cost outside the compiled program
   shows), Adam and SGD-momentum inners, k = 5. Both versions' steps are timed
   in interleaved rounds (the order rotates), each round timing a block of whole sync
   periods; one ratio ``this / REF`` per round, reported as median and min-max.
2. **Compiled temp memory** of each timed step (``jax.jit(step, donate_argnums=(0, 1))
   .lower(...).compile().memory_analysis().temp_size_in_bytes``), both versions.
3. **Trajectories.** Configurations spanning the conformance matrix's axes (the slow step,
   an alpha schedule, the inner-state policy, a float32 slow dtype under bfloat16 params,
   fragments, workers with ``replicate``, ``axis_name`` under ``vmap``,
   ``inject_hyperparams``, the entry point, an int leaf), each run 3 cycles from the same
   seeded params with both versions; the gradients are a seeded function of each
   version's own params (a quadratic per worker plus noise), so a difference carries
   into the following steps as in training. After every call the params, the slow
   weights (``slow_params``) and every leaf of the optimizer state (matched by key path:
   0.3.0's ``LookaheadState`` is a NamedTuple, this tree's a registered dataclass with the
   same key paths) are compared bit for bit; a difference is given in ulps of the leaf's
   dtype (integers: their difference), with the leaf and the first call it shows. Each
   configuration also runs in lockstep (every call, both versions step from this tree's
   params, so a difference shows at the call that makes it) and op by op (lockstep under
   ``jax.disable_jit``: no XLA fusion, so what still differs differs in arithmetic). A
   configuration expected to differ names the 0.4.0 changes (CHANGELOG.md) that explain
   it, and :func:`unexplained` checks that they do; a difference they do not explain is
   flagged ``UNEXPLAINED``.

    python benchmarks/before_after.py                   # against 0.3.0 (23f6617)
    python benchmarks/before_after.py --quick           # small sizes, a smoke run
    python benchmarks/before_after.py --ref 9693e0a --trajectories none   # 0.2.0

Results: printed, and written to ``--out`` (default ``runs/before_after.json``) and, with
``--md``, as a Markdown report.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import inspect
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import interleaved_rounds, machine_info, ratio_summary  # noqa: E402
from speed import Runner, compile_step, parse_size, steps_per_block  # noqa: E402

import lookahead_optax as lo  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
INNERS = {"adam": lambda: optax.adam(1e-4), "sgdm": lambda: optax.sgd(1e-4, momentum=0.9)}
PATHS = ("tx.update", "update_and_apply")


def import_ref(ref: str, where: Path):
    """The package at git ``ref``, importable as ``lookahead_optax_ref``."""
    archive = subprocess.run(
        ["git", "archive", ref, "lookahead_optax"], cwd=ROOT, check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(where)], input=archive, check=True)
    package = where / "lookahead_optax_ref"
    (where / "lookahead_optax").rename(package)
    for path in package.glob("*.py"):  # `from lookahead_optax import _checks` and dotted names
        path.write_text(re.sub(r"\blookahead_optax\b", "lookahead_optax_ref", path.read_text()))
    sys.path.insert(0, str(where))
    return importlib.import_module("lookahead_optax_ref")


# ------------------------------------------------------------------ time and temp memory


def step_fn(library, tx, fused: bool):
    def step(params, opt_state, grads):
        if fused:
            return library.update_and_apply(tx, grads, opt_state, params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return step


def pytree_cost(ref_lib, repeats: int = 7, number: int = 2000) -> dict:
    """Microseconds to flatten and unflatten a lookahead(adam) state (4 leaves), each version:
    a jitted call does both, outside the compiled program (0.3.0's LookaheadState is a
    NamedTuple, flattened by jax's C++; this tree's a dataclass with Python callbacks)."""
    params = {f"w{i}": jnp.zeros((4,)) for i in range(4)}
    out = {}
    for version, library in (("this", lo), ("ref", ref_lib)):
        state = library.lookahead(optax.adam(1e-4), k=5, alpha=0.5).init(params)
        leaves, treedef = jax.tree.flatten(state)
        identity = jax.jit(lambda s: s)
        identity(state)
        out[version] = {
            name: 1e6 * min(timeit.repeat(fn, number=number, repeat=repeats)) / number
            for name, fn in (
                ("flatten_us", lambda s=state: jax.tree.flatten(s)),
                ("unflatten_us", lambda t=treedef, x=leaves: jax.tree.unflatten(t, x)),
                ("jit_identity_us", lambda f=identity, s=state: f(s)),
            )
        }
    return out


def bench(total, leaves, inner_name, ref_lib, args):
    """Per path: the ratio this/ref of interleaved rounds, and both versions' temp bytes."""
    per_leaf = total // leaves
    params = {f"w{i:02d}": jnp.full((per_leaf,), 0.01 * (i + 1)) for i in range(leaves)}
    grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params)
    runners, temp = {}, {}
    for version, library in (("this", lo), ("ref", ref_lib)):
        for fused, path in zip((False, True), PATHS):
            tx = library.lookahead(INNERS[inner_name](), k=args.k, alpha=0.5)
            state = tx.init(jax.tree.map(jnp.copy, params))
            compiled, stats = compile_step(
                step_fn(library, tx, fused), jax.tree.map(jnp.copy, params), state, grads, loop=0
            )
            temp.setdefault(path, {})[version] = stats["temp_bytes"]
            runners[f"{version}/{path}"] = Runner(
                compiled, jax.tree.map(jnp.copy, params), state, grads, steps=args.k
            )
    seconds_per_step = min(runner.run(args.k)[0] for runner in runners.values())
    steps = steps_per_block(seconds_per_step, args.block_seconds, args.k)
    for runner in runners.values():
        runner.steps = steps
    seconds = interleaved_rounds(runners, args.rounds)
    ratios = {
        path: ratio_summary(seconds[f"this/{path}"], seconds[f"ref/{path}"]) for path in PATHS
    }
    # Process CPU time per step, the same rounds: time spent waiting for other processes on
    # a shared machine does not count.
    cpu = {
        path: ratio_summary(runners[f"this/{path}"].cpu_seconds, runners[f"ref/{path}"].cpu_seconds)
        for path in PATHS
    }
    params_bytes = per_leaf * leaves * 4
    # Median microseconds per step of each version (absolute: drifts with the load).
    step_us = {
        path: {v: 1e6 * statistics.median(seconds[f"{v}/{path}"]) for v in ("ref", "this")}
        for path in PATHS
    }
    return (
        ratios,
        cpu,
        step_us,
        {
            path: {**temp[path], "params_bytes": params_bytes, "steps_per_block": steps}
            for path in PATHS
        },
    )


# ------------------------------------------------------------------------- trajectories

SHAPES = {"a": (257,), "b": (16, 24), "c": (3, 5, 7)}
CYCLES = 3
FIXES = {  # the 0.4.0 changes (CHANGELOG.md) that change numbers, by key
    "landing": (
        "0.4.0 'update_and_apply lands exactly on the slow weights' (params set to phi in "
        "their dtype; 0.3.0 applied p + (phi - p), exact only where phi/2 <= p <= 2 phi)"
    ),
    "bf16_aim": (
        "0.4.0 'tx.update aims at phi as the params' dtype holds it': with bf16 params and "
        "f32 slow weights the update is round(phi) - p (0.3.0: phi - p rounded to bf16)"
    ),
    "worker_mean": (
        "0.4.0 'worker means accumulate in float32 from values rounded to "
        "communication_dtype', rounded once (0.3.0 summed and divided in bf16)"
    ),
    "slow_int": (
        "0.4.0 fix 'slow_params with workers=N returns the current value (worker 0's) of "
        "int leaves' (0.3.0: their initial value)"
    ),
    "xla": (
        "no change of the arithmetic: op by op (jax.disable_jit) both versions agree bit for "
        "bit; jitted, the restructured sync of stacked workers (0.4.0's worker mean: a sum of "
        "the workers' slices fused with the pseudo-gradient) compiles to other fusions, and "
        "XLA:CPU contracts a * b + c to fused multiply-adds inside a fusion, so the rounding "
        "differs by a few ulps at the sync (axis_name's pmean path, not restructured, is "
        "bit-identical jitted)"
    ),
}
# What each change may make differ when both versions run op by op from the same inputs
# (the eager mode): anything else that differs there is a change no entry explains.
CHANGES_OP_BY_OP = {
    "landing": {"params"},
    "bf16_aim": {"params"},
    "worker_mean": {"params", "slow", "state"},
    "slow_int": {"slow"},
    "xla": set(),
}


@dataclasses.dataclass(frozen=True)
class Traj:
    """One trajectory configuration: lookahead's options, the setup around it, and the 0.4.0
    change expected to make it differ from 0.3.0 (None: expected bit-identical)."""

    name: str
    options: dict = dataclasses.field(default_factory=dict)
    entry: str = "update"  # "update": tx.update + apply_updates; "fused": update_and_apply
    workers: int | None = None  # stacked workers (lo.replicate)
    axis: bool = False  # axis_name="workers" under vmap over `workers` (2) workers
    bf16: bool = False  # bfloat16 params (with slow_dtype=float32)
    int_leaf: bool = False  # an int32 leaf in params (its grads pass through the inner)
    inject: bool = False  # optax.inject_hyperparams(lookahead) with k and alpha injected
    inner: str = "adam"
    k: int = 3
    expect: tuple[str, ...] = ()  # keys of FIXES

    @property
    def num_workers(self) -> int:
        return 2 if self.axis else (self.workers or 1)

    @property
    def calls(self) -> int:
        return CYCLES * self.k


def _is_float(x) -> bool:
    return jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)


def _inner(cfg: Traj):
    inner = {
        "adam": lambda: optax.adam(3e-2),
        "sgdm": lambda: optax.sgd(3e-2, momentum=0.9),
    }[cfg.inner]()
    if cfg.int_leaf:
        # Adam on the floating leaves; the int leaf's grads pass through as its updates.
        inner = optax.masked(inner, lambda p: jax.tree.map(_is_float, p))
    return inner


NESTEROV = dict(outer=optax.sgd(0.7, momentum=0.9, nesterov=True))
BF16 = dict(slow_dtype="float32")
TRAJECTORIES = [
    Traj("alpha", dict(alpha=0.5)),
    Traj("alpha fused", dict(alpha=0.5), entry="fused", expect=("landing",)),
    Traj("alpha sgdm", dict(alpha=0.5), inner="sgdm"),
    Traj("outer sgd", dict(outer=optax.sgd(0.5))),
    Traj("outer nesterov", NESTEROV),
    Traj("outer nesterov fused", NESTEROV, entry="fused", expect=("landing",)),
    Traj("outer adam", dict(outer=optax.adam(0.1))),
    Traj("alpha schedule", dict(alpha=optax.linear_schedule(0.8, 0.4, 2))),
    Traj("adaptive alpha", dict(alpha="adaptive")),
    Traj("inner_state reset", dict(alpha=0.5, inner_state="reset")),
    Traj("inner_state pullback", dict(alpha=0.5, inner_state="pullback")),
    Traj(
        "inner_state pullback fused",
        dict(alpha=0.5, inner_state="pullback"),
        entry="fused",
        expect=("landing",),
    ),
    Traj("bf16 params f32 slow", dict(alpha=0.5, **BF16), bf16=True, expect=("bf16_aim",)),
    Traj(
        "bf16 params f32 slow fused",
        dict(alpha=0.5, **BF16),
        bf16=True,
        entry="fused",
        expect=("landing",),
    ),
    Traj(
        "bf16 params f32 slow nesterov", dict(**BF16, **NESTEROV), bf16=True, expect=("bf16_aim",)
    ),
    Traj("fragments=2", dict(alpha=0.5, fragments=2), k=4),
    Traj("fragments=2 nesterov fused", dict(fragments=2, **NESTEROV), k=4, entry="fused"),
    Traj("workers=2", dict(alpha=0.5), workers=2, expect=("xla",)),
    Traj("workers=2 nesterov", NESTEROV, workers=2, expect=("xla",)),
    Traj("workers=2 fused", dict(alpha=0.5), workers=2, entry="fused", expect=("landing", "xla")),
    Traj("workers=2 nesterov fused", NESTEROV, workers=2, entry="fused", expect=("landing", "xla")),
    Traj("workers=2 fragments=2", dict(alpha=0.5, fragments=2), workers=2, k=4, expect=("xla",)),
    Traj("workers=3", dict(alpha=0.5), workers=3, expect=("xla",)),
    Traj(
        "workers=2 comm bf16",
        dict(alpha=0.5, communication_dtype="bfloat16"),
        workers=2,
        expect=("worker_mean",),
    ),
    Traj(
        "workers=3 comm bf16",
        dict(alpha=0.5, communication_dtype="bfloat16"),
        workers=3,
        expect=("worker_mean",),
    ),
    Traj("axis_name vmap", dict(alpha=0.5), axis=True),
    Traj("axis_name vmap nesterov fused", NESTEROV, axis=True, entry="fused", expect=("landing",)),
    Traj("inject_hyperparams", dict(alpha=0.5), inject=True),
    Traj(
        "inject_hyperparams fused", dict(alpha=0.5), inject=True, entry="fused", expect=("landing",)
    ),
    Traj("int leaf", dict(alpha=0.5), int_leaf=True),
    Traj(
        "int leaf workers=2", dict(alpha=0.5), int_leaf=True, workers=2, expect=("slow_int", "xla")
    ),
    Traj(
        "int leaf workers=2 fused",
        dict(alpha=0.5),
        int_leaf=True,
        workers=2,
        entry="fused",
        expect=("landing", "slow_int", "xla"),
    ),
]
QUICK_TRAJECTORIES = ("alpha fused", "workers=2 nesterov fused")


class Problem:
    """Seeded params and a seeded gradient rule: worker w's gradient at p on call t is
    ``c * (p - target_w) + noise_tw`` (float64, rounded to p's dtype); an int leaf's is 1."""

    def __init__(self, cfg: Traj, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.cfg, workers = cfg, cfg.num_workers
        self.dtype = jnp.bfloat16 if cfg.bf16 else jnp.float32
        self.start = {n: rng.normal(size=s) for n, s in SHAPES.items()}
        self.curvature = {n: rng.uniform(0.5, 2.0, s) for n, s in SHAPES.items()}
        self.target = {n: rng.normal(size=(workers, *s)) for n, s in SHAPES.items()}
        self.noise = {n: 0.3 * rng.normal(size=(cfg.calls, workers, *s)) for n, s in SHAPES.items()}

    def params0(self) -> dict:
        params = {n: jnp.asarray(v, self.dtype) for n, v in self.start.items()}
        if self.cfg.int_leaf:
            params["n"] = jnp.asarray([3, -4, 0, 7], jnp.int32)
        return params

    def grads(self, params: dict, call: int) -> dict:
        stacked = self.cfg.num_workers > 1
        out = {}
        for name, p in params.items():
            if name == "n":
                out[name] = jnp.ones_like(p)
                continue
            x = np.asarray(p, np.float64)
            target, noise = self.target[name], self.noise[name][call]
            if not stacked:
                target, noise = target[0], noise[0]
            out[name] = jnp.asarray(self.curvature[name] * (x - target) + noise, p.dtype)
        return out


def build(library, cfg: Traj, problem: Problem, jit: bool = True):
    """The transformation's init, its step and slow_params for ``library`` (jitted unless
    ``jit`` is False: for op-by-op runs under ``jax.disable_jit``)."""
    kwargs: dict[str, Any] = dict(k=cfg.k, **cfg.options)
    if "slow_dtype" in kwargs:
        kwargs["slow_dtype"] = jnp.dtype(kwargs["slow_dtype"])
    if "communication_dtype" in kwargs:
        kwargs["communication_dtype"] = jnp.dtype(kwargs["communication_dtype"])
    if kwargs.get("alpha") == "adaptive":
        curvature = {n: jnp.asarray(c, jnp.float32) for n, c in problem.curvature.items()}
        kwargs["alpha"] = library.adaptive_alpha(0.1, curvature=curvature)
    if cfg.axis:
        kwargs["axis_name"] = "workers"
    elif cfg.workers:
        kwargs["workers"] = cfg.workers
    parameters = inspect.signature(library.lookahead).parameters
    if (cfg.axis or cfg.workers) and "sync_stats" in parameters:
        kwargs["sync_stats"] = True  # 0.4.0's default is off; 0.3.0 always computed them
    if cfg.inject:
        static = tuple(set(parameters) - {"k", "alpha"})
        tx = optax.inject_hyperparams(library.lookahead, static_args=static)(_inner(cfg), **kwargs)
    else:
        tx = library.lookahead(_inner(cfg), **kwargs)

    def one(params, opt_state, grads):
        if cfg.entry == "fused":
            return library.update_and_apply(tx, grads, opt_state, params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    vmapped = (lambda f: jax.vmap(f, axis_name="workers")) if cfg.axis else (lambda f: f)
    compiled = jax.jit if jit else (lambda f: f)
    return (
        vmapped(tx.init),
        compiled(vmapped(one)),
        compiled(jax.vmap(library.slow_params) if cfg.axis else library.slow_params),
    )


def leaves_by_path(tree) -> dict[str, np.ndarray]:
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if leaf is None:
            continue
        if jnp.issubdtype(jnp.asarray(leaf).dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        out[jax.tree_util.keystr(path)] = np.asarray(leaf)
    return out


def _ordered(x: np.ndarray) -> np.ndarray:
    """Floats as integers in the floats' order: adjacent floats differ by 1 (-0.0 == 0.0)."""
    bits = {2: np.int16, 4: np.int32, 8: np.int64}[x.dtype.itemsize]
    i = x.view(bits).astype(np.int64)
    return np.where(i < 0, np.iinfo(bits).min - i, i)


def difference(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(ulps, absolute) largest difference of two arrays of one dtype and shape; NaN == NaN;
    inf ulps where one is NaN and the other is not. Integers and bools: their difference."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return float("inf"), float("inf")
    if a.size == 0:
        return 0.0, 0.0
    if np.iscomplexobj(a):
        parts = [difference(f(a), f(b)) for f in (np.real, np.imag)]
        return max(p[0] for p in parts), max(p[1] for p in parts)
    if jnp.issubdtype(a.dtype, jnp.floating):
        nan_a, nan_b = np.isnan(a.astype(np.float32)), np.isnan(b.astype(np.float32))
        if (nan_a != nan_b).any():
            return float("inf"), float("inf")
        keep = ~nan_a
        ulps = np.abs(_ordered(a) - _ordered(b))[keep]
        absolute = np.abs(a.astype(np.float64) - b.astype(np.float64))[keep]
        return float(ulps.max(initial=0)), float(absolute.max(initial=0))
    d = float(np.abs(a.astype(np.int64) - b.astype(np.int64)).max())
    return d, d


class Tally:
    """The differences of one kind of tree (params, slow, state) over the calls: the first
    (call, leaf, ulps) and the largest."""

    def __init__(self):
        self.first: dict | None = None
        self.max = {"ulps": 0.0, "abs": 0.0, "leaf": None, "call": None}
        self.calls, self.only_this, self.only_ref = [], set(), set()

    def add(self, call: int, this: dict, ref: dict) -> None:
        self.only_this |= set(this) - set(ref)
        self.only_ref |= set(ref) - set(this)
        differs = False
        for path in sorted(set(this) & set(ref)):
            ulps, absolute = difference(this[path], ref[path])
            if ulps > 0:
                differs = True
                if self.first is None:
                    self.first = {"call": call, "leaf": path, "ulps": ulps}
                if ulps > self.max["ulps"]:
                    self.max = {"ulps": ulps, "abs": absolute, "leaf": path, "call": call}
        if differs:
            self.calls.append(call)

    def summary(self) -> dict:
        return {
            "identical": self.first is None and not self.only_this and not self.only_ref,
            "max": self.max,
            "first": self.first,
            "calls": self.calls,
            "only_this": sorted(self.only_this),
            "only_ref": sorted(self.only_ref),
        }


def landing_ulps(params: dict, slow: dict) -> float:
    """The largest distance, in ulps of the params' dtype, from params to the slow weights
    (rounded to the params' dtype; broadcast over a worker axis): 0 after an exact landing."""
    out = 0.0
    for path, p in params.items():
        s = slow.get(path)
        if s is None or not jnp.issubdtype(p.dtype, jnp.floating):
            continue
        target = np.broadcast_to(np.asarray(jnp.asarray(s).astype(p.dtype)), p.shape)
        out = max(out, difference(p, np.ascontiguousarray(target))[0])
    return out


MODES = ("free", "lockstep", "eager")


def run_pair(cfg: Traj, ref_lib, mode: str) -> dict:
    """Both versions from the same start. ``free``: each follows its own trajectory.
    ``lockstep``: every call, both step from this tree's params (and the gradients there),
    each with its own state, so a difference shows at the call that makes it instead of
    carrying into the params of later calls. ``eager``: lockstep, op by op
    (``jax.disable_jit``): no XLA fusion, so no fused multiply-adds that the jitted
    programs' arrangements place differently."""
    with jax.disable_jit() if mode == "eager" else contextlib.nullcontext():
        return _run_pair(cfg, ref_lib, lockstep=mode != "free", jit=mode != "eager")


def _run_pair(cfg: Traj, ref_lib, lockstep: bool, jit: bool) -> dict:
    problem = Problem(cfg)
    runs = {}
    for version, library in (("this", lo), ("ref", ref_lib)):
        init, step, slow_of = build(library, cfg, problem, jit)
        params = problem.params0()
        if cfg.num_workers > 1:
            params = library.replicate(params, cfg.num_workers)
        runs[version] = [step, slow_of, params, init(params)]
    tallies = {"params": Tally(), "slow": Tally(), "state": Tally()}
    landing = {"this": 0.0, "ref": 0.0}
    syncs_by_call = cfg.options.get("fragments") is None
    for call in range(cfg.calls):
        seen = {}
        shared = runs["this"][2]
        for version, run in runs.items():
            step, slow_of, params, state = run
            if lockstep:
                params = shared
            params, state = step(params, state, problem.grads(params, call))
            run[2:] = [params, state]
            seen[version] = {
                "params": leaves_by_path(params),
                "slow": leaves_by_path(slow_of(state, params)),
                "state": leaves_by_path(state),
            }
            if syncs_by_call and call % cfg.k == cfg.k - 1:
                where = landing_ulps(seen[version]["params"], seen[version]["slow"])
                landing[version] = max(landing[version], where)
        for kind, tally in tallies.items():
            tally.add(call, seen["this"][kind], seen["ref"][kind])
    out = {kind: tally.summary() for kind, tally in tallies.items()}
    out["identical"] = all(out[kind]["identical"] for kind in tallies)
    # Max over the sync calls of |params - round(phi)| in ulps (fragments: not measured).
    out["landing_ulps"] = landing if syncs_by_call else None
    return out


def unexplained(cfg: Traj, runs: dict) -> list[str]:
    """What the changes named in ``cfg.expect`` do not explain (empty: all explained).

    Op by op (eager), a kind of tree (params, slow, state) may differ only if a named change
    may change it (:data:`CHANGES_OP_BY_OP`); one that differs jitted (lockstep) but not op
    by op needs ``xla``. Each named change that shows is checked where it can be: the landing
    (this tree's params on phi exactly, 0.3.0's not), the sync calls."""
    problems, eager, jitted = [], runs["eager"], runs["lockstep"]
    allowed = set().union(*(CHANGES_OP_BY_OP[key] for key in cfg.expect))
    syncs = (
        None
        if "fragments" in cfg.options
        else {c for c in range(cfg.calls) if c % cfg.k == cfg.k - 1}
    )
    for kind in ("params", "slow", "state"):
        if not eager[kind]["identical"] and kind not in allowed:
            problems.append(f"{kind} differ op by op (first: {describe(eager[kind])})")
        if eager[kind]["identical"] and not jitted[kind]["identical"] and "xla" not in cfg.expect:
            problems.append(f"{kind} differ jitted only ({describe(jitted[kind])})")
    shows = not all(r["identical"] for r in runs.values())
    if shows and "landing" in cfg.expect and runs["free"]["landing_ulps"] is not None:
        landing = runs["free"]["landing_ulps"]
        if not landing["this"] == 0 < landing["ref"]:
            problems.append(f"landing: this tree {landing['this']} ulps, ref {landing['ref']}")
    if shows and ("landing" in cfg.expect or "bf16_aim" in cfg.expect) and syncs is not None:
        off_sync = set(eager["params"]["calls"]) - syncs
        if off_sync and not {"worker_mean", "xla"} & set(cfg.expect):
            problems.append(f"params differ op by op off the sync calls {sorted(off_sync)}")
    return problems


def trajectory(cfg: Traj, ref_lib) -> dict:
    runs = {mode: run_pair(cfg, ref_lib, mode) for mode in MODES}
    problems = unexplained(cfg, runs)
    if all(r["identical"] for r in runs.values()):
        verdict = "bit-identical" + (" (the change expected here does not show)" * bool(cfg.expect))
    elif problems:
        verdict = "UNEXPLAINED: " + "; ".join(problems)
    else:
        verdict = "; ".join(FIXES[key] for key in cfg.expect)
    return {
        "config": cfg.name,
        "entry": "update_and_apply" if cfg.entry == "fused" else "tx.update",
        "k": cfg.k,
        "calls": cfg.calls,
        "identical": runs["free"]["identical"],
        **runs,
        "expect": list(cfg.expect),
        "explanation": verdict,
    }


def describe(r: dict) -> str:
    if r["identical"]:
        return "identical"
    extra = f" +{len(r['only_this'])}/-{len(r['only_ref'])} leaves" * bool(
        r["only_this"] or r["only_ref"]
    )
    first, most = r["first"], r["max"]
    if first is None:
        return extra.strip()
    text = f"{first['ulps']:.0f} ulp {first['leaf']} call {first['call']}"
    if most["leaf"] != first["leaf"] or most["ulps"] != first["ulps"]:
        text += f"; max {most['ulps']:.0f} {most['leaf']} call {most['call']}"
    return text + extra


def one_line(r: dict) -> str:
    parts = []
    for mode in MODES:
        m = r[mode]
        cells = "; ".join(f"{kind} {describe(m[kind])}" for kind in ("params", "slow", "state"))
        parts.append(f"{mode}: {'identical' if m['identical'] else cells}")
    landing = r["free"]["landing_ulps"]
    if landing is not None and not r["free"]["identical"]:
        parts.append(f"landing ulps this {landing['this']:.0f}, ref {landing['ref']:.0f}")
    verdict = "" if all(r[mode]["identical"] for mode in MODES) else f" -- {r['explanation']}"
    return " | ".join(parts) + verdict


# --------------------------------------------------------------------------------- report


def markdown(report: dict) -> str:
    m, lines = report["machine"], []
    lines += [
        f"# before_after: this tree against {report['ref']} ({report['ref_version']})",
        "",
        f"Machine: {m['cpu']}, {m['cpu_cores']} cores, {m['platform']}; jax {m['jax']}, "
        f"optax {m['optax']}, Python {m['python']}. Load average (1, 5, 15 min) before: "
        f"{', '.join(f'{x:.2f}' for x in m['load_average']['before'])}; after: "
        f"{', '.join(f'{x:.2f}' for x in m['load_average']['after'])} (a shared machine: "
        "the ratios of interleaved rounds are what to read, not absolute times).",
        "",
        f"Command: `{report['command']}` ({report['seconds']:.0f} s)",
        "",
    ]
    if report["timing"]:
        lines += [
            f"## Step time, this / {report['ref']} (median of {report['rounds']} interleaved "
            f"rounds, min-max), k = {report['k']}, params and state donated",
            "",
            "Wall-clock ratio per round, and the same rounds' process CPU time ratio (time "
            "spent waiting for other processes does not count).",
            "",
            "| params | inner | tx.update + apply_updates | update_and_apply "
            "| CPU time: tx.update | CPU time: update_and_apply "
            "| median us/step, ref -> this: tx.update; update_and_apply |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in report["timing"]:
            cells = [
                f"{q['median']:.3f} ({q['min']:.2f}-{q['max']:.2f})"
                for q in [r["this_over_ref"][p] for p in PATHS]
                + [r["cpu_this_over_ref"][p] for p in PATHS]
            ]
            us = r.get("median_step_us") or {}
            cells.append("; ".join(f"{us[p]['ref']:.0f} -> {us[p]['this']:.0f}" for p in us))
            lines.append(f"| {r['size']} | {r['inner']} | {' | '.join(cells)} |")
        if report.get("state_pytree_us"):
            c = report["state_pytree_us"]
            lines += [
                "",
                "Outside the compiled program, every jitted call flattens its arguments and "
                "unflattens its results. A lookahead(adam) state (4 leaves), microseconds "
                f"(best of 7 x 2000): flatten {c['ref']['flatten_us']:.1f} ({report['ref']}) "
                f"-> {c['this']['flatten_us']:.1f} (this), unflatten "
                f"{c['ref']['unflatten_us']:.1f} -> {c['this']['unflatten_us']:.1f}; a call "
                f"of a jitted identity on the state {c['ref']['jit_identity_us']:.1f} -> "
                f"{c['this']['jit_identity_us']:.1f}.",
            ]
        lines += [
            "",
            "## Compiled temp memory (`memory_analysis().temp_size_in_bytes`), bytes",
            "",
            f"| params | inner | path | {report['ref']} | this | this - ref | per leaf |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in report["timing"]:
            leaves = parse_size(r["size"])[1]
            for path in PATHS:
                t = r["temp_bytes"][path]
                grown = t["this"] - t["ref"]
                lines.append(
                    f"| {r['size']} | {r['inner']} | {path} | {t['ref']} | {t['this']} | "
                    f"{grown:+d} | {grown / leaves:+.0f} |"
                )
        lines.append("")
    if report["trajectories"]:
        runs = report["trajectories"]
        same = [r["config"] for r in runs if all(r[mode]["identical"] for mode in MODES)]
        lines += [
            f"## Trajectories, {CYCLES} cycles, compared after every call",
            "",
            f"{len(same)} of {len(runs)} configurations bit-identical (params, slow "
            "weights, every state leaf, at every call). Unexplained differences: "
            + (", ".join(report["unexplained"]) or "none")
            + ".",
            "",
            "Each configuration runs from the same seeded params with both versions, the "
            "gradients a seeded function of each version's own params. Cells: the first "
            "difference (calls from 0) and the largest over all calls, in ulps of the leaf's "
            "dtype (integers: their difference; near zero an ulp is tiny, so the largest "
            "absolute difference follows). params: the params; slow: `slow_params`; state: "
            "every leaf of the "
            "optimizer state, by key path. *op by op*: the same comparison in lockstep (both "
            "versions step from this tree's params every call) under `jax.disable_jit`, "
            "where no XLA fusion can change a rounding: the kinds of tree that still differ "
            "there differ in arithmetic.",
            "",
            "| configuration | entry | params | slow | state | op by op | explained by |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in report["trajectories"]:
            cells = " | ".join(cell(r["free"][kind]) for kind in ("params", "slow", "state"))
            eager = [
                kind for kind in ("params", "slow", "state") if not r["eager"][kind]["identical"]
            ]
            op_by_op = ", ".join(eager) + " differ" if eager else "identical"
            if r["explanation"].startswith("UNEXPLAINED"):
                why = "**" + r["explanation"] + "**"
            elif all(r[mode]["identical"] for mode in MODES):
                why = "bit-identical" + f" ({', '.join(r['expect'])} does not show)" * bool(
                    r["expect"]
                )
            else:
                why = ", ".join(r["expect"])
            lines.append(f"| {r['config']} | {r['entry']} | {cells} | {op_by_op} | {why} |")
        lines += ["", "Explanations (each checked by the script, see `unexplained`):", ""]
        lines += [f"- **{key}**: {text}." for key, text in FIXES.items()]
        lines.append("")
    return "\n".join(lines)


def cell(r: dict) -> str:
    if r["identical"]:
        return "identical"
    first, most = r["first"], r["max"]
    if first is None:
        return f"leaves only in this: {r['only_this']}, only in ref: {r['only_ref']}"
    text = f"{first['ulps']:.0f} ulp {first['leaf']} at call {first['call']}"
    if (most["leaf"], most["call"]) != (first["leaf"], first["call"]):
        text += f"; max {most['ulps']:.0f} ulp {most['leaf']} at call {most['call']}"
    return text + f" (abs {most['abs']:.1e})"


def ref_version(ref_lib) -> str:
    return getattr(ref_lib, "__version__", "?")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ref", default="23f6617", help="git commit to compare with (0.3.0)")
    parser.add_argument(
        "--sizes", default="16M/8,2M/64,64K/4", help="TOTAL/LEAVES; '' skips timing"
    )
    parser.add_argument("--inners", default="adam,sgdm")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--block-seconds", type=float, default=0.3)
    parser.add_argument(
        "--trajectories", default="all", help="configuration names, comma separated; 'none'"
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "before_after.json")
    parser.add_argument("--md", type=Path, default=None, help="also a Markdown report here")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.rounds, args.block_seconds = "64K/4", 3, 0.02
        if args.trajectories == "all":
            args.trajectories = ",".join(QUICK_TRAJECTORIES)
    names = {t.name: t for t in TRAJECTORIES}
    chosen = {"all": list(names), "none": []}.get(
        args.trajectories, args.trajectories.split(",") if args.trajectories else []
    )
    unknown = [n for n in chosen if n not in names]
    if unknown:
        parser.error(f"unknown trajectories {unknown}; known: {sorted(names)}")
    start, load_before = time.perf_counter(), os.getloadavg()
    timing, trajectories, pytree = [], [], None
    with tempfile.TemporaryDirectory() as where:
        ref_lib = import_ref(args.ref, Path(where))
        print(f"this {lo.__version__} against {args.ref} ({ref_version(ref_lib)})", flush=True)
        if args.sizes:
            pytree = pytree_cost(ref_lib)
            print(
                "state pytree, us: "
                + ", ".join(
                    f"{v} flatten {c['flatten_us']:.1f} unflatten {c['unflatten_us']:.1f} "
                    f"jit(identity) {c['jit_identity_us']:.1f}"
                    for v, c in pytree.items()
                ),
                flush=True,
            )
        for size in filter(None, args.sizes.split(",")):
            total, leaves = parse_size(size)
            for inner in args.inners.split(","):
                ratios, cpu, step_us, temp = bench(total, leaves, inner, ref_lib, args)
                timing.append(
                    {
                        "size": size,
                        "inner": inner,
                        "this_over_ref": ratios,
                        "cpu_this_over_ref": cpu,
                        "median_step_us": step_us,
                        "temp_bytes": temp,
                    }
                )
                print(
                    f"{size} {inner}: this/{args.ref} "
                    + ", ".join(
                        f"{path} {r['median']:.3f}x ({r['min']:.2f}-{r['max']:.2f}), temp "
                        f"{temp[path]['ref'] / 1e6:.2f} -> {temp[path]['this'] / 1e6:.2f} MB"
                        for path, r in ratios.items()
                    ),
                    flush=True,
                )
        for name in chosen:
            r = trajectory(names[name], ref_lib)
            trajectories.append(r)
            print(f"{name} [{r['entry']}]: {one_line(r)}", flush=True)
        version = ref_version(ref_lib)
    machine = machine_info()
    machine["load_average"] = {"before": load_before, "after": os.getloadavg()}
    report = {
        "machine": machine,
        "command": "python benchmarks/before_after.py "
        + " ".join(sys.argv[1:] if argv is None else argv),  # fmt: skip
        "seconds": time.perf_counter() - start,
        "ref": args.ref,
        "ref_version": version,
        "this_version": lo.__version__,
        "k": args.k,
        "rounds": args.rounds,
        "timing": timing,
        "state_pytree_us": pytree,
        "trajectories": trajectories,
        "unexplained": [
            r["config"] for r in trajectories if r["explanation"].startswith("UNEXPLAINED")
        ],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")
    if args.md is not None:
        args.md.write_text(markdown(report))
        print(f"wrote {args.md}")
    return report


if __name__ == "__main__":
    main()

"""One command for an accelerator: what the sync costs there, per formulation, and offloading.

    python benchmarks/device.py             # the full run, sized for <= 8 minutes on one GPU
    python benchmarks/device.py --quick     # small sizes, a few seconds (the CPU test runs it)
    python benchmarks/device.py --results-md  # also put the summary into benchmarks/RESULTS.md

Records, in ``benchmarks/results/device-<platform>[-quick].json`` and a Markdown summary
next to it:

1. ``environment``: jax/jaxlib/optax, the device, driver and CUDA versions (from
   ``jax.print_environment_info`` and ``nvidia-smi`` where present), XLA_FLAGS.
2. ``cond``: the bare cost of a ``lax.cond`` against a select (and a plain program) on a
   small array: microseconds per call with the calls enqueued back to back, so a
   conditional that makes the host wait for the device shows. Run again in a child
   process with graph conditionals on (``--xla_gpu_enable_command_buffer=+CONDITIONAL``),
   which also times the formulations at the smallest size.
3. ``steps``: Adam's step at each size (default 16M, 256M and 1B float32 params), and
   for each formulation of lookahead(adam) the ratio to Adam's step of: the non-sync
   step, the sync step, and the mean step at k = 5 and k = 20. Formulations:
   ``tx.update`` (today's: a cond and a select inside the update), ``select``
   (``update_and_apply(formulation="select")``: no conditional, reads the slow weights
   every step), ``update_and_apply`` (the whole-step cond), ``two_executables``
   (``StaticSyncStep``: the sync chosen in Python), ``optax.lookahead``. Per executable:
   compiled temp bytes, params-sized copies and conditionals in the HLO; the state's
   bytes by memory kind.
4. ``link``: host <-> device bandwidth (``pinned_host``), each way and both at once.
5. ``offload``: at the largest size, ``StaticSyncStep(offload=True)`` against Adam and
   the in-device two executables: time per sync, the sync's extra time amortised over
   k = 5 and 20 steps, the device memory of the state (and what offloading saves).

Timing as in speed.py: every contender owns its donated params and state, one timed
block (a multiple of 20 steps, ended by ``block_until_ready``) per contender and case
per round, the order rotating; each round gives one ratio against Adam's block of the
same round, and the tables show the median. ``k`` reaches the lookahead as a traced
scalar, so one executable serves every case: a block starts at the start of a cycle
(``count = 0``, ``period = k``), and k = 2**30 times non-sync steps, k = 1 sync steps.
optax.lookahead needs a static k: one executable per case.
"""

from __future__ import annotations

import os

# Before jax starts: the full run holds several 1B-param models at once (see GROUPS).
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from _hlo import large_copies  # noqa: E402
from _timing import interleaved_rounds, machine_info, ratio_summary  # noqa: E402

import lookahead_optax as lo  # noqa: E402
from lookahead_optax import _offload  # noqa: E402

FORMULATIONS = ("tx.update", "select", "update_and_apply", "two_executables", "optax.lookahead")
OURS = FORMULATIONS[:4]
CASES = {"non_sync": 2**30, "sync": 1, "k=5": 5, "k=20": 20}
BLOCK_UNIT = 20  # steps per block: a multiple of every k above
GRAPH_FLAGS = "--xla_gpu_enable_command_buffer=+CONDITIONAL --xla_gpu_graph_min_graph_size=1"
# Device bytes of each contender in params' bytes (params + state, and the temporaries
# measured on CPU: optax.lookahead 1.25-1.5x params, select 3x), to pack contenders into
# groups that fit the device together (default 4).
FOOTPRINT = {"adam": 3, "offloaded": 3, "optax.lookahead": 5.5, "select": 7}
MARK_BEGIN = "<!-- benchmarks/device.py: begin -->"
MARK_END = "<!-- benchmarks/device.py: end -->"


def parse_size(text: str) -> tuple[int, int]:
    """'16M/8' -> (16_000_000 params, 8 leaves)."""
    total, leaves = text.split("/")
    scale = {"K": 1_000, "M": 1_000_000, "B": 1_000_000_000}.get(total[-1].upper(), 1)
    number = float(total[:-1]) if scale > 1 else float(total)
    return int(number * scale), int(leaves)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few rounds")
    parser.add_argument("--sizes", default=None, help="TOTAL/LEAVES, comma separated")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--block-seconds", type=float, default=None)
    parser.add_argument("--cond-calls", type=int, default=None, help="calls per timed block")
    parser.add_argument("--link-bytes", type=float, default=None)
    parser.add_argument(
        "--formulations",
        default=",".join(FORMULATIONS),
        help=f"comma separated, from {FORMULATIONS}",
    )
    parser.add_argument("--no-graph-conditionals", action="store_true", help="skip the child")
    parser.add_argument(
        "--max-minutes",
        type=float,
        default=8.0,
        help="phases that would start after this are skipped (recorded)",
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON path")
    parser.add_argument(
        "--results-md",
        action="store_true",
        help="replace the marked section of benchmarks/RESULTS.md",
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    defaults = dict(sizes="16M/8,256M/32,1B/64", rounds=7, block_seconds=0.05,
                    cond_calls=500, link_bytes=1 << 30)  # fmt: skip
    if args.quick:
        defaults.update(sizes="256K/4", rounds=2, block_seconds=0.002, cond_calls=20,
                        link_bytes=1 << 22)  # fmt: skip
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.formulations = [f for f in args.formulations.split(",") if f]
    unknown = set(args.formulations) - set(FORMULATIONS)
    if unknown:
        parser.error(f"--formulations: unknown {sorted(unknown)}, choose from {FORMULATIONS}")
    return args


# ------------------------------------------------------------------------ environment


def environment() -> dict[str, Any]:
    info = machine_info()
    device = jax.devices()[0]
    info["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    info["platform_version"] = getattr(device.client, "platform_version", None)
    try:
        info["memories"] = [m.kind for m in device.addressable_memories()]
    except Exception as error:  # noqa: BLE001
        info["memories"] = f"unavailable: {error}"
    stats = device.memory_stats() or {}
    info["device_bytes_limit"] = stats.get("bytes_limit")
    try:
        info["jax_environment"] = jax.print_environment_info(return_string=True)
    except Exception as error:  # noqa: BLE001
        info["jax_environment"] = f"unavailable: {error}"
    try:
        query = (
            "--query-gpu=name,driver_version,memory.total,"
            "pcie.link.gen.current,pcie.link.width.current"
        )
        smi = subprocess.run(["nvidia-smi", query, "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)  # fmt: skip
        info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
        version = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20)
        match = re.search(r"CUDA Version:\s*([\d.]+)", version.stdout)
        info["cuda_driver_api"] = match.group(1) if match else None
    except (OSError, subprocess.SubprocessError):
        info["nvidia_smi"] = None
    try:
        from jax._src.lib import cuda_versions  # present in CUDA builds of jaxlib

        info["cuda"] = {
            name: getattr(cuda_versions, name)()
            for name in (
                "cuda_runtime_get_version",
                "cuda_driver_get_version",
                "cudnn_get_version",
                "cublas_get_version",
            )  # fmt: skip
            if cuda_versions is not None and hasattr(cuda_versions, name)
        }
    except Exception:  # noqa: BLE001
        info["cuda"] = None
    return info


# ---------------------------------------------------------------------------- helpers


def block(tree: Any) -> None:
    jax.block_until_ready(tree)


def tree_bytes(tree: Any) -> int:
    return int(sum(x.nbytes for x in jax.tree.leaves(tree) if hasattr(x, "nbytes")))


def bytes_by_kind(tree: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in jax.tree.leaves(tree):
        if isinstance(x, jax.Array):
            kind = x.sharding.memory_kind or "device"
            out[kind] = out.get(kind, 0) + int(x.nbytes)
    return out


def hlo_stats(lowered: Any, min_elements: int) -> dict[str, Any]:
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    text = compiled.as_text()
    memory = compiled.memory_analysis()
    stats = {
        "compile_s": compile_s,
        "params_sized_copies": len(large_copies(text, min_elements)),
        "conditionals": len(re.findall(r"\bconditional\(", text)),
    }
    for name in ("temp", "argument", "output", "alias", "host_temp", "host_argument"):
        value = getattr(memory, f"{name}_size_in_bytes", None)
        if value is not None:
            stats[f"{name}_bytes"] = int(value)
    return stats


def device_memory_in_use() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("bytes_in_use")


# ------------------------------------------------------------------------ 2. cond cost


def bench_cond(args) -> dict[str, Any]:
    """Microseconds per call, calls enqueued back to back, of three tiny programs."""
    x0 = jnp.zeros(1024, jnp.float32)
    programs = {
        "plain": lambda c, x: (c + 1, x + 1.0),
        "cond": lambda c, x: (c + 1, jax.lax.cond(c % 2 == 0, lambda: x + 1.0, lambda: x - 1.0)),
        "select": lambda c, x: (c + 1, jnp.where(c % 2 == 0, x + 1.0, x - 1.0)),
    }
    compiled, carries = {}, {}
    for name, fn in programs.items():
        compiled[name] = jax.jit(fn, donate_argnums=(0, 1))
        carries[name] = compiled[name](jnp.int32(0), jnp.copy(x0))
        block(carries[name])

    def runner(name):
        def run():
            carry = carries[name]
            start = time.perf_counter()
            for _ in range(args.cond_calls):
                carry = compiled[name](*carry)
            block(carry)
            carries[name] = carry
            return (time.perf_counter() - start) / args.cond_calls

        return run

    for name in programs:  # warm up
        runner(name)()
    seconds = interleaved_rounds({name: runner(name) for name in programs}, max(args.rounds, 3))
    us = {name: statistics.median(s) * 1e6 for name, s in seconds.items()}
    return {
        "calls_per_block": args.cond_calls,
        "us_per_call": us,
        "extra_us_vs_plain": {
            name: statistics.median(a - b for a, b in zip(seconds[name], seconds["plain"])) * 1e6
            for name in ("cond", "select")
        },
        "ratio_vs_plain": {
            name: ratio_summary(seconds[name], seconds["plain"]) for name in ("cond", "select")
        },
    }


# ------------------------------------------------------------------------ 3. the steps


def adam():
    return optax.adam(1e-4)


def lookahead_tx(k):
    return lo.lookahead(adam(), k=k, alpha=0.5)


def set_cycle(opt_state: Any, k: int) -> Any:
    """The state at the start of a cycle of length k (count 0, period k)."""

    def start(state):
        return state._replace(count=jnp.zeros([], jnp.int32), period=jnp.asarray(k, jnp.int32))

    return _offload.map_states(start, opt_state)


class Contender:
    """One formulation's donated params and state, and how to time a block of its steps."""

    def __init__(self, name: str, params: Any, grads: Any):
        self.name, self.grads = name, grads
        self.params = jax.tree.map(jnp.copy, params)
        self.executables: dict[str, dict[str, Any]] = {}
        min_elements = min(x.size for x in jax.tree.leaves(params))
        if name == "adam":
            self.opt_state = adam().init(self.params)
            step = jax.jit(adam_step, donate_argnums=(0, 1))
            self.executables["step"] = hlo_stats(
                step.lower(self.params, self.opt_state, grads), min_elements
            )
            self.steps = {case: step for case in CASES}
        elif name == "optax.lookahead":
            self.params = optax.LookaheadParams(self.params, jax.tree.map(jnp.copy, self.params))
            self.opt_state = optax.lookahead(adam(), 5, 0.5).init(self.params)
            self.steps = {}
            for case, k in CASES.items():
                step = jax.jit(optax_lookahead_step(k), donate_argnums=(0, 1))
                self.executables[case] = hlo_stats(
                    step.lower(self.params, self.opt_state, grads), min_elements
                )
                self.steps[case] = step
        else:
            self.opt_state = lookahead_tx(5).init(self.params)
            if name in ("two_executables", "offloaded"):
                self.stepper = lo.experimental.StaticSyncStep(
                    static_step, donate_argnums=(0, 1), offload=name == "offloaded"
                )
                if name == "offloaded":
                    self.opt_state = lo.experimental.offload_state(self.opt_state)
                for sync in (False, True):
                    lowered = self.stepper.lower(
                        sync, self.params, self.opt_state, grads, jnp.int32(5)
                    )
                    self.executables[f"sync={sync}"] = hlo_stats(lowered, min_elements)
                self.steps = {case: self.stepper for case in CASES}
            else:
                step = jax.jit(device_decided_step(name), donate_argnums=(0, 1))
                self.executables["step"] = hlo_stats(
                    step.lower(self.params, self.opt_state, grads, jnp.int32(5)), min_elements
                )
                self.steps = {case: step for case in CASES}
        self.state_bytes = bytes_by_kind(self.opt_state)
        if name == "optax.lookahead":  # its slow weights sit in the params
            extra = tree_bytes(self.params.slow)
            self.state_bytes["device"] = self.state_bytes.get("device", 0) + extra

    def start(self, case: str) -> None:
        """Before a block: the state at the start of a cycle for this case."""
        if self.name == "adam":
            return
        if self.name == "optax.lookahead":
            self.opt_state = self.opt_state._replace(
                steps_since_sync=jnp.zeros_like(self.opt_state.steps_since_sync)
            )
            return
        self.opt_state = set_cycle(self.opt_state, CASES[case])
        if hasattr(self, "stepper"):
            self.stepper.resync(self.opt_state)

    def run(self, case: str, steps: int) -> float:
        """Seconds per step of a block of ``steps`` steps."""
        step = self.steps[case]
        extra = () if self.name in ("adam", "optax.lookahead") else (jnp.int32(CASES[case]),)
        params, opt_state = self.params, self.opt_state
        block((params, opt_state))
        start = time.perf_counter()
        for _ in range(steps):
            params, opt_state = step(params, opt_state, self.grads, *extra)
        block((params, opt_state))
        seconds = (time.perf_counter() - start) / steps
        self.params, self.opt_state = params, opt_state
        return seconds

    def check(self) -> None:
        if hasattr(self, "stepper"):
            self.stepper.check()


def adam_step(params, opt_state, grads):
    updates, opt_state = adam().update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def device_decided_step(name: str) -> Callable:
    def step(params, opt_state, grads, k):
        tx = lookahead_tx(k)
        if name == "tx.update":
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state
        formulation = "select" if name == "select" else "cond"
        return lo.update_and_apply(tx, grads, opt_state, params, formulation=formulation)

    return step


def static_step(params, opt_state, grads, k, *, sync):
    return lo.update_and_apply(lookahead_tx(k), grads, opt_state, params, sync=sync)


def optax_lookahead_step(k: int) -> Callable:
    tx = optax.lookahead(adam(), sync_period=k, slow_step_size=0.5)

    def step(params, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return step


def make_params(total: int, leaves: int) -> dict[str, jax.Array]:
    per_leaf = total // leaves
    return {f"w{i:03d}": jnp.full((per_leaf,), 0.01 * (i + 1), jnp.float32) for i in range(leaves)}


def groups(names: list[str], params_bytes: int) -> list[list[str]]:
    """Contenders packed so that each group, with Adam and the shared gradients, fits."""
    limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
    if limit is None:
        return [names]
    budget = 0.8 * limit / params_bytes - 1 - FOOTPRINT["adam"]  # gradients, Adam
    packed: list[list[str]] = [[]]
    used = 0.0
    for name in names:
        need = FOOTPRINT.get(name, 4)
        if packed[-1] and used + need > budget:
            packed.append([])
            used = 0.0
        packed[-1].append(name)
        used += need
    return packed


def bench_steps(total: int, leaves: int, names: list[str], args) -> dict[str, Any]:
    """Interleaved rounds of every case of every contender against Adam, group by group."""
    params = make_params(total, leaves)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params)
    params_bytes = tree_bytes(params)
    result: dict[str, Any] = {
        "params": (total // leaves) * leaves,
        "leaves": leaves,
        "params_bytes": params_bytes,
        "groups": groups(names, params_bytes),
        "contenders": {},
    }
    for group in result["groups"]:
        contenders = {"adam": Contender("adam", params, grads)}
        for name in group:
            contenders[name] = Contender(name, params, grads)
        memory_in_use = device_memory_in_use()
        for contender in contenders.values():  # warm up: compile and run every case once
            for case in CASES:
                contender.start(case)
                contender.run(case, BLOCK_UNIT)
        probe = contenders["adam"].run("k=5", BLOCK_UNIT)
        units = max(1, round(args.block_seconds / max(probe, 1e-7) / BLOCK_UNIT))
        steps = units * BLOCK_UNIT

        def runner(contender, case):
            def run():
                contender.start(case)
                return contender.run(case, steps)

            return run

        runners = {("adam", "k=5"): runner(contenders["adam"], "k=5")}
        for name in group:
            for case in CASES:
                runners[(name, case)] = runner(contenders[name], case)
        keyed = {f"{name}|{case}": fn for (name, case), fn in runners.items()}
        seconds = interleaved_rounds(keyed, args.rounds)
        adam_seconds = seconds["adam|k=5"]
        result.setdefault("adam", []).append(
            {
                "step_s": statistics.median(adam_seconds),
                "executables": contenders["adam"].executables,
                "state_bytes": contenders["adam"].state_bytes,
            }  # fmt: skip
        )
        for name in group:
            contenders[name].check()  # StaticSyncStep: every static sync agreed with the state
            result["contenders"][name] = {
                "step_s": {case: statistics.median(seconds[f"{name}|{case}"]) for case in CASES},
                "ratio_vs_adam": {
                    case: ratio_summary(seconds[f"{name}|{case}"], adam_seconds) for case in CASES
                },
                "executables": contenders[name].executables,
                "state_bytes": contenders[name].state_bytes,
                "group_device_bytes_in_use": memory_in_use,
            }
        result["steps_per_block"] = steps
        del contenders
    result["adam_step_s"] = statistics.median(g["step_s"] for g in result["adam"])
    return result


# ------------------------------------------------ 3b. outer optimizers and workers


def bench_two_loop(total: int, leaves: int, args) -> dict[str, Any]:
    """speed.py --two-loop's contenders at the first size, through ``tx.update``: alpha,
    outer SGD / heavy ball / Nesterov / Adam against Adam; workers=4 (alpha, Nesterov,
    statistics on and off) against Adam vmapped over the workers, the workers' params once
    on the default device (vmapped) and once sharded over a one-device mesh."""
    import types

    import speed
    from tqdm import tqdm

    two = types.SimpleNamespace(k=5, rounds=args.rounds, block_steps=2, workers=4)
    groups = speed.two_loop_contenders(two.workers)
    mesh = jax.make_mesh(
        (1,), ("workers",), axis_types=(jax.sharding.AxisType.Explicit,), devices=jax.devices()[:1]
    )
    runs = [("single", None), ("workers", None), ("workers", mesh)]
    results = []
    with tqdm(disable=True) as progress:
        for group, on_mesh in runs:
            results.append(
                speed.bench_two_loop_group(
                    group, groups[group], {"after": lo}, total, leaves, two, progress, on_mesh
                )
            )
    return {"results": results, "table": speed.format_two_loop(results, two.k)}


# ----------------------------------------------------------------------- 4. the link


def bench_link(args) -> dict[str, Any]:
    device = jax.devices()[0]
    if not lo.experimental.memory_kinds_supported(device):
        return {"skipped": f"{device.platform} has no pinned_host memory here"}
    on_device = jax.sharding.SingleDeviceSharding(device, memory_kind="device")
    on_host = jax.sharding.SingleDeviceSharding(device, memory_kind="pinned_host")
    n = int(args.link_bytes) // 4
    host = jax.device_put(jnp.ones(n, jnp.float32), on_host)
    dev = jax.device_put(jnp.ones(n, jnp.float32), on_device)
    block((host, dev))

    def timed(fn):
        def run():
            start = time.perf_counter()
            block(fn())
            return time.perf_counter() - start

        return run

    runners = {
        "host_to_device": timed(lambda: jax.device_put(host, on_device)),
        "device_to_host": timed(lambda: jax.device_put(dev, on_host)),
        "both_at_once": timed(
            lambda: (jax.device_put(host, on_device), jax.device_put(dev, on_host))
        ),
    }
    for run in runners.values():
        run()
    seconds = interleaved_rounds(runners, max(args.rounds, 3))
    nbytes = 4 * n
    return {
        "bytes": nbytes,
        "GB_per_s": {
            name: (2 if name == "both_at_once" else 1) * nbytes / statistics.median(s) / 1e9
            for name, s in seconds.items()
        },
    }


# ---------------------------------------------------------------------- 5. offloading


def bench_offload(total: int, leaves: int, args) -> dict[str, Any]:
    if not lo.experimental.memory_kinds_supported():
        return {"skipped": f"{jax.default_backend()} has no pinned_host memory here"}
    result = bench_steps(total, leaves, ["two_executables", "offloaded"], args)
    off = result["contenders"]["offloaded"]
    adam_s = result["adam_step_s"]
    sync_extra = off["step_s"]["sync"] - off["step_s"]["non_sync"]
    result["summary"] = {
        "sync_step_s": off["step_s"]["sync"],
        "sync_extra_s": sync_extra,
        "amortised_share_of_adam_step": {k: sync_extra / k / adam_s for k in (5, 20)},
        # The extra time of a sync is the transfers and the slow step: the same for a model
        # whose step (forward and backward included) takes longer.
        "amortised_share_of_50ms_step_at_k20": sync_extra / (20 * 0.05),
        "device_state_bytes": off["state_bytes"].get("device", 0),
        "host_state_bytes": off["state_bytes"].get("pinned_host", 0),
        "adam_device_state_bytes": result["adam"][0]["state_bytes"].get("device", 0),
        "in_device_lookahead_state_bytes": result["contenders"]["two_executables"][
            "state_bytes"
        ].get("device", 0),
    }
    summary = result["summary"]
    summary["device_bytes_saved"] = (
        summary["in_device_lookahead_state_bytes"] - summary["device_state_bytes"]
    )
    return result


# --------------------------------------------------------------- graph conditionals


def run_child(args, out_dir: Path) -> dict[str, Any]:
    """This script again in a child process with graph conditionals on: cond cost, and the
    formulations at the smallest size."""
    out = out_dir / "child.json"
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + GRAPH_FLAGS).strip()
    command = [sys.executable, str(Path(__file__).resolve()), "--child", "--out", str(out),
               "--sizes", args.sizes.split(",")[0], "--rounds", str(args.rounds),
               "--block-seconds", str(args.block_seconds), "--cond-calls", str(args.cond_calls),
               "--formulations", ",".join(args.formulations)]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        return {"failed": done.stderr[-4000:], "xla_flags": env["XLA_FLAGS"]}
    report = json.loads(out.read_text())
    report["xla_flags"] = env["XLA_FLAGS"]
    return report


# ------------------------------------------------------------------------- reporting


def ratio(r: dict[str, float]) -> str:
    return f"{r['median']:.3f}x"


def best_formulation(result: dict[str, Any]) -> str:
    """Ours with the lowest mean step at k = 5."""
    candidates = [n for n in OURS if n in result["contenders"]]
    return min(candidates, key=lambda n: result["contenders"][n]["ratio_vs_adam"]["k=5"]["median"])


def format_steps(results: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| params/leaves | Adam step | formulation | non-sync | sync | k=5 mean | k=20 mean "
        "| extra temp (x params) | params-sized copies | conditionals "
        "| state on device (x params) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        adam_temp = r["adam"][0]["executables"]["step"].get("temp_bytes", 0)
        for name, c in r["contenders"].items():
            ex = c["executables"].values()
            temp = max(e.get("temp_bytes", 0) for e in ex) - adam_temp
            lines.append(
                f"| {r['params'] / 1e6:g}M/{r['leaves']} "
                f"| {r['adam_step_s'] * 1e3:.3f} ms | {name} "
                + "".join(f"| {ratio(c['ratio_vs_adam'][case])} " for case in CASES)
                + f"| {temp / r['params_bytes']:+.3f} "
                f"| {max(e['params_sized_copies'] for e in ex)} "
                f"| {max(e['conditionals'] for e in ex)} "
                f"| {c['state_bytes'].get('device', 0) / r['params_bytes']:.2f} |"
            )
    return lines


def format_report(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [
        f"### {env['device']} ({env['platform']}), {time.strftime('%Y-%m-%d')}",
        "",
        f"jax {env['jax']}, jaxlib {env['jaxlib']}, optax {env['optax']}; "
        f"{env['device_count']} device(s); platform version {env.get('platform_version')}; "
        f"nvidia-smi: {env.get('nvidia_smi') or '-'}; CUDA (driver API) "
        f"{env.get('cuda_driver_api') or '-'}; XLA_FLAGS {env.get('xla_flags') or '-'}; "
        f"{'quick mode' if report['config']['quick'] else 'full run'}, "
        f"{report['config']['rounds']} rounds, {report['elapsed_s']:.0f} s.",
        "",
    ]
    cond = report.get("cond")
    if cond:
        lines += ["Bare conditional (µs per call, calls enqueued back to back):", "",
                  "| | plain | cond | select | cond - plain | select - plain |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        rows = [("default flags", cond)]
        child = report.get("graph_conditionals") or {}
        if child.get("cond"):
            rows.append(("graph conditionals", child["cond"]))
        for label, c in rows:
            us, extra = c["us_per_call"], c["extra_us_vs_plain"]
            lines.append(
                f"| {label} | {us['plain']:.1f} | {us['cond']:.1f} | {us['select']:.1f} "
                f"| {extra['cond']:+.1f} | {extra['select']:+.1f} |"
            )
        lines.append("")
    if report.get("steps"):
        lines += ["Each step / Adam's step (median of per-round ratios):", ""]
        lines += format_steps(report["steps"])
        lines.append("")
    if report.get("two_loop"):
        lines += ["Outer optimizers and workers through tx.update (speed.py --two-loop; the "
                  "third group's workers sit on a one-device mesh):", "",
                  report["two_loop"]["table"], ""]  # fmt: skip
        child = report.get("graph_conditionals") or {}
        if child.get("steps"):
            lines += ["The same with graph conditionals on:", ""]
            lines += format_steps(child["steps"])
            lines.append("")
        elif child.get("failed"):
            lines += [f"Graph conditionals: the child failed: `{child['failed'][-300:]}`", ""]
    link = report.get("link") or {}
    if "GB_per_s" in link:
        gbs = link["GB_per_s"]
        lines += [
            f"Host link ({link['bytes'] / 2**20:.0f} MiB, pinned_host): host to device "
            f"{gbs['host_to_device']:.1f} GB/s, device to host {gbs['device_to_host']:.1f} GB/s, "
            f"both at once {gbs['both_at_once']:.1f} GB/s in total.",
            "",
        ]
    off = (report.get("offload") or {}).get("summary")
    if off:
        share = off["amortised_share_of_adam_step"]
        lines += [
            f"Offloaded slow weights ({report['offload']['params'] / 1e6:g}M params): a sync step "
            f"takes {off['sync_step_s'] * 1e3:.2f} ms, "
            f"{off['sync_extra_s'] * 1e3:.2f} ms more than a "
            f"non-sync step; amortised {share[5]:.1%} (k=5) and {share[20]:.1%} (k=20) of Adam's "
            f"step, {off['amortised_share_of_50ms_step_at_k20']:.1%} of a 50 ms step at k=20. "
            "State "
            f"on the device {off['device_state_bytes'] / 2**20:.1f} MiB (Adam's "
            f"{off['adam_device_state_bytes'] / 2**20:.1f} MiB), on the host "
            f"{off['host_state_bytes'] / 2**20:.1f} MiB; saved "
            f"{off['device_bytes_saved'] / 2**20:.1f} MiB of device memory.",
            "",
        ]
    if report.get("steps"):
        lines += ["Targets (lookahead(adam) / adam at k=5, the fastest of ours):", ""]
        for r in report["steps"]:
            target = {16_000_000: 1.10, 1_000_000_000: 1.05}.get(r["params"])
            best = best_formulation(r)
            value = r["contenders"][best]["ratio_vs_adam"]["k=5"]["median"]
            verdict = "no target at this size"
            if target is not None:
                verdict = f"target <= {target}x: {'met' if value <= target else 'missed'}"
            lines.append(f"- {r['params'] / 1e6:g}M ({best}): {value:.3f}x, {verdict}")
        if off:
            extra = off["device_state_bytes"] - off["adam_device_state_bytes"]
            share = off["amortised_share_of_50ms_step_at_k20"]
            lines.append(
                f"- offloaded state on the device: Adam's + {extra} bytes (counters); amortised "
                f"sync at k=20 for a 50 ms step {share:.1%}, target <= 5%: "
                f"{'met' if share <= 0.05 else 'missed'}"
            )
        fastest = ", ".join(
            f"{r['params'] / 1e6:g}M: {best_formulation(r)}" for r in report["steps"]
        )
        lines += ["", f"Fastest formulation (k=5 mean): {fastest}."]
    skipped = report.get("skipped")
    if skipped:
        lines += ["", f"Skipped for time: {', '.join(skipped)}."]
    return "\n".join(lines) + "\n"


def write_results_md(summary: str) -> Path:
    path = HERE / "RESULTS.md"
    text = path.read_text()
    block_text = f"{MARK_BEGIN}\n{summary}{MARK_END}"
    if MARK_BEGIN in text and MARK_END in text:
        head, rest = text.split(MARK_BEGIN, 1)
        tail = rest.split(MARK_END, 1)[1]
        text = head + block_text + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block_text + "\n"
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    start = time.perf_counter()
    deadline = start + 60 * args.max_minutes
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    report: dict[str, Any] = {
        "environment": environment(),
        "config": {
            "quick": args.quick,
            "sizes": args.sizes,
            "rounds": args.rounds,
            "block_seconds": args.block_seconds,
            "cases": CASES,
            "alpha": 0.5,
            "inner": "optax.adam(1e-4)",
            "formulations": args.formulations,
            "child": args.child,
        },  # fmt: skip
        "phase_seconds": {},
        "skipped": [],
    }

    def phase(name: str, fn: Callable[[], Any]) -> Any:
        if time.perf_counter() > deadline:
            report["skipped"].append(name)
            return None
        phase_start = time.perf_counter()
        value = fn()
        report["phase_seconds"][name] = time.perf_counter() - phase_start
        print(f"[device.py] {name}: {report['phase_seconds'][name]:.1f} s", flush=True)
        return value

    report["cond"] = phase("cond", lambda: bench_cond(args))
    if args.child:  # graph conditionals: the cond cost and the smallest size only
        size = sizes[0]
        ours = [f for f in args.formulations if f in OURS]
        steps = phase(f"steps {args.sizes}", lambda: bench_steps(*size, ours, args))
        report["steps"] = [steps] if steps else []
    else:
        report["link"] = phase("link", lambda: bench_link(args))
        report["steps"] = []
        for total, leaves in sizes:
            result = phase(
                f"steps {total / 1e6:g}M/{leaves}",
                lambda total=total, leaves=leaves: bench_steps(
                    total, leaves, args.formulations, args
                ),
            )
            if result:
                report["steps"].append(result)
        report["two_loop"] = phase(
            f"two-loop {sizes[0][0] / 1e6:g}M/{sizes[0][1]}",
            lambda: bench_two_loop(*sizes[0], args),
        )
        report["offload"] = phase("offload", lambda: bench_offload(*sizes[-1], args))
        if not args.no_graph_conditionals:
            with tempfile.TemporaryDirectory() as tmp:
                report["graph_conditionals"] = phase(
                    "graph conditionals (child process)", lambda: run_child(args, Path(tmp))
                )
    report["elapsed_s"] = time.perf_counter() - start
    platform = report["environment"]["platform"]
    out = args.out or HERE / "results" / f"device-{platform}{'-quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    if args.child:
        return report
    summary = format_report(report)
    out.with_suffix(".md").write_text(summary)
    print(summary)
    print(f"wrote {out} and {out.with_suffix('.md')}")
    if args.results_md:
        print(f"updated {write_results_md(summary)}")
    return report


if __name__ == "__main__":
    main()

"""Per-device memory and step time of Lookahead with FSDP-sharded params on N devices.

The params (a stack of square matrices) and every params-shaped leaf of the optimizer
state are sharded over N devices along their first axis. For the inner optimizer alone
and for lookahead around it, the script reports per device: the params and slow-weight
bytes, the compiled step's memory_analysis (arguments, outputs, temporaries), the number
of collectives in the compiled HLO, and the time of an optimizer step (update + apply,
state donated). Timings are interleaved rounds (inner, lookahead, inner, ...), one ratio
per round; the median ratio is robust to other processes sharing the CPU.

Without accelerators, the N devices are emulated on the CPU
(--xla_force_host_platform_device_count), so they share the host's cores: step times
show the relative cost, not the speed-up of real devices.

    python benchmarks/multidevice.py --devices 8
    python benchmarks/multidevice.py --devices 4 --workers   # DiLoCo workers, one per device

``--workers``: params (``--params`` float32 in ``--leaves`` leaves) carry a leading
worker axis with one worker per device, sharded over the mesh (Explicit and Auto axis
types). Against Adam vmapped over the workers (the same sharding), ``lookahead(adam,
workers=N)`` with alpha and with a Nesterov outer step, statistics on and off: the
compiled temp bytes per device, the all-reduce bytes of the sync (from the compiled HLO:
one slow-weights' worth is the bound) and the k-step mean step time ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import time
from pathlib import Path


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=8, help="emulated CPU devices (default 8)")
    parser.add_argument("--width", type=int, default=2048, help="params are width x width matrices")
    parser.add_argument("--layers", type=int, default=4, help="number of matrices")
    parser.add_argument("--k", type=int, default=5, help="lookahead sync period")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds")
    parser.add_argument("--steps", type=int, default=10, help="steps per round (a multiple of k)")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="where to write the JSON results (default results/multidevice[-workers-N].json)",
    )
    parser.add_argument("--workers", action="store_true", help="DiLoCo workers (see above)")
    parser.add_argument("--params", type=float, default=16e6, help="--workers: float32 params")
    parser.add_argument("--leaves", type=int, default=8, help="--workers: number of leaves")
    args = parser.parse_args()
    if args.out is None:
        name = f"multidevice-workers-{args.devices}.json" if args.workers else "multidevice.json"
        args.out = Path(__file__).parent / "results" / name
    return args


ARGS = parse_args()
if ARGS.devices < 1:
    raise SystemExit(f"--devices must be a positive int, got {ARGS.devices}")
# Must happen before jax is imported: the CPU backend reads it once, at start-up.
_flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
os.environ["XLA_FLAGS"] = f"{_flags} --xla_force_host_platform_device_count={ARGS.devices}".strip()

import _hlo  # noqa: E402  (benchmarks/, the script's directory)
import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from _timing import machine_info  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

import lookahead_optax as lo  # noqa: E402


def fsdp_state_shardings(tx: optax.GradientTransformation, params, mesh: Mesh):
    """Every params-shaped leaf of the state sharded like the params, the rest replicated."""
    return optax.tree_map_params(
        tx,
        lambda _: NamedSharding(mesh, PartitionSpec("fsdp")),
        jax.eval_shape(tx.init, params),
        transform_non_params=lambda _: NamedSharding(mesh, PartitionSpec()),
    )


def bytes_on(device, tree) -> int:
    """Bytes of ``tree``'s shards that live on ``device``."""
    return sum(
        shard.data.nbytes
        for leaf in jax.tree.leaves(tree)
        for shard in leaf.addressable_shards
        if shard.device == device
    )


class Contender:
    """An optimizer with its sharded state and compiled step, ready to time."""

    def __init__(self, tx: optax.GradientTransformation, params, grads, mesh: Mesh):
        self.tx = tx
        self.grads = grads
        self.params = jax.tree.map(lambda p: p.copy(), params)
        self.state = jax.jit(tx.init, out_shardings=fsdp_state_shardings(tx, params, mesh))(
            self.params
        )

        def step(params, state, grads):
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        self.compiled = (
            jax.jit(step, donate_argnums=(0, 1)).lower(self.params, self.state, grads).compile()
        )

    def run(self, steps: int) -> float:
        """Seconds per step over ``steps`` steps."""
        jax.block_until_ready((self.params, self.state))
        start = time.perf_counter()
        for _ in range(steps):
            self.params, self.state = self.compiled(self.params, self.state, self.grads)
        jax.block_until_ready((self.params, self.state))
        return (time.perf_counter() - start) / steps

    def memory(self) -> dict[str, int]:
        analysis = self.compiled.memory_analysis()
        return {
            "argument_bytes": int(analysis.argument_size_in_bytes),
            "output_bytes": int(analysis.output_size_in_bytes),
            "alias_bytes": int(analysis.alias_size_in_bytes),
            "temp_bytes": int(analysis.temp_size_in_bytes),
        }

    def collectives(self) -> int:
        return sum(_hlo.count_collectives(self.compiled.as_text()).values())


def main() -> None:
    devices = jax.devices()
    if len(devices) != ARGS.devices:
        raise SystemExit(f"asked for {ARGS.devices} devices, jax has {len(devices)}: {devices}")
    if ARGS.width % ARGS.devices:
        raise SystemExit(f"--width must be a multiple of --devices, got {ARGS.width}")
    if ARGS.steps % ARGS.k:
        raise SystemExit(f"--steps must be a multiple of --k, got {ARGS.steps} and {ARGS.k}")
    mesh = Mesh(np.array(devices), ("fsdp",))
    fsdp = NamedSharding(mesh, PartitionSpec("fsdp"))
    rng = np.random.RandomState(0)
    shape = (ARGS.width, ARGS.width)
    params = {f"w{i}": rng.normal(size=shape).astype(np.float32) for i in range(ARGS.layers)}
    grads = {name: rng.normal(size=shape).astype(np.float32) * 1e-3 for name in params}
    params, grads = jax.device_put((params, grads), fsdp)

    contenders = {
        "adam": Contender(optax.adam(1e-3), params, grads, mesh),
        "lookahead(adam)": Contender(lo.lookahead(optax.adam(1e-3), k=ARGS.k), params, grads, mesh),
    }
    for contender in contenders.values():  # warm-up
        contender.run(ARGS.steps)

    seconds = {name: [] for name in contenders}
    for r in range(ARGS.rounds):
        names = list(contenders) if r % 2 == 0 else list(reversed(contenders))
        for name in names:
            seconds[name].append(contenders[name].run(ARGS.steps))
    ratios = [la / inner for la, inner in zip(seconds["lookahead(adam)"], seconds["adam"])]

    device = devices[0]
    lookahead_state = contenders["lookahead(adam)"].state
    results = {
        "config": {
            "devices": ARGS.devices,
            "emulated_cpu_devices": jax.default_backend() == "cpu",
            "params": ARGS.layers * ARGS.width * ARGS.width,
            "params_shape": [ARGS.layers, *shape],
            "k": ARGS.k,
            "rounds": ARGS.rounds,
            "steps_per_round": ARGS.steps,
        },
        "machine": machine_info(),
        "per_device": {
            "params_bytes": bytes_on(device, params),
            "slow_bytes": bytes_on(device, lookahead_state.slow),
            "slow_bytes_all_devices": [bytes_on(d, lookahead_state.slow) for d in devices],
            "slow_bytes_if_replicated": sum(x.nbytes for x in jax.tree.leaves(params)),
        },
        "contenders": {
            name: {
                "state_bytes_per_device": bytes_on(device, contender.state),
                "compiled_step": contender.memory(),
                "collectives": contender.collectives(),
                "step_median_s": statistics.median(seconds[name]),
                "step_min_s": min(seconds[name]),
            }
            for name, contender in contenders.items()
        },
        "step_time_ratio": {
            "median": statistics.median(ratios),
            "min": min(ratios),
            "max": max(ratios),
        },
    }
    ARGS.out.parent.mkdir(parents=True, exist_ok=True)
    ARGS.out.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    print(f"wrote {ARGS.out}")


def print_table(results: dict) -> None:
    mib = 2.0**20
    config, per_device = results["config"], results["per_device"]
    kind = "emulated CPU devices" if config["emulated_cpu_devices"] else "devices"
    print(f"{config['params'] / 1e6:.1f}M float32 params, FSDP over {config['devices']} {kind}")
    print(
        f"per device: params {per_device['params_bytes'] / mib:.2f} MiB, "
        f"slow weights {per_device['slow_bytes'] / mib:.2f} MiB "
        f"(replicated they would take {per_device['slow_bytes_if_replicated'] / mib:.2f} MiB)"
    )
    header = ("optimizer", "state MiB/dev", "args MiB", "temp MiB", "collectives", "step ms")
    print("{:<16} {:>13} {:>9} {:>9} {:>11} {:>8}".format(*header))
    for name, row in results["contenders"].items():
        memory = row["compiled_step"]
        print(
            f"{name:<16} {row['state_bytes_per_device'] / mib:>13.2f} "
            f"{memory['argument_bytes'] / mib:>9.2f} {memory['temp_bytes'] / mib:>9.2f} "
            f"{row['collectives']:>11d} {row['step_median_s'] * 1e3:>8.2f}"
        )
    ratio = results["step_time_ratio"]
    print(
        f"step time lookahead / adam: median {ratio['median']:.3f} "
        f"(min {ratio['min']:.3f}, max {ratio['max']:.3f}, {config['rounds']} rounds)"
    )


def workers_main() -> None:
    """One worker per device: the workers' sync against the vmapped inner step."""
    from jax.sharding import AxisType

    devices = jax.devices()
    n = ARGS.devices
    if len(devices) != n:
        raise SystemExit(f"asked for {n} devices, jax has {len(devices)}: {devices}")
    per_leaf = int(ARGS.params) // ARGS.leaves // n
    nesterov = optax.sgd(0.7, momentum=0.9, nesterov=True)
    makers = {
        "vmap(adam)": lambda: optax.GradientTransformation(
            jax.vmap(optax.adam(1e-4).init), jax.vmap(optax.adam(1e-4).update)
        ),
        # sync_stats=False is the default since 0.4.0.
        "workers alpha": lambda: lo.lookahead(optax.adam(1e-4), k=ARGS.k, workers=n),
        "workers alpha, sync_stats": lambda: lo.lookahead(
            optax.adam(1e-4), k=ARGS.k, workers=n, sync_stats=True
        ),
        "workers nesterov": lambda: lo.lookahead(
            optax.adam(1e-4), k=ARGS.k, workers=n, outer=nesterov
        ),
        "workers nesterov, sync_stats": lambda: lo.lookahead(
            optax.adam(1e-4), k=ARGS.k, workers=n, outer=nesterov, sync_stats=True
        ),
    }
    results = {
        "config": {
            "devices": n,
            "emulated_cpu_devices": jax.default_backend() == "cpu",
            "params": per_leaf * n * ARGS.leaves,
            "leaves": ARGS.leaves,
            "leaf_shape": [n, per_leaf],
            "k": ARGS.k,
            "rounds": ARGS.rounds,
            "steps_per_round": ARGS.steps,
        },
        "machine": {**machine_info(), "load_average": os.getloadavg()},
        "meshes": {},
    }
    for axis_type in (AxisType.Explicit, AxisType.Auto):
        mesh = jax.make_mesh((n,), ("workers",), axis_types=(axis_type,))
        sharding = NamedSharding(mesh, PartitionSpec("workers"))
        params = {
            f"w{i}": jax.device_put(np.full((n, per_leaf), 0.01 * (i + 1), np.float32), sharding)
            for i in range(ARGS.leaves)
        }
        grads = jax.tree.map(lambda p: p * 0 + 1e-3, params)
        slow_bytes = sum(x.nbytes for x in jax.tree.leaves(params)) // n
        runs, rows = {}, {}
        with jax.set_mesh(mesh):
            for name, make in makers.items():
                tx = make()
                state = jax.jit(tx.init)(jax.tree.map(jnp_copy, params))
                if name == "vmap(adam)":  # vmap needs the per-worker counts sharded too
                    state = jax.device_put(state, sharding)

                def step(params, state, grads, tx=tx):
                    updates, state = tx.update(grads, state, params)
                    return optax.apply_updates(params, updates), state

                # Two eager calls first: on an Auto mesh the state init returns need not carry
                # the shardings the step propagates; compile for the ones a run settles on.
                jitted = jax.jit(step, donate_argnums=(0, 1))
                steady = (jax.tree.map(jnp_copy, params), state)
                for _ in range(2):
                    steady = jitted(*steady, grads)
                compiled = jitted.lower(*steady, grads).compile()
                hlo = compiled.as_text()
                collective = _hlo.collective_bytes(hlo)
                sync_bytes = max((max(b) for b in collective["branches"]), default=0)
                rows[name] = {
                    "temp_bytes_per_device": int(compiled.memory_analysis().temp_size_in_bytes),
                    "every_step_collective_bytes": collective["every_step"],
                    "sync_all_reduce_bytes": sync_bytes,
                    "sync_all_reduce_vs_slow_bytes": sync_bytes / slow_bytes,
                    "collective_ops": collective["ops"],
                }
                runs[name] = [compiled, *steady, grads]
            seconds = {name: [] for name in runs}
            for run in runs.values():  # warm-up
                time_block(run, ARGS.k)
            for r in range(ARGS.rounds):
                names = list(runs)[r % len(runs) :] + list(runs)[: r % len(runs)]
                for name in names:
                    seconds[name].append(time_block(runs[name], ARGS.steps))
        base = seconds["vmap(adam)"]
        for name in runs:
            ratios = [a / b for a, b in zip(seconds[name], base)]
            rows[name]["step_median_s"] = statistics.median(seconds[name])
            rows[name]["ratio_vs_vmap_adam"] = {
                "median": statistics.median(ratios),
                "min": min(ratios),
                "max": max(ratios),
            }
        results["meshes"][str(axis_type).split(".")[-1]] = rows
        del runs
    results["machine"]["load_average_after"] = os.getloadavg()
    ARGS.out.parent.mkdir(parents=True, exist_ok=True)
    ARGS.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"{results['config']['params'] / 1e6:.0f}M float32 params, {n} workers on {n} devices")
    print("| mesh | contender | k-mean / vmap(adam) | sync all-reduce (x slow) | temp/device |")
    print("|---|---|---|---|---|")
    for mesh_name, rows in results["meshes"].items():
        for name, row in rows.items():
            ratio = row["ratio_vs_vmap_adam"]
            print(
                f"| {mesh_name} | {name} | {ratio['median']:.2f}x ({ratio['min']:.2f}-"
                f"{ratio['max']:.2f}) | {row['sync_all_reduce_vs_slow_bytes']:.2f} "
                f"| {row['temp_bytes_per_device'] / 2**20:.1f} MiB |"
            )
    print(f"wrote {ARGS.out}")


def jnp_copy(x):
    return x.copy()


def time_block(run: list, steps: int) -> float:
    """Seconds per step of ``steps`` steps of ``run`` = [compiled, params, state, grads]."""
    compiled, params, state, grads = run
    jax.block_until_ready((params, state))
    start = time.perf_counter()
    for _ in range(steps):
        params, state = compiled(params, state, grads)
    jax.block_until_ready((params, state))
    run[1], run[2] = params, state
    return (time.perf_counter() - start) / steps


if __name__ == "__main__":
    workers_main() if ARGS.workers else main()

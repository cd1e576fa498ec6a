"""This tree's lookahead against an earlier commit's, side by side in one process.

The earlier package is taken from git (``git archive REF lookahead_optax``) into a
temporary directory under another module name, so both versions are imported at
once and timed in interleaved rounds (the order rotates), one ratio per round:
``this tree / REF`` for ``tx.update`` + ``apply_updates`` and for
``update_and_apply``, params and state donated, synthetic fixed gradients.

    python benchmarks/before_after.py --ref 9693e0a     # 0.2.0, before the 0.3.0 rewrite
    python benchmarks/before_after.py --quick

Results: printed, and written to ``--out`` (default ``runs/before_after.json``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import interleaved_rounds, machine_info, ratio_summary  # noqa: E402
from speed import Runner, compile_step, parse_size, steps_per_block  # noqa: E402

import lookahead_optax as lo  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
INNERS = {"adam": lambda: optax.adam(1e-4), "sgdm": lambda: optax.sgd(1e-4, momentum=0.9)}


def import_ref(ref: str, where: Path):
    """The package at git ``ref``, importable as ``lookahead_optax_ref``."""
    archive = subprocess.run(
        ["git", "archive", ref, "lookahead_optax"], cwd=ROOT, check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(where)], input=archive, check=True)
    package = where / "lookahead_optax_ref"
    (where / "lookahead_optax").rename(package)
    for path in package.glob("*.py"):
        path.write_text(path.read_text().replace("lookahead_optax.", "lookahead_optax_ref."))
    sys.path.insert(0, str(where))
    return importlib.import_module("lookahead_optax_ref")


def step_fn(library, tx, fused: bool):
    def step(params, opt_state, grads):
        if fused:
            return library.update_and_apply(tx, grads, opt_state, params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return step


def bench(total, leaves, inner_name, ref_lib, args):
    per_leaf = total // leaves
    params = {f"w{i:02d}": jnp.full((per_leaf,), 0.01 * (i + 1)) for i in range(leaves)}
    grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params)
    runners = {}
    for version, library in (("this", lo), ("ref", ref_lib)):
        for fused in (False, True):
            tx = library.lookahead(INNERS[inner_name](), k=args.k, alpha=0.5)
            state = tx.init(jax.tree.map(jnp.copy, params))
            compiled, stats = compile_step(
                step_fn(library, tx, fused), jax.tree.map(jnp.copy, params), state, grads, loop=0
            )
            name = f"{version}/{'update_and_apply' if fused else 'tx.update'}"
            runners[name] = Runner(
                compiled, jax.tree.map(jnp.copy, params), state, grads, steps=args.k
            )
    seconds_per_step = min(runner.run(args.k)[0] for runner in runners.values())
    steps = steps_per_block(seconds_per_step, args.block_seconds, args.k)
    for runner in runners.values():
        runner.steps = steps
    seconds = interleaved_rounds(runners, args.rounds)
    return {
        path: ratio_summary(seconds[f"this/{path}"], seconds[f"ref/{path}"])
        for path in ("tx.update", "update_and_apply")
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ref", default="9693e0a")
    parser.add_argument("--sizes", default="16M/8,2M/64")
    parser.add_argument("--inners", default="adam,sgdm")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--block-seconds", type=float, default=0.3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "before_after.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.rounds, args.block_seconds = "64K/4", 3, 0.02
    with tempfile.TemporaryDirectory() as where:
        ref_lib = import_ref(args.ref, Path(where))
        results = []
        for size in args.sizes.split(","):
            total, leaves = parse_size(size)
            for inner in args.inners.split(","):
                ratios = bench(total, leaves, inner, ref_lib, args)
                results.append({"size": size, "inner": inner, "this_over_ref": ratios})
                print(
                    f"{size} {inner}: this/{args.ref} "
                    + ", ".join(
                        f"{path} {r['median']:.3f}x ({r['min']:.2f}-{r['max']:.2f})"
                        for path, r in ratios.items()
                    ),
                    flush=True,
                )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"machine": machine_info(), "ref": args.ref, "k": args.k, "results": results}
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()

"""benchmarks/diloco.py: the bytes it reports come from the compiled HLO, and its DiLoCo loss
is the loss at lo.slow_params."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from tests.helpers import version

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

if version(jax) < (0, 9):
    # The test extra has the core's jax floor; the bench extra's is 0.9.0.
    pytest.skip(
        "benchmarks/diloco.py needs jax >= 0.9.0 (jax.lax.pcast), the bench extra's floor",
        allow_module_level=True,
    )

import diloco  # noqa: E402

MLP_PARAMS = (64 * 256 + 256) + (256 * 256 + 256) + (256 * 10 + 10)  # 85,002


# ------------------------------------------------------------------- the --quick run


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("diloco")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "diloco.py"), "--quick", "--task", "digits",
         "--out", str(out), "--no-progress"],
        check=True, env=env, cwd=ROOT, timeout=900,
    )  # fmt: skip
    report = json.loads((out / "diloco_digits_quick.json").read_text())
    assert (out / "diloco_digits_quick.md").is_file() and (
        out / "diloco_digits_quick.png"
    ).stat().st_size > 0
    return report, np.load(out / "diloco_digits_quick_final.npz")


@pytest.mark.slow
def test_bytes_are_one_params_worth_per_dp_step_and_per_diloco_sync(quick):
    report, _ = quick
    task = report["tasks"]["digits"]
    steps, params_bytes = task["config"]["steps"], task["params_bytes"]
    assert params_bytes == 4 * MLP_PARAMS
    dp = task["methods"]["dp"]
    assert dp["hlo"]["every_step"] == params_bytes  # the gradient all-reduce
    assert not any(any(branch) for branch in dp["hlo"]["branches"])
    assert dp["bytes"] == params_bytes * steps
    diloco_runs = [m for m in task["methods"].values() if m["kind"] != "dp"]
    assert {m["kind"] for m in diloco_runs} == {"nesterov", "average"}
    assert any(steps % m["k"] for m in diloco_runs)  # one run ends mid-cycle
    for method in diloco_runs:
        hlo = method["hlo"]
        assert hlo["every_step"] == 0, "no collective outside the sync"
        assert sorted(map(sorted, hlo["branches"])) == [[0, params_bytes]]
        assert hlo["syncs"] == steps // method["k"]
        assert method["bytes"] == params_bytes * (steps // method["k"])
        for curve in method["curves"]:
            for point in curve:
                assert point["bytes"] == params_bytes * (point["step"] // method["k"])
        equal = method["dp_at_equal_bytes"]
        dp_curve = {p["step"]: p["bytes"] for p in dp["curves"][0]}
        assert dp_curve[equal["step"]] == method["bytes"]


@pytest.mark.slow
def test_the_reported_diloco_loss_is_the_loss_at_the_slow_weights(quick):
    report, arrays = quick
    task_report = report["tasks"]["digits"]
    steps = task_report["config"]["steps"]
    task = diloco.DigitsTask()
    treedef = jax.tree.structure(task.init(0))
    evaluate = jax.jit(task.evaluate)

    def tree(name, seed, which):
        prefix = f"digits/{name}/{seed}/{which}/"
        leaves = [arrays[prefix + str(i)] for i in range(treedef.num_leaves)]
        return jax.tree.unflatten(treedef, leaves)

    checked = 0
    for name, method in task_report["methods"].items():
        if method["kind"] == "dp":
            continue
        for seed, reported in enumerate(method["final"]["loss"]["per_seed"]):
            slow, params = tree(name, seed, "slow"), tree(name, seed, "params")
            assert jax.tree.leaves(params)[0].shape[0] == diloco.WORKERS
            np.testing.assert_allclose(float(evaluate(slow)["loss"]), reported, rtol=1e-5)
            mean = jax.tree.map(lambda p: p.mean(0), params)
            if steps % method["k"]:  # mid-cycle: the workers have moved off the slow weights
                assert abs(float(evaluate(mean)["loss"]) - reported) > 1e-4
            else:  # just synced: every worker sits on the slow weights (to an ulp)
                for p, s in zip(jax.tree.leaves(params), jax.tree.leaves(slow)):
                    np.testing.assert_allclose(p, np.broadcast_to(s, p.shape), rtol=1e-6,
                                               atol=1e-7)  # fmt: skip
            checked += 1
    assert checked == 2 * len(task_report["methods"]) - 2

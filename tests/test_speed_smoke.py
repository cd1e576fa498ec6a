"""Smoke test of benchmarks/speed.py --quick: it runs and writes a complete JSON report.

No timing is asserted (timings belong to the benchmark, not the tests); only that every
ratio the report promises is there and finite.
"""

import json
import math
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # runs the speed benchmark
BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
OURS = ("lookahead_optax", "update_and_apply")
OUTERS = ("outer=sgd", "outer=nesterov", "outer=nesterov+fused")
RATIO_KEYS = (
    "ratio_vs_inner",
    "cpu_ratio_vs_inner",
    "speedup_vs_optax_lookahead",
    "cpu_speedup_vs_optax_lookahead",
)


@pytest.mark.parametrize("loop", [[], ["--loop", "2"]], ids=["per_step", "looped"])
def test_quick_mode_writes_finite_ratios_for_every_contender(tmp_path, loop):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import speed
    finally:
        sys.path.remove(str(BENCHMARKS))
    out = tmp_path / "speed.json"
    speed.main(
        ["--quick", "--no-e2e", "--sizes", "20K/4", "--rounds", "2", "--out", str(out), *loop]
    )
    report = json.loads(out.read_text())

    assert {"jax", "optax", "cpu", "cpu_cores", "platform"} <= set(report["machine"])
    assert [(r["inner"], r["leaves"]) for r in report["results"]] == [("adam", 4), ("sgdm", 4)]
    for result in report["results"]:
        ratios = [
            result["ratio_vs_inner"]["optax.lookahead"]["median"],
            *(result[key][name]["median"] for key in RATIO_KEYS for name in OURS),
            *(result["compile_ratio_vs_inner"][name] for name in OURS),
        ]
        assert all(math.isfinite(r) and r > 0 for r in ratios)
        assert result["ratio_vs_inner"]["lookahead_optax"]["rounds"] == 2
        stats = result["stats"]
        assert set(stats) == {"inner", *OURS, "optax.lookahead", "inner+copy", *OUTERS}
        copy_bytes = stats["inner+copy"]["state_bytes"] - stats["inner"]["state_bytes"]
        assert copy_bytes == result["params_bytes"]
        # The state sizes follow from the definitions: + one params copy for lookahead.
        # (+ count, syncs and period: three int32 scalars; + Nesterov's momentum trace.)
        for name, copies in [*((name, 1) for name in OURS), ("outer=sgd", 1),
                             ("outer=nesterov", 2), ("outer=nesterov+fused", 2)]:  # fmt: skip
            assert stats[name]["state_bytes"] - stats["inner"]["state_bytes"] == (
                copies * result["params_bytes"] + 12
            )

"""Smoke test of benchmarks/speed.py --quick: it runs and writes a complete JSON report.

No timing is asserted (timings belong to the benchmark, not the tests); only that every
ratio the report promises is there and finite.
"""

import json
import math
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def test_quick_mode_writes_finite_ratios_for_every_contender(tmp_path):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import speed
    finally:
        sys.path.remove(str(BENCHMARKS))
    out = tmp_path / "speed.json"
    speed.main(["--quick", "--no-e2e", "--sizes", "20K/4", "--rounds", "2", "--out", str(out)])
    report = json.loads(out.read_text())

    assert {"jax", "optax", "cpu", "cpu_cores", "platform"} <= set(report["machine"])
    assert [(r["inner"], r["leaves"]) for r in report["results"]] == [("adam", 4), ("sgdm", 4)]
    for result in report["results"]:
        ratios = [
            result["ratio_vs_inner"]["lookahead_optax"]["median"],
            result["ratio_vs_inner"]["optax.lookahead"]["median"],
            result["cpu_ratio_vs_inner"]["lookahead_optax"]["median"],
            result["speedup_vs_optax_lookahead"]["median"],
            result["compile_ratio_vs_inner"]["lookahead_optax"],
        ]
        assert all(math.isfinite(r) and r > 0 for r in ratios)
        assert result["ratio_vs_inner"]["lookahead_optax"]["rounds"] == 2
        stats = result["stats"]
        assert set(stats) == {"inner", "lookahead_optax", "optax.lookahead"}
        # The state sizes follow from the definitions: + one params copy for lookahead.
        assert stats["lookahead_optax"]["state_bytes"] - stats["inner"]["state_bytes"] == (
            result["params_bytes"] + 8
        )

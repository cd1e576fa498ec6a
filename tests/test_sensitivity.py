"""benchmarks/sensitivity.py: the good-range arithmetic by hand, and the --quick run's shape
and one trajectory against the independent reference (tests/reference.py)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import reference  # noqa: E402
import sensitivity  # noqa: E402

# ------------------------------------------------------------------ good_range, by hand

LRS = [1e-3, 1e-2, 1e-1, 1.0, 10.0]  # log10: -3, -2, -1, 0, 1
LOSSES = [1.5, 1.02, 1.0, 1.1, math.nan]  # best 1.0 at lr 0.1; 10.0 diverged


def test_good_range_of_a_loss_within_5_percent():
    # threshold 1.05. Left: 1.02 is inside, 1.5 (at -3) outside: the line from (-2, 1.02)
    # to (-3, 1.5) crosses 1.05 at -2 - 0.03 / 0.48 = -2.0625. Right: 1.1 (at 0) is
    # outside: the line from (-1, 1.0) to (0, 1.1) crosses 1.05 at -0.5.
    r = sensitivity.good_range(LRS, LOSSES, 0.05)
    assert r["best"] == 1.0 and r["best_lr"] == pytest.approx(0.1)
    assert r["threshold"] == pytest.approx(1.05)
    assert r["low"] == pytest.approx(10**-2.0625)
    assert r["high"] == pytest.approx(10**-0.5)
    assert r["decades"] == pytest.approx(1.5625)
    assert r["points"] == 2
    assert not r["open_low"] and not r["open_high"]


def test_good_range_of_a_loss_within_1_percent():
    # threshold 1.01: both neighbours are outside. Left: (-1, 1.0) to (-2, 1.02) crosses at
    # -1.5; right: (-1, 1.0) to (0, 1.1) at -0.9. Width 0.6 decades, one grid point.
    r = sensitivity.good_range(LRS, LOSSES, 0.01)
    assert (r["low"], r["high"]) == (pytest.approx(10**-1.5), pytest.approx(10**-0.9))
    assert r["decades"] == pytest.approx(0.6)
    assert r["points"] == 1


def test_good_range_of_an_accuracy():
    # best 0.92 at -1; threshold 0.92 * 0.95 = 0.874. Left: 0.9 inside; (-2, 0.9) to (-3, 0.5)
    # crosses at -2 - 0.026 / 0.4 = -2.065. Right: (-1, 0.92) to (0, 0.6) crosses at
    # -1 + 0.046 / 0.32 = -0.85625.
    r = sensitivity.good_range(LRS[:4], [0.5, 0.9, 0.92, 0.6], 0.05, higher_is_better=True)
    assert r["threshold"] == pytest.approx(0.874)
    assert r["low"] == pytest.approx(10**-2.065)
    assert r["high"] == pytest.approx(10**-0.85625)
    assert r["decades"] == pytest.approx(1.20875)


def test_good_range_at_the_grid_end_and_next_to_a_divergence():
    # Inside up to the grid's first point: the low edge is that point, flagged open.
    r = sensitivity.good_range(LRS[:3], [1.0, 1.005, 2.0], 0.01)
    assert r["low"] == pytest.approx(1e-3) and r["open_low"] and not r["open_high"]
    # A diverged neighbour (NaN or inf) gives no line to cross: the edge is the last
    # point inside, and the range is not open.
    r = sensitivity.good_range(LRS[:3], [math.inf, 1.0, 1.0], 0.01)
    assert r["low"] == pytest.approx(1e-2) and not r["open_low"]
    assert r["high"] == pytest.approx(1e-1) and r["open_high"]
    assert r["decades"] == pytest.approx(1.0)


def test_good_range_refuses_unsorted_or_all_diverged():
    with pytest.raises(ValueError, match="increasing"):
        sensitivity.good_range([0.1, 0.01], [1.0, 2.0], 0.01)
    with pytest.raises(ValueError, match="non-finite"):
        sensitivity.good_range([0.01, 0.1], [math.nan, math.inf], 0.01)


def test_early_stopped_skips_evaluations_after_a_divergence():
    curves = np.array([[3.0, 1.0, 2.0], [2.0, math.nan, math.nan], [math.nan] * 3])
    np.testing.assert_array_equal(sensitivity.early_stopped(curves)[:2], [1.0, 2.0])
    assert math.isnan(sensitivity.early_stopped(curves)[2])


def test_task_relabels_exactly_the_noisy_fraction_to_other_classes():
    task = sensitivity.make_task(300, 0.2)
    from _data import load_digits

    data = load_digits()
    order = np.random.default_rng(0).permutation(len(data.y_train))
    clean = data.y_train[order[:300]]
    np.testing.assert_array_equal(task["x_train"], data.x_train[order[:300]])
    assert int((task["y_train"] != clean).sum()) == 60
    assert task["x_held"].shape[0] == len(data.y_test) + len(data.y_train) - 300


# ------------------------------------------------------------------- the --quick run


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("sensitivity")
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "sensitivity.py"), "--quick", "--out",
         str(out), "--no-progress"],
        check=True, cwd=ROOT, timeout=900,
    )  # fmt: skip
    assert (out / "sensitivity_quick.md").is_file()
    assert (out / "sensitivity_quick.png").stat().st_size > 0
    return json.loads((out / "sensitivity_quick.json").read_text())


@pytest.mark.slow
def test_quick_run_has_every_method_lr_seed_and_grid_cell(quick):
    cfg = sensitivity.QUICK
    assert list(quick["sweep"]) == list(sensitivity.METHODS)
    assert quick["command"].startswith("python benchmarks/sensitivity.py --quick")
    assert quick["machine"]["cpu_cores"] >= 1
    for name, result in quick["sweep"].items():
        inner = sensitivity.METHODS[name][0]
        lrs = [p["lr"] for p in result["points"]]
        np.testing.assert_allclose(lrs, cfg["lrs"][inner])
        for point in result["points"]:
            assert len(point["loss"]["per_seed"]) == cfg["seeds"]
            assert len(point["accuracy"]["per_seed"]) == cfg["seeds"]
        curves = np.array(result["loss_curves"], dtype=float)
        assert curves.shape == (len(lrs), cfg["seeds"], cfg["steps"] // cfg["chunk"])
        # the final evaluation is the reported final loss
        np.testing.assert_allclose(
            curves[..., -1], [p["loss"]["per_seed"] for p in result["points"]]
        )
        # the reported ranges are good_range of the reported seed means
        means = [p["loss"]["mean"] for p in result["points"]]
        assert result["ranges"]["loss_5pct"] == pytest.approx(
            sensitivity.good_range(lrs, means, 0.05)
        )
        assert set(result["ranges"]) == {
            f"{m}_{p}pct" for m in ("loss", "accuracy", "early_loss") for p in (1, 5)
        }
    assert set(quick["grid"]) == {"sgd_x1", "sgd_x4", "adam_x1", "adam_x4"}
    for grid in quick["grid"].values():
        assert len(grid["loss"]) == len(cfg["grid_ks"])
        assert all(len(row) == len(cfg["grid_alphas"]) for row in grid["loss"])
        assert grid["lr"] == pytest.approx(
            grid["factor"] * quick["sweep"][grid["inner"]]["ranges"]["loss_1pct"]["best_lr"]
        )


@pytest.mark.slow
def test_quick_grid_alpha_1_is_the_inner_optimizer_of_the_sweep(quick):
    """alpha = 1 recovers the inner optimizer: where the run ends on a sync (steps a multiple
    of k), the grid's alpha = 1 cells at the best lr reproduce the sweep's inner-alone runs
    at that lr, seed by seed; where it does not, the slow weights evaluated are those of the
    last sync, behind the inner optimizer's final weights."""
    steps = sensitivity.QUICK["steps"]
    ks = sensitivity.QUICK["grid_ks"]
    assert any(steps % k == 0 for k in ks) and any(steps % k for k in ks)
    for inner in ("sgd", "adam"):
        grid = quick["grid"][f"{inner}_x1"]
        alone = grid["inner_alone_from_sweep"]
        assert alone is not None
        column = grid["alphas"].index(1.0)
        for k, row in zip(grid["ks"], grid["loss"]):
            cell = row[column]["per_seed"]
            if steps % k == 0:
                # phi + 1 * (theta - phi) is theta up to an ulp, which 18 steps at a large lr
                # amplify to ~3e-4; a wrong cell (another lr or alpha) is off by far more
                np.testing.assert_allclose(cell, alone["per_seed"], rtol=2e-3)
            else:
                assert np.all(np.abs(np.subtract(cell, alone["per_seed"])) > 1e-3)


@pytest.mark.slow
def test_quick_lookahead_sgd_matches_the_reference_algorithm(quick):
    """One reported number recomputed independently: Lookahead(k=5, alpha=0.5) around
    SGD+momentum at lr 0.1, seed 1, run by tests/reference.py (float64, Algorithm 1) on the
    same model, data and batch order, then its slow weights evaluated on the held-out set."""
    cfg = sensitivity.QUICK
    task = sensitivity.make_task(cfg["train_size"], cfg["label_noise"])
    model = sensitivity.MLP(task["num_classes"])
    seed, lr_index = 1, 1
    lr = float(cfg["lrs"]["sgd"][lr_index])
    params0 = model.init(jax.random.key(seed), jnp.asarray(task["x_train"][:1]))
    treedef = jax.tree.structure(params0)
    order = sensitivity.batch_order(seed, cfg["steps"], cfg["batch_size"], len(task["y_train"]))
    x, y = jnp.asarray(task["x_train"]), jnp.asarray(task["y_train"])

    def loss(params, xb, yb):
        return sensitivity._cross_entropy(model.apply(params, xb), yb).mean()

    grad = jax.jit(jax.grad(loss))
    step = iter(range(cfg["steps"]))

    def grad_fn(leaves):
        batch = order[next(step)]
        tree = jax.tree.unflatten(treedef, [jnp.asarray(p, jnp.float32) for p in leaves])
        return [np.asarray(g, np.float64) for g in jax.tree.leaves(grad(tree, x[batch], y[batch]))]

    _, slow = reference.lookahead_trajectory(
        jax.tree.leaves(params0), grad_fn, reference.Momentum(lr, 0.9), 5, 0.5, cfg["steps"]
    )
    final = jax.tree.unflatten(treedef, [jnp.asarray(p, jnp.float32) for p in slow[-1]])
    expected = float(loss(final, jnp.asarray(task["x_held"]), jnp.asarray(task["y_held"])))
    reported = quick["sweep"]["lookahead_sgd_a0.5"]["points"][lr_index]["loss"]["per_seed"][seed]
    assert reported == pytest.approx(expected, rel=2e-3)


# ------------------------------------------- benchmarks/diloco.py --outer-sweep --quick


@pytest.fixture(scope="module")
def outer_quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("diloco_outer")
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "diloco.py"), "--outer-sweep", "--quick",
         "--out", str(out), "--no-progress"],
        check=True, cwd=ROOT, timeout=900,
    )  # fmt: skip
    assert (out / "diloco_outer_quick.md").is_file()
    assert (out / "diloco_outer_quick.png").stat().st_size > 0
    report = json.loads((out / "diloco_outer_quick.json").read_text())
    return report | {"_out": out}


@pytest.mark.slow
def test_outer_sweep_reports_every_setting_and_the_winner_with_paired_margins(outer_quick):
    import diloco

    cfg = diloco.QUICK_OUTER_SWEEP
    assert list(outer_quick["per_k"]) == [str(k) for k in cfg["ks"]]
    runs = {(r["k"], r["inner_lr"], r["outer_lr"], r["momentum"]): r for r in outer_quick["runs"]}
    configs = diloco.outer_sweep_configs(cfg)
    assert len(configs) == sum(len(lrs) for lrs in cfg["inner_lrs"].values()) * len(
        cfg["outer_lrs"]
    )
    assert set(runs) == {(k, *config) for k in cfg["ks"] for config in configs}
    for run in runs.values():
        assert np.shape(run["loss"]) == (cfg["seeds"], cfg["steps"] // cfg["chunk"])
    for k, r in outer_quick["per_k"].items():
        assert r["syncs"] == cfg["steps"] // int(k)
        assert len(r["settings"]) == len(cfg["outer_lrs"]) * len(cfg["momenta"])
        for olr in cfg["outer_lrs"]:
            for mu in cfg["momenta"]:
                s = r["settings"][f"{olr:g}/{mu:g}"]
                finals = {lr: np.mean(runs[(int(k), lr, olr, mu)]["loss"], 0)[-1]
                          for lr in cfg["inner_lrs"][mu]}  # fmt: skip
                assert s["best_inner_lr"] == min(finals, key=finals.get)
                best_run = runs[(int(k), s["best_inner_lr"], olr, mu)]
                np.testing.assert_allclose(s["loss"]["per_seed"], np.array(best_run["loss"])[:, -1])
        means = {key: s["loss"]["mean"] for key, s in r["settings"].items()}
        assert r["winner"] == min(means, key=means.get)
        averaging = r["margins"]["averaging"]
        assert averaging["setting"] == "1/0"
        diff = np.subtract(r["settings"][r["winner"]]["loss"]["per_seed"],
                           r["settings"]["1/0"]["loss"]["per_seed"])  # fmt: skip
        assert averaging["winner_minus_it"]["mean"] == pytest.approx(diff.mean())
        assert averaging["winner_minus_it"]["a_lower_on"] == int((diff < 0).sum())


def _diloco_by_hand(task, seed, k, steps, batch_size, inner_lr, outer_lr, momentum, wd):
    """DiLoCo written out: 8 AdamW workers (optax.adamw, states kept across syncs), every k
    steps Delta = phi - mean of the workers, b <- mu b + Delta, phi <- phi - lr (Delta + mu b),
    and the workers restart at phi. No lookahead_optax."""
    import diloco
    import optax

    workers = diloco.WORKERS
    xs, ys = task.batches(seed, steps, batch_size)
    phi = task.init(seed)
    params = jax.tree.map(lambda p: jnp.stack([p] * workers), phi)
    adamw = optax.adamw(inner_lr, weight_decay=wd)
    states = jax.vmap(adamw.init)(params)
    buffer = jax.tree.map(jnp.zeros_like, phi)

    @jax.jit
    def inner_step(params, states, x, y):
        def one(p, s, xb, yb):
            u, s = adamw.update(jax.grad(task.loss)(p, xb, yb), s, p)
            return optax.apply_updates(p, u), s

        return jax.vmap(one)(params, states, x, y)

    for t in range(steps):
        params, states = inner_step(params, states, xs[t], ys[t])
        if (t + 1) % k == 0:
            delta = jax.tree.map(lambda f, p: f - p.mean(0), phi, params)
            buffer = jax.tree.map(lambda b, d: momentum * b + d, buffer, delta)
            phi = jax.tree.map(lambda f, d, b: f - outer_lr * (d + momentum * b), phi, delta,
                               buffer)  # fmt: skip
            params = jax.tree.map(lambda f: jnp.stack([f] * workers), phi)
    return float(task.evaluate(phi)["loss"])


@pytest.mark.slow
@pytest.mark.parametrize("setting", ["1/0", "0.7/0.9"])
def test_outer_sweep_cells_match_diloco_written_by_hand(outer_quick, setting):
    import diloco

    cfg = diloco.QUICK_OUTER_SWEEP
    task = diloco.DigitsTask()
    outer_lr, momentum = (float(v) for v in setting.split("/"))
    k, seed, inner_lr = cfg["ks"][0], 1, cfg["inner_lrs"][momentum][-1]
    expected = _diloco_by_hand(task, seed, k, cfg["steps"], cfg["batch_size"], inner_lr,
                               outer_lr, momentum, cfg["weight_decay"])  # fmt: skip
    cell = outer_quick["per_k"][str(k)]["settings"][setting]["by_inner_lr"][f"{inner_lr:g}"]
    assert cell["per_seed"][seed] == pytest.approx(expected, rel=1e-4)


@pytest.mark.slow
def test_outer_sweep_extend_adds_an_inner_lr_and_keeps_the_earlier_runs(outer_quick, tmp_path):
    import diloco

    (tmp_path / "diloco_outer_quick.json").write_text(
        (outer_quick["_out"] / "diloco_outer_quick.json").read_text()
    )
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "diloco.py"), "--outer-sweep", "--quick",
         "--extend", "--out", str(tmp_path), "--no-progress"],
        check=True, cwd=ROOT, timeout=900,
    )  # fmt: skip
    extended = json.loads((tmp_path / "diloco_outer_quick.json").read_text())
    cfg = diloco.QUICK_OUTER_SWEEP
    for momentum in cfg["momenta"]:
        expected = sorted({*cfg["inner_lrs"][momentum], *diloco.OUTER_SWEEP_EXTEND[momentum]})
        assert extended["config"]["inner_lrs"][str(momentum)] == expected
    before = {(r["k"], r["inner_lr"], r["outer_lr"], r["momentum"]): r for r in outer_quick["runs"]}
    after = {(r["k"], r["inner_lr"], r["outer_lr"], r["momentum"]): r for r in extended["runs"]}
    assert set(before) < set(after)
    assert all(after[key]["loss"] == run["loss"] for key, run in before.items())
    assert extended["command"].startswith(outer_quick["command"] + "; ")
    for k, r in extended["per_k"].items():
        for key, setting in r["settings"].items():
            assert list(setting["by_inner_lr"]) == [
                f"{lr:g}" for lr in extended["config"]["inner_lrs"][str(setting["momentum"])]
            ]

"""Learning-rate sensitivity: does Lookahead widen the range of good inner learning rates?

The Lookahead paper's central claim is robustness: with k = 5, alpha = 0.5 held fixed, the
inner optimizer's learning rate and momentum can vary over wide grids and Lookahead stays
good. This script measures that on a task that is not saturated, with the inner learning
rate swept over three decades:

* **Task.** scikit-learn's digits with the convergence benchmark's MLP (64-256-256-10), trained
  on a small subset (300 images of the training split, fixed) with 20% of those labels replaced
  by a different, random class (fixed). Held out: the 1497 other images (the test split and the
  unused rest of the training split), clean labels. Batch 32, 400 steps (about 43 epochs):
  enough to memorise the noisy labels at a good learning rate, so held-out loss rewards both
  fitting and not over-fitting.
* **Methods.** SGD+momentum (0.9) and Adam, alone, inside Lookahead (k = 5, alpha = 0.5 and
  0.8) and inside SNOO (k = 5, ``outer=optax.sgd(0.68, momentum=0.37, nesterov=True)``,
  modded-nanogpt's outer step), every wrapper around the same inner optimizer at the same
  learning rate. Lookahead and SNOO are evaluated at their slow weights (``lo.slow_params``);
  400 is a multiple of k, so every run ends on a sync.
* **Sweep.** 13 inner learning rates, a quarter decade apart: SGD 1e-3 .. 1, Adam 1e-4 .. 1e-1;
  5 seeds (each seed: its own initial weights and batch order, shared by every method and lr,
  so differences are paired). Reported per point: final held-out loss and accuracy, mean and
  sample std over seeds; per method: the best point and the **width of the good range**, the
  span (in decades of lr) of the contiguous stretch around the best where the seed-mean final
  held-out loss is within 1% (and 5%) of that method's best, its edges interpolated linearly
  in log10(lr) between the last point inside and the first outside (see :func:`good_range`).
  A diverged run (non-finite loss) counts as outside. The best point and the ranges are read
  on the same held-out set: this is a map of sensitivity, not a tuned comparison.
* **k x alpha grid.** At the inner optimizer's best learning rate (from the sweep) and at 4x
  it: k in {2, 5, 10, 20} x alpha in {0.2, 0.35, 0.5, 0.65, 0.8, 1.0} (alpha = 1 is the inner
  optimizer itself), 5 seeds. 400 steps is a multiple of every k.

Speed: every method is one ``jit``: the learning rates (and alphas) and seeds are ``vmap``
axes of one compiled function, the steps a ``lax.scan`` in chunks of 50 (the progress bar
moves per chunk), the held-out loss measured after each chunk.

    python benchmarks/sensitivity.py                         # sweep and grid: 31 min, 2 busy cores
    python benchmarks/sensitivity.py --quick                 # tiny, for tests (~1 min)
    python benchmarks/sensitivity.py --out benchmarks/results   # rewrite the committed results

Writes ``<out>/sensitivity[_quick].{json,md,png}`` (``--out`` defaults to
``runs/sensitivity/``, ignored by git).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from _data import load_digits  # noqa: E402
from _timing import machine_info  # noqa: E402
from convergence import MLP, _cross_entropy, _eval_params, _evaluate, _nan_to_none  # noqa: E402

import lookahead_optax as lo  # noqa: E402

MOMENTUM = 0.9  # SGD's
K = 5  # Lookahead's and SNOO's sync period in the sweep (the paper's)
SNOO_OUTER = (0.68, 0.37)  # outer lr and Nesterov momentum (modded-nanogpt's SNOO)
# name -> (inner, wrapper, alpha); wrapper "none" | "lookahead" | "snoo"
METHODS = {
    "sgd": ("sgd", "none", None),
    "lookahead_sgd_a0.5": ("sgd", "lookahead", 0.5),
    "lookahead_sgd_a0.8": ("sgd", "lookahead", 0.8),
    "snoo_sgd": ("sgd", "snoo", None),
    "adam": ("adam", "none", None),
    "lookahead_adam_a0.5": ("adam", "lookahead", 0.5),
    "lookahead_adam_a0.8": ("adam", "lookahead", 0.8),
    "snoo_adam": ("adam", "snoo", None),
}
FULL = {
    "train_size": 300,
    "label_noise": 0.2,
    "batch_size": 32,
    "steps": 400,
    "chunk": 50,
    "seeds": 5,
    "lrs": {"sgd": np.logspace(-3, 0, 13), "adam": np.logspace(-4, -1, 13)},
    "grid_ks": (2, 5, 10, 20),
    "grid_alphas": (0.2, 0.35, 0.5, 0.65, 0.8, 1.0),
    "grid_lr_factors": (1.0, 4.0),
}
QUICK = {
    "train_size": 120,
    "label_noise": 0.2,
    "batch_size": 16,
    "steps": 18,  # not a multiple of k = 5: the slow weights differ from the fast ones at the end
    "chunk": 9,
    "seeds": 2,
    "lrs": {"sgd": np.logspace(-2, 0, 3), "adam": np.logspace(-3, -1, 3)},
    "grid_ks": (2, 5),
    "grid_alphas": (0.5, 1.0),
    "grid_lr_factors": (1.0, 4.0),
}
TOLERANCES = (0.01, 0.05)
WIDE_TOLERANCES = (0.2, 0.5)  # in the Markdown only, computed from the stored seed means


# ------------------------------------------------------------------------------ data


def make_task(train_size: int, label_noise: float, split_seed: int = 0) -> dict:
    """The small, noisy digits task: train arrays, held-out arrays and what was done.

    ``train_size`` images of the digits training split (a fixed random subset), a fraction
    ``label_noise`` of them relabelled to a different class drawn at random; held out: the
    test split and the rest of the training split, clean.
    """
    data = load_digits()
    rng = np.random.default_rng(split_seed)
    order = rng.permutation(len(data.y_train))
    chosen, rest = order[:train_size], order[train_size:]
    x_train, y_train = data.x_train[chosen], data.y_train[chosen].copy()
    flipped = rng.permutation(train_size)[: int(round(label_noise * train_size))]
    shift = rng.integers(1, data.num_classes, size=len(flipped))  # never the true class
    y_train[flipped] = (y_train[flipped] + shift) % data.num_classes
    x_held = np.concatenate([data.x_test, data.x_train[rest]])
    y_held = np.concatenate([data.y_test, data.y_train[rest]])
    return {
        "x_train": x_train, "y_train": y_train, "x_held": x_held, "y_held": y_held,
        "num_classes": data.num_classes,
        "info": {"train_examples": int(train_size), "noisy_labels": int(len(flipped)),
                 "held_out_examples": int(len(y_held)),
                 "held_out": "digits test split + unused training images, clean labels"},
    }  # fmt: skip


def batch_order(seed: int, steps: int, batch_size: int, n_train: int) -> np.ndarray:
    """[steps, batch_size] example indices: reshuffled every epoch, the same for every method."""
    per_epoch = n_train // batch_size
    epochs = math.ceil(steps / per_epoch)
    rng = np.random.default_rng([seed, 7])
    order = np.concatenate(
        [rng.permutation(n_train)[: per_epoch * batch_size] for _ in range(epochs)]
    )
    return order[: steps * batch_size].reshape(steps, batch_size).astype(np.int32)


# ------------------------------------------------------------------------- optimizers


def make_tx(inner: str, wrapper: str, lr, alpha=None, k: int = K) -> optax.GradientTransformation:
    """One method's transformation; ``lr`` and ``alpha`` may be traced (vmapped) scalars."""
    if inner == "sgd":
        tx = optax.sgd(lr, momentum=MOMENTUM)
    elif inner == "adam":
        tx = optax.adam(lr)
    else:
        raise ValueError(f"inner must be one of ('sgd', 'adam'), got {inner!r}")
    if wrapper == "none":
        return tx
    if wrapper == "lookahead":
        return lo.lookahead(tx, k=k, alpha=alpha)
    if wrapper == "snoo":
        return lo.lookahead(
            tx, k=k, outer=optax.sgd(SNOO_OUTER[0], momentum=SNOO_OUTER[1], nesterov=True)
        )
    raise ValueError(f"wrapper must be one of ('none', 'lookahead', 'snoo'), got {wrapper!r}")


def train_grid(
    task: dict,
    inner: str,
    wrapper: str,
    hps: dict[str, np.ndarray],
    seeds: Sequence[int],
    cfg: dict,
    k: int = K,
    label: str = "",
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """Trains every (configuration, seed) pair at once; held-out metrics after each chunk.

    ``hps``: ``lr`` (and for Lookahead ``alpha``), arrays of one value per configuration C.
    Returns ``loss`` and ``accuracy``, float arrays [C, seeds, chunks]: the held-out loss
    and accuracy at the evaluated weights (slow weights for Lookahead and SNOO) after each
    chunk of ``cfg["chunk"]`` steps. One compiled function: configurations and seeds are
    vmapped, the steps scanned.
    """
    model = MLP(task["num_classes"])
    x_train, y_train = jnp.asarray(task["x_train"]), jnp.asarray(task["y_train"])
    x_held, y_held = jnp.asarray(task["x_held"]), jnp.asarray(task["y_held"])
    steps, chunk = cfg["steps"], cfg["chunk"]
    if steps % chunk:
        raise ValueError(f"steps ({steps}) must be a multiple of chunk ({chunk})")
    hps = {name: jnp.asarray(values, jnp.float32) for name, values in hps.items()}
    num_configs = len(hps["lr"])
    keys = jax.vmap(jax.random.key)(jnp.asarray(list(seeds)))
    init_params = jax.vmap(lambda key: model.init(key, x_train[:1]))(keys)  # [S, ...]
    orders = np.stack(
        [batch_order(seed, steps, cfg["batch_size"], len(task["y_train"])) for seed in seeds]
    )  # [S, steps, B]

    def tx_of(hp):
        return make_tx(inner, wrapper, hp["lr"], hp.get("alpha"), k)

    def loss_fn(params, x, y):
        return _cross_entropy(model.apply(params, x), y).mean()

    def init_one(hp, params):
        return params, tx_of(hp).init(params)

    def chunk_one(hp, params, opt_state, order):
        tx = tx_of(hp)

        def step(carry, batch):
            params, opt_state = carry
            grads = jax.grad(loss_fn)(params, x_train[batch], y_train[batch])
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), None

        (params, opt_state), _ = jax.lax.scan(step, (params, opt_state), order)
        loss, accuracy = _evaluate(model, _eval_params(params, opt_state), x_held, y_held)
        return params, opt_state, loss, accuracy

    # configs outside, seeds inside; the data order is per seed, shared by all configs
    init_all = jax.jit(jax.vmap(jax.vmap(init_one, in_axes=(None, 0)), in_axes=(0, None)))
    run_chunk = jax.jit(
        jax.vmap(jax.vmap(chunk_one, in_axes=(None, 0, 0, 0)), in_axes=(0, 0, 0, None)),
        donate_argnums=(1, 2),
    )
    params, opt_state = init_all(hps, init_params)
    losses, accuracies = [], []
    bar = tqdm(range(steps // chunk), desc=label, disable=not progress, leave=True)
    for c in bar:
        order = jnp.asarray(orders[:, c * chunk : (c + 1) * chunk])
        params, opt_state, loss, accuracy = run_chunk(hps, params, opt_state, order)
        losses.append(np.asarray(loss))
        accuracies.append(np.asarray(accuracy))
        finite = np.isfinite(losses[-1])
        bar.set_postfix(best=f"{np.nanmin(np.where(finite, losses[-1], np.nan)):.3f}"
                        if finite.any() else "nan", diverged=int((~finite).sum()))  # fmt: skip
    assert losses[-1].shape == (num_configs, len(seeds))
    return {"loss": np.stack(losses, -1), "accuracy": np.stack(accuracies, -1)}


# --------------------------------------------------------------------------- analysis


def summarise(values) -> dict:
    """mean, sample std (ddof=1) and per-seed values; non-finite values make mean and std NaN."""
    values = np.asarray(values, np.float64)
    finite = bool(np.isfinite(values).all())
    std = float(values.std(ddof=1)) if values.size > 1 and finite else (0.0 if finite else math.nan)
    return {"mean": float(values.mean()) if finite else math.nan, "std": std,
            "per_seed": values.tolist()}  # fmt: skip


def good_range(lrs, values, tolerance: float, higher_is_better: bool = False) -> dict:
    """The contiguous learning-rate range around the best where ``values`` stay near it.

    ``values`` (one per lr, lrs increasing; NaN or inf = diverged, always outside) are within
    ``tolerance`` of the best when ``v <= best * (1 + tolerance)`` (a loss) or ``v >= best *
    (1 - tolerance)`` (``higher_is_better``, e.g. accuracy). Starting at the best point, the
    range extends over neighbours inside; each edge lies between the last point inside and the
    first outside, where the straight line between their values (in log10(lr)) crosses the
    threshold (at the point inside if the one outside diverged). At the end of the grid the
    edge is the grid's end and ``open_low``/``open_high`` says the true range may be wider.

    Returns ``best_lr``, ``best``, ``threshold``, ``low`` and ``high`` (learning rates),
    ``decades`` (log10(high / low)), ``points`` (grid points inside) and the open flags.
    """
    x = np.log10(np.asarray(lrs, np.float64))
    v = np.asarray(values, np.float64)
    if np.any(np.diff(x) <= 0):
        raise ValueError(f"lrs must be increasing, got {lrs!r}")
    sign = -1.0 if higher_is_better else 1.0
    score = np.where(np.isfinite(v), sign * v, np.inf)  # lower is better
    if not np.isfinite(score).any():
        raise ValueError("every value is non-finite: no best point")
    i = int(np.argmin(score))
    best = v[i]
    threshold = best * (1 - tolerance) if higher_is_better else best * (1 + tolerance)
    inside = score <= sign * threshold + 1e-12 * abs(threshold)

    def edge(step: int) -> tuple[float, bool]:
        j = i
        while 0 <= j + step < len(x) and inside[j + step]:
            j += step
        out = j + step
        if not 0 <= out < len(x):
            return x[j], True
        if not np.isfinite(score[out]):
            return x[j], False
        t = (threshold - v[j]) / (v[out] - v[j])
        return x[j] + t * (x[out] - x[j]), False

    (low, open_low), (high, open_high) = edge(-1), edge(+1)
    lo_i, hi_i = i, i
    while lo_i - 1 >= 0 and inside[lo_i - 1]:
        lo_i -= 1
    while hi_i + 1 < len(x) and inside[hi_i + 1]:
        hi_i += 1
    return {
        "best_lr": float(10 ** x[i]), "best": float(best), "threshold": float(threshold),
        "low": float(10**low), "high": float(10**high), "decades": float(high - low),
        "points": int(hi_i - lo_i + 1), "open_low": open_low, "open_high": open_high,
    }  # fmt: skip


def early_stopped(curves: np.ndarray) -> np.ndarray:
    """Each run's lowest held-out loss over its evaluations (the last axis); non-finite
    evaluations (after a divergence) are skipped, NaN if all are."""
    finite = np.where(np.isfinite(curves), curves, np.inf)
    lowest = finite.min(axis=-1)
    return np.where(np.isfinite(lowest), lowest, np.nan)


def sweep_summary(lrs, loss, accuracy, early_loss=None) -> dict:
    """Per-lr summaries and the good ranges of one method; loss/accuracy are [lrs, seeds].

    ``early_loss`` (optional, [lrs, seeds]): each seed's lowest held-out loss over the
    evaluations during training (early stopping at the best evaluation), given its own ranges.
    """
    points = [
        {"lr": float(lr), "loss": summarise(loss[i]), "accuracy": summarise(accuracy[i])}
        | ({"early_loss": summarise(early_loss[i])} if early_loss is not None else {})
        for i, lr in enumerate(lrs)
    ]
    mean_loss = [p["loss"]["mean"] for p in points]
    mean_acc = [p["accuracy"]["mean"] for p in points]
    ranges = {
        f"loss_{round(100 * tol)}pct": good_range(lrs, mean_loss, tol) for tol in TOLERANCES
    } | {
        f"accuracy_{round(100 * tol)}pct": good_range(lrs, mean_acc, tol, higher_is_better=True)
        for tol in TOLERANCES
    }
    if early_loss is not None:
        mean_early = [p["early_loss"]["mean"] for p in points]
        ranges |= {
            f"early_loss_{round(100 * tol)}pct": good_range(lrs, mean_early, tol)
            for tol in TOLERANCES
        }
    stds = [p["loss"]["std"] for p in points if math.isfinite(p["loss"]["std"])]
    return {
        "points": points,
        "ranges": ranges,
        "diverged_lrs": [p["lr"] for p in points if not math.isfinite(p["loss"]["mean"])],
        "median_seed_std_loss": float(np.median(stds)) if stds else math.nan,
    }


# ----------------------------------------------------------------------------- reports


def _f(value: float, digits: int = 4) -> str:
    if not math.isfinite(value):
        return "diverged"
    return f"{value:.{digits}f}" if abs(value) < 100 else f"{value:.3g}"


def markdown(report: dict) -> str:
    cfg = report["config"]
    info = report["task"]
    lines = [
        f"Command: `{report['command']}`", "",
        f"Machine: {report['machine']['cpu']} ({report['machine']['cpu_cores']} cores, shared), "
        f"{report['machine']['platform']}, jax {report['machine']['jax']}, optax "
        f"{report['machine']['optax']}, Python {report['machine']['python']}; "
        f"{report['seconds']:.0f} s wall.", "",
        f"Task: digits MLP, {info['train_examples']} training images ({info['noisy_labels']} "
        f"relabelled wrongly), {info['held_out_examples']} held out ({info['held_out']}); batch "
        f"{cfg['batch_size']}, {cfg['steps']} steps, {cfg['seeds']} seeds. Lookahead and SNOO: "
        f"k = {K}, evaluated at the slow weights; SNOO's outer step: lr {SNOO_OUTER[0]}, Nesterov "
        f"momentum {SNOO_OUTER[1]}.", "",
        "### Width of the good learning-rate range", "",
        "| Method | best lr | best held-out loss | accuracy there (%) | loss within 1%: lr range "
        "(decades) | within 5% | accuracy within 1% | early-stopped loss within 5% | diverged "
        "at lr | median seed std of loss |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip

    def span(r):
        mark = lambda flag: "≥" if flag else ""  # noqa: E731
        return (f"{r['low']:.2g}–{r['high']:.2g} ({mark(r['open_low'] or r['open_high'])}"
                f"{r['decades']:.2f})")  # fmt: skip

    for name, result in report["sweep"].items():
        ranges = result["ranges"]
        best = ranges["loss_1pct"]
        at = next(p for p in result["points"] if p["lr"] == best["best_lr"])
        diverged = result["diverged_lrs"]
        lines.append(
            f"| {result['label']} | {best['best_lr']:.3g} | {_f(at['loss']['mean'])} ± "
            f"{_f(at['loss']['std'])} | {100 * at['accuracy']['mean']:.2f} ± "
            f"{100 * at['accuracy']['std']:.2f} | {span(ranges['loss_1pct'])} | "
            f"{span(ranges['loss_5pct'])} | {span(ranges['accuracy_1pct'])} | "
            f"{span(ranges['early_loss_5pct'])} (best {ranges['early_loss_5pct']['best']:.4f} "
            f"at {ranges['early_loss_5pct']['best_lr']:.3g}) | "
            f"{'≥ ' + format(min(diverged), '.3g') if diverged else 'none'} | "
            f"{result['median_seed_std_loss']:.4f} |"
        )
    lines += [
        "",
        "Wider tolerances (from the same seed means): the lr span where the final held-out loss "
        "is within 20% and 50% of the method's best.",
        "",
        "| Method | within 20% | within 50% |",
        "|---|---|---|",
    ]
    for result in report["sweep"].values():
        lrs = [p["lr"] for p in result["points"]]
        means = [p["loss"]["mean"] for p in result["points"]]
        wide = [span(good_range(lrs, means, tol)) for tol in WIDE_TOLERANCES]
        lines.append(f"| {result['label']} | " + " | ".join(wide) + " |")
    lines += [
        "",
        "Good range: the contiguous span around the best lr where the seed-mean final held-out "
        "loss is within 1% (5%) of the best (accuracy: within 1% of the best, relative), edges "
        "interpolated in log10(lr); ≥: the span reaches the end of the grid. Early-stopped: "
        f"each seed's lowest held-out loss over the {cfg['steps'] // cfg['chunk']} evaluations "
        f"(every {cfg['chunk']} steps). 'median seed std': the median over the lr grid of the "
        "sample std of the final loss over seeds.",
        "",
        "### Final held-out loss per learning rate (mean ± std over seeds)",
        "",
    ]
    for inner in ("sgd", "adam"):
        names = [n for n, r in report["sweep"].items() if r["inner"] == inner]
        lrs = [p["lr"] for p in report["sweep"][names[0]]["points"]]
        lines += ["| lr | " + " | ".join(report["sweep"][n]["label"] for n in names) + " |",
                  "|---" * (len(names) + 1) + "|"]  # fmt: skip
        for i, lr in enumerate(lrs):
            cells = []
            for n in names:
                p = report["sweep"][n]["points"][i]
                cells.append(f"{_f(p['loss']['mean'])} ± {_f(p['loss']['std'])} "
                             f"({100 * p['accuracy']['mean']:.1f}%)"
                             if math.isfinite(p["loss"]["mean"]) else "diverged")  # fmt: skip
            lines.append(f"| {lr:.3g} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["### k x alpha grid (final held-out loss, mean ± std over seeds)", ""]
    for key, grid in report["grid"].items():
        lines += [
            f"**{grid['label']}**, inner lr {grid['lr']:.3g} ({grid['factor']:g}x the inner "
            f"optimizer's best); alpha = 1 is the inner optimizer alone: "
            f"{_f(grid['inner_alone']['mean'])} ± {_f(grid['inner_alone']['std'])}.", "",
            "| k | " + " | ".join(f"alpha {a:g}" for a in grid["alphas"]) + " |",
            "|---" * (len(grid["alphas"]) + 1) + "|",
        ]  # fmt: skip
        for k, row in zip(grid["ks"], grid["loss"]):
            cells = [f"{_f(c['mean'])} ± {_f(c['std'])}" if math.isfinite(c["mean"])
                     else "diverged" for c in row]  # fmt: skip
            lines.append(f"| {k} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    styles = {"none": ("black", "-"), "lookahead": (None, "-"), "snoo": ("tab:red", "--")}
    colours = {0.5: "tab:blue", 0.8: "tab:green"}
    for col, inner in enumerate(("sgd", "adam")):
        for name, result in report["sweep"].items():
            if result["inner"] != inner:
                continue
            lrs = np.array([p["lr"] for p in result["points"]])
            for row, metric, scale in ((0, "loss", 1.0), (1, "accuracy", 100.0)):
                per_seed = np.array([p[metric]["per_seed"] for p in result["points"]], float)
                per_seed[~np.isfinite(per_seed)] = np.nan
                mean = scale * np.nanmean(per_seed, 1) if per_seed.size else per_seed
                colour, ls = styles[result["wrapper"]]
                colour = colour or colours.get(result["alpha"], "tab:purple")
                ax = axes[row, col]
                ax.plot(lrs, mean, ls, marker="o", ms=3, color=colour, label=result["label"])
                ax.fill_between(lrs, scale * np.nanmin(per_seed, 1),
                                scale * np.nanmax(per_seed, 1), color=colour,
                                alpha=0.15)  # fmt: skip
        for row, ylabel in ((0, "final held-out loss"), (1, "final held-out accuracy (%)")):
            ax = axes[row, col]
            ax.set_xscale("log")
            ax.set_xlabel(
                f"inner learning rate ({'SGD+momentum 0.9' if inner == 'sgd' else 'Adam'})"
            )
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
        best = min(r["ranges"]["loss_1pct"]["best"] for r in report["sweep"].values()
                   if r["inner"] == inner)  # fmt: skip
        axes[0, col].set_ylim(0.9 * best, 3.0 * best)
        axes[0, col].legend(fontsize=8)
    fig.suptitle("digits, 300 noisy-label training images: final held-out loss and accuracy "
                 "against the inner lr (line: mean over seeds, band: min-max)")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -------------------------------------------------------------------------------- main


def _label(inner: str, wrapper: str, alpha) -> str:
    name = {"sgd": "SGD+momentum", "adam": "Adam"}[inner]
    if wrapper == "lookahead":
        return f"Lookahead(k={K}, α={alpha:g}) + {name}"
    if wrapper == "snoo":
        return f"SNOO(k={K}, {SNOO_OUTER[0]}/{SNOO_OUTER[1]}) + {name}"
    return name


def run(cfg: dict, progress: bool = True, methods: Sequence[str] = tuple(METHODS)) -> dict:
    task = make_task(cfg["train_size"], cfg["label_noise"])
    seeds = list(range(cfg["seeds"]))
    sweep = {}
    for name in methods:
        inner, wrapper, alpha = METHODS[name]
        lrs = np.asarray(cfg["lrs"][inner], np.float64)
        hps = {"lr": lrs} | ({"alpha": np.full(len(lrs), alpha)} if alpha is not None else {})
        start = time.perf_counter()
        out = train_grid(task, inner, wrapper, hps, seeds, cfg, label=name, progress=progress)
        final_loss, final_acc = out["loss"][..., -1], out["accuracy"][..., -1]
        sweep[name] = {
            "label": _label(inner, wrapper, alpha), "inner": inner, "wrapper": wrapper,
            "alpha": alpha, "k": K if wrapper != "none" else None,
            **sweep_summary(lrs, final_loss, final_acc, early_stopped(out["loss"])),
            "loss_curves": out["loss"].tolist(),  # [lrs, seeds, chunks]
            "seconds": round(time.perf_counter() - start, 1),
        }  # fmt: skip

    grid = {}
    for inner in ("sgd", "adam"):
        if inner not in sweep:
            continue
        best_lr = sweep[inner]["ranges"]["loss_1pct"]["best_lr"]
        lrs = [best_lr * factor for factor in cfg["grid_lr_factors"]]
        alphas = list(cfg["grid_alphas"])
        hps = {"lr": np.repeat(lrs, len(alphas)), "alpha": np.tile(alphas, len(lrs))}
        per_k = []
        for k in cfg["grid_ks"]:
            out = train_grid(task, inner, "lookahead", hps, seeds, cfg, k=k,
                             label=f"grid {inner} k={k}", progress=progress)  # fmt: skip
            per_k.append(out["loss"][..., -1].reshape(len(lrs), len(alphas), len(seeds)))
        losses = np.stack(per_k, 1)  # [lrs, ks, alphas, seeds]
        for i, (lr, factor) in enumerate(zip(lrs, cfg["grid_lr_factors"])):
            alone = next((p["loss"] for p in sweep[inner]["points"]
                          if math.isclose(p["lr"], lr, rel_tol=1e-9)), None)  # fmt: skip
            grid[f"{inner}_x{factor:g}"] = {
                "label": f"Lookahead + {_label(inner, 'none', None)}", "inner": inner,
                "lr": float(lr), "factor": float(factor), "ks": list(cfg["grid_ks"]),
                "alphas": alphas,
                "loss": [[summarise(losses[i, a, b]) for b in range(len(alphas))]
                         for a in range(len(cfg["grid_ks"]))],
                # alpha = 1 at k = the first: the inner optimizer, as run by this grid
                "inner_alone": summarise(losses[i, 0, alphas.index(1.0)]) if 1.0 in alphas
                else alone,
                "inner_alone_from_sweep": alone,
            }  # fmt: skip
    return {"task": task["info"], "sweep": sweep, "grid": grid}


def _none_to_nan(tree):
    """The inverse of _nan_to_none for a report read back: null (a diverged value) -> NaN."""
    if isinstance(tree, dict):
        return {key: _none_to_nan(value) for key, value in tree.items()}
    if isinstance(tree, list):
        return [_none_to_nan(value) for value in tree]
    return math.nan if tree is None else tree


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sweep, for tests")
    parser.add_argument("--out", default=str(HERE.parent / "runs" / "sensitivity"))
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma list from {tuple(METHODS)}")  # fmt: skip
    parser.add_argument("--no-progress", action="store_true", help="hide the tqdm bars")
    parser.add_argument(
        "--replot", action="store_true", help="rewrite the .md and .png from the .json in --out"
    )
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            parser.error(f"--methods must be a comma list from {tuple(METHODS)}, got {m!r}")
    cfg = QUICK if args.quick else FULL
    out = Path(args.out)
    stem = "sensitivity" + "_quick" * args.quick
    if args.replot:
        report = json.loads((out / f"{stem}.json").read_text(), parse_constant=float)
        report = _none_to_nan(report)
        (out / f"{stem}.md").write_text(markdown(report) + "\n")
        plot(report, out / f"{stem}.png")
        return report
    command = "python benchmarks/sensitivity.py " + " ".join(sys.argv[1:] if argv is None else argv)
    start = time.perf_counter()
    result = run(cfg, progress=not args.no_progress, methods=methods)
    config = {key: (value if key != "lrs" else {i: np.asarray(lrs).tolist()
                                                for i, lrs in value.items()})
              for key, value in cfg.items()}  # fmt: skip
    report = {
        "command": command.strip(), "machine": machine_info(), "config": config,
        "k": K, "snoo_outer": list(SNOO_OUTER), "momentum": MOMENTUM,
        **result, "seconds": round(time.perf_counter() - start, 1),
    }  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(_nan_to_none(report), indent=1) + "\n")
    text = markdown(report)
    (out / f"{stem}.md").write_text(text + "\n")
    plot(report, out / f"{stem}.png")
    print(text)
    print(f"{report['seconds']} s; wrote {out}/{stem}.{{json,md,png}}")
    return report


if __name__ == "__main__":
    main()

"""Convergence benchmark: SGD+momentum, Adam and Lookahead around each, over several seeds.

Trains a small Flax model on scikit-learn's digits (default) or CIFAR-10 and reports,
like the paper's tables, the final test accuracy and training loss as mean ± std over
seeds. Lookahead is evaluated at its slow weights (``lookahead_optax.slow_params``), the
algorithm's output. Writes ``<out-dir>/convergence.{json,md,png}`` (``--grid``:
``convergence_grid.{json,md}``). ``<out-dir>`` defaults to ``runs/`` at the top of the
repository (git ignores it), so a run never overwrites the committed results; regenerate
those with ``--out-dir benchmarks/results``.

    python benchmarks/convergence.py                    # the default job: ~25 s of CPU on 2 cores
    python benchmarks/convergence.py --tune             # how the learning rates were chosen
    python benchmarks/convergence.py --grid             # k in {5, 10} x alpha in {0.5, 0.8}
    python benchmarks/convergence.py --dataset cifar10 --data-dir ~/data/cifar-10-python.tar.gz

Speed: for the MLP, all seeds train at once (``vmap``) and a whole epoch is one ``lax.scan``
inside one ``jit``, so the host only steps the progress bar. The CNN jits one step (see
``_epoch_step_by_step``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _data import Dataset, load_dataset  # noqa: E402

import lookahead_optax as lo  # noqa: E402

OPTIMIZERS = ("sgd", "adam", "lookahead_sgd", "lookahead_adam")
MOMENTUM = 0.9

# Learning rates tuned on each dataset for the inner optimizers alone (the paper's
# protocol: tune the inner optimizer first, then wrap it in Lookahead unchanged).
# Digits (`--tune`): TUNE_LRS, 30 epochs, 3 seeds, on a validation quarter of the train
# set; highest mean validation accuracy, ties (within one example) broken by lower final
# train loss. The same rule, applied to Lookahead(k=5) with alpha in {0.5, 0.8} around the
# tuned inner optimizers, picks alpha=0.8 for both. Results: results/convergence_tune.md.
# CIFAR-10: common values for a small CNN, not tuned here (no data on this machine).
DEFAULTS = {
    "digits": {"model": "mlp", "epochs": 30, "batch_size": 32, "sgd_lr": 0.1, "adam_lr": 3e-3},
    "cifar10": {"model": "cnn", "epochs": 20, "batch_size": 128, "sgd_lr": 0.05, "adam_lr": 1e-3},
}
TUNE_LRS = {"sgd": (0.01, 0.03, 0.1, 0.3), "adam": (3e-4, 1e-3, 3e-3, 1e-2)}
GRID_K = (5, 10)
GRID_ALPHA = (0.5, 0.8)
EVAL_CHUNK = 1000  # examples per forward pass when evaluating, bounds memory on CIFAR-10


class MLP(nn.Module):
    """Two hidden ReLU layers on the flattened image."""

    num_classes: int
    hidden: int = 256

    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(self.hidden)(x))
        x = nn.relu(nn.Dense(self.hidden)(x))
        return nn.Dense(self.num_classes)(x)


class CNN(nn.Module):
    """Three conv blocks (32, 64, 128 channels) with max pooling, then a dense layer."""

    num_classes: int

    @nn.compact
    def __call__(self, x):
        for features in (32, 64, 128):
            x = nn.relu(nn.Conv(features, (3, 3))(x))
            x = nn.max_pool(x, (2, 2), strides=(2, 2)) if min(x.shape[1:3]) >= 2 else x
        x = x.mean(axis=(1, 2))
        x = nn.relu(nn.Dense(128)(x))
        return nn.Dense(self.num_classes)(x)


def make_model(name: str, num_classes: int) -> nn.Module:
    if name == "mlp":
        return MLP(num_classes)
    if name == "cnn":
        return CNN(num_classes)
    raise ValueError(f"model must be one of ('mlp', 'cnn'), got {name!r}")


def make_optimizer(
    name: str, sgd_lr: float, adam_lr: float, k: int, alpha: float
) -> optax.GradientTransformation:
    """One of OPTIMIZERS; the Lookahead ones wrap the same inner optimizer unchanged."""
    inner = {
        "sgd": lambda: optax.sgd(sgd_lr, momentum=MOMENTUM),
        "adam": lambda: optax.adam(adam_lr),
    }
    if name in inner:
        return inner[name]()
    if name.startswith("lookahead_") and name.removeprefix("lookahead_") in inner:
        return lo.lookahead(inner[name.removeprefix("lookahead_")](), k=k, alpha=alpha)
    raise ValueError(f"optimizers must be from {OPTIMIZERS}, got {name!r}")


def describe(name: str, sgd_lr: float, adam_lr: float, k: int, alpha: float) -> str:
    inner = f"SGD+momentum (lr={sgd_lr:g}, momentum={MOMENTUM:g})"
    if "adam" in name:
        inner = f"Adam (lr={adam_lr:g})"
    return f"Lookahead(k={k}, alpha={alpha:g}) + {inner}" if name.startswith("lookahead") else inner


def _cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def _evaluate(model: nn.Module, params, x, y):
    """(mean loss, accuracy) over all of x, in chunks of EVAL_CHUNK examples."""
    n = x.shape[0]
    chunk = min(EVAL_CHUNK, n)
    num_chunks = math.ceil(n / chunk)
    pad = num_chunks * chunk - n
    # Padded examples get weight 0, so any n works with a fixed chunk shape.
    weight = jnp.concatenate([jnp.ones(n), jnp.zeros(pad)]).reshape(num_chunks, chunk)
    x = jnp.concatenate([x, jnp.zeros((pad, *x.shape[1:]), x.dtype)])
    y = jnp.concatenate([y, jnp.zeros(pad, y.dtype)])
    x = x.reshape(num_chunks, chunk, *x.shape[1:])
    y = y.reshape(num_chunks, chunk)

    def sums(batch):
        xb, yb, wb = batch
        logits = model.apply(params, xb)
        correct = (logits.argmax(-1) == yb).astype(jnp.float32)
        return (wb * _cross_entropy(logits, yb)).sum(), (wb * correct).sum()

    loss_sums, correct_sums = jax.lax.map(sums, (x, y, weight))
    return loss_sums.sum() / n, correct_sums.sum() / n


def over_seeds(fn, model: nn.Module, num_per_seed: int):
    """``fn`` applied to each seed's slice of its first ``num_per_seed`` arguments.

    The rest (the data) are shared. An MLP is vmapped: its matmuls batch well. A CNN
    runs the seeds one after another with ``lax.map``: a vmapped convolution with
    per-seed kernels becomes a grouped convolution, which XLA ran 2.5x slower on CPU
    (this CNN's forward pass, 3 seeds).
    """

    def mapped(*args):
        per_seed, shared = args[:num_per_seed], args[num_per_seed:]
        if isinstance(model, MLP):
            in_axes = (0,) * num_per_seed + (None,) * len(shared)
            return jax.vmap(fn, in_axes=in_axes)(*args)
        return jax.lax.map(lambda sliced: fn(*sliced, *shared), per_seed)

    return mapped


def init_params(model: nn.Module, dataset: Dataset, seeds: Sequence[int]):
    """One set of initial params per seed (stacked on axis 0), shared by all optimizers."""
    example = jnp.asarray(dataset.x_train[:1])
    keys = jax.vmap(jax.random.key)(jnp.asarray(seeds))
    return jax.jit(over_seeds(lambda key: model.init(key, example), model, 1))(keys)


def _measure(model: nn.Module, params, x_train, y_train, x_test, y_test):
    """(loss on the whole train set, accuracy on the test set) of one model."""
    train_loss, _ = _evaluate(model, params, x_train, y_train)
    _, test_accuracy = _evaluate(model, params, x_test, y_test)
    return train_loss, test_accuracy


def measure_seeds(model: nn.Module, params, dataset: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """``_measure`` for params stacked over seeds; returns two [seeds] arrays."""
    data = [jnp.asarray(array) for array in dataset[:4]]
    measure = jax.jit(over_seeds(partial(_measure, model), model, 1))
    train_loss, test_accuracy = measure(params, *data)
    return np.asarray(train_loss), np.asarray(test_accuracy)


def _eval_params(params, opt_state):
    """The weights to evaluate: the slow weights when opt_state holds a Lookahead."""
    states = jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, lo.LookaheadState))
    if any(isinstance(s, lo.LookaheadState) for s in states):
        return lo.slow_params(opt_state, params)
    return params


def _epoch_step_by_step(step, measure_one, params, opt_state, order, *data):
    """One epoch with a jitted step per minibatch, seed after seed, for the CNN.

    XLA on CPU runs the convolutions' backward pass far slower inside a loop
    (``lax.scan``: about 20x on this model) than in a jitted step of its own.
    """
    x_train, y_train = data[:2]
    outputs = []
    for seed_index, seed_order in enumerate(order):
        seed_params, seed_state = jax.tree.map(lambda x: x[seed_index], (params, opt_state))
        losses = []
        for batch_indices in seed_order:
            seed_params, seed_state, loss = step(
                seed_params, seed_state, x_train[batch_indices], y_train[batch_indices]
            )
            losses.append(loss)
        train_loss, test_accuracy = measure_one(seed_params, seed_state, *data)
        outputs.append(
            (seed_params, seed_state, jnp.mean(jnp.stack(losses)), train_loss, test_accuracy)
        )
    return jax.tree.map(lambda *per_seed: jnp.stack(per_seed), *outputs)


def train(
    dataset: Dataset,
    model: nn.Module,
    tx: optax.GradientTransformation,
    initial_params,
    *,
    seeds: Sequence[int],
    epochs: int,
    batch_size: int,
    label: str = "",
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """Trains one model per seed, all seeds at once; returns per-epoch curves.

    ``initial_params`` are stacked over seeds (see :func:`init_params`). Returns a
    dict of float arrays of shape [len(seeds), epochs], one entry per epoch:
    ``train_loss`` and ``test_accuracy`` measured on the whole train and test sets
    at the evaluated weights (the slow weights for Lookahead), and
    ``minibatch_loss``, the mean loss of the epoch's minibatches at the fast weights.
    """
    x_train, y_train, x_test, y_test = (jnp.asarray(array) for array in dataset[:4])
    n_train = x_train.shape[0]
    steps = n_train // batch_size
    if not 1 <= batch_size <= n_train:
        raise ValueError(f"batch_size must be in [1, {n_train}], got {batch_size}")

    def loss_fn(params, x, y):
        return _cross_entropy(model.apply(params, x), y).mean()

    def step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    def measure_one(params, opt_state, x_train, y_train, x_test, y_test):
        evaluated = _eval_params(params, opt_state)
        return _measure(model, evaluated, x_train, y_train, x_test, y_test)

    def epoch_one(params, opt_state, order, x_train, y_train, x_test, y_test):
        def scan_step(carry, batch_indices):
            params, opt_state, loss = step(*carry, x_train[batch_indices], y_train[batch_indices])
            return (params, opt_state), loss

        (params, opt_state), losses = jax.lax.scan(scan_step, (params, opt_state), order)
        train_loss, test_accuracy = measure_one(params, opt_state, x_train, y_train, x_test, y_test)
        return params, opt_state, losses.mean(), train_loss, test_accuracy

    if isinstance(model, MLP):
        run_epoch = jax.jit(over_seeds(epoch_one, model, 3), donate_argnums=(0, 1))
    else:
        run_epoch = partial(
            _epoch_step_by_step, jax.jit(step, donate_argnums=(0, 1)), jax.jit(measure_one)
        )
    # A copy, so donating params to run_epoch leaves the caller's initial params intact.
    params = jax.tree.map(jnp.copy, initial_params)
    opt_state = jax.jit(jax.vmap(tx.init))(params)
    curves = {"train_loss": [], "test_accuracy": [], "minibatch_loss": []}
    bar = tqdm(range(1, epochs + 1), desc=label, disable=not progress, leave=True)
    for epoch in bar:
        # Shuffled on the host (cheap, and keeps the PRNG out of the compiled epoch); the
        # same order for every optimizer; the last n_train % batch_size examples are dropped.
        order = (
            np.stack(
                [
                    np.random.default_rng([seed, epoch]).permutation(n_train)[: steps * batch_size]
                    for seed in seeds
                ]
            )
            .reshape(len(seeds), steps, batch_size)
            .astype(np.int32)
        )
        params, opt_state, minibatch_loss, train_loss, test_accuracy = run_epoch(
            params, opt_state, order, x_train, y_train, x_test, y_test
        )
        curves["train_loss"].append(np.asarray(train_loss))
        curves["test_accuracy"].append(np.asarray(test_accuracy))
        curves["minibatch_loss"].append(np.asarray(minibatch_loss))
        bar.set_postfix(
            loss=f"{curves['train_loss'][-1].mean():.2e}",
            acc=f"{curves['test_accuracy'][-1].mean():.4f}",
        )
    return {name: np.stack(values, axis=1) for name, values in curves.items()}


def _nan_to_none(tree):
    """Strict JSON has no NaN (a diverged run's loss): write null instead."""
    if isinstance(tree, dict):
        return {key: _nan_to_none(value) for key, value in tree.items()}
    if isinstance(tree, list):
        return [_nan_to_none(value) for value in tree]
    if isinstance(tree, float) and not math.isfinite(tree):
        return None
    return tree


def summarise(values: np.ndarray) -> dict:
    """mean, sample std (ddof=1; 0 for one seed) and per-seed values of a [seeds] array."""
    values = np.asarray(values, dtype=np.float64)
    std = float(values.std(ddof=1)) if values.size > 1 else 0.0
    return {"mean": float(values.mean()), "std": std, "per_seed": values.tolist()}


def compare(candidate: dict, baseline: dict, higher_is_better: bool) -> str:
    """'better', 'worse' or 'tie': a tie unless the means differ by more than sqrt(s1² + s2²)."""
    difference = candidate["mean"] - baseline["mean"]
    noise = math.hypot(candidate["std"], baseline["std"])
    if abs(difference) <= noise:
        return "tie"
    return "better" if (difference > 0) == higher_is_better else "worse"


def run_configs(
    dataset: Dataset,
    model_name: str,
    configs: dict[str, dict],
    *,
    seeds,
    epochs,
    batch_size,
    progress: bool,
) -> dict[str, dict]:
    """Trains each config (keys of ``make_optimizer`` plus a label) and summarises it."""
    model = make_model(model_name, dataset.num_classes)
    initial_params = init_params(model, dataset, seeds)
    # Epoch 0 of every curve: all optimizers start from the same weights.
    initial_loss, initial_accuracy = measure_seeds(model, initial_params, dataset)
    initial = {"train_loss": initial_loss, "test_accuracy": initial_accuracy}
    initial["minibatch_loss"] = np.full(len(seeds), np.nan)
    results = {}
    for key, config in configs.items():
        tx = make_optimizer(
            config["optimizer"], config["sgd_lr"], config["adam_lr"], config["k"], config["alpha"]
        )
        label = describe(
            config["optimizer"], config["sgd_lr"], config["adam_lr"], config["k"], config["alpha"]
        )
        start = time.perf_counter()
        curves = train(
            dataset,
            model,
            tx,
            initial_params,
            seeds=seeds,
            epochs=epochs,
            batch_size=batch_size,
            label=key,
            progress=progress,
        )
        curves = {
            name: np.concatenate([initial[name][:, None], values], axis=1)
            for name, values in curves.items()
        }
        inner = config["optimizer"].removeprefix("lookahead_")
        results[key] = {
            "label": label,
            "optimizer": config["optimizer"],
            "inner": inner,
            "learning_rate": config[f"{inner}_lr"],
            "k": config["k"] if config["optimizer"].startswith("lookahead") else None,
            "alpha": config["alpha"] if config["optimizer"].startswith("lookahead") else None,
            "seconds": round(time.perf_counter() - start, 2),
            "final": {
                "test_accuracy": summarise(curves["test_accuracy"][:, -1]),
                "train_loss": summarise(curves["train_loss"][:, -1]),
                # Area under the loss curve: rewards fast and steady progress, not just the end.
                "mean_train_loss": summarise(curves["train_loss"][:, 1:].mean(axis=1)),
            },
            "curves": {name: values.tolist() for name, values in curves.items()},
        }
    return results


def compare_with_inner(results: dict[str, dict]) -> dict[str, dict]:
    """Adds ``vs_inner`` verdicts to each Lookahead result whose inner optimizer ran alone."""
    # Each Lookahead run is compared with its inner optimizer alone, at the same learning rate.
    for result in results.values():
        baselines = [
            other["final"]
            for other in results.values()
            if other["optimizer"] == result["inner"]
            and other["learning_rate"] == result["learning_rate"]
        ]
        if result["optimizer"].startswith("lookahead") and baselines:
            baseline = baselines[0]
            final = result["final"]
            result["vs_inner"] = {
                "test_accuracy": compare(final["test_accuracy"], baseline["test_accuracy"], True),
                "train_loss": compare(final["train_loss"], baseline["train_loss"], False),
                "mean_train_loss": compare(
                    final["mean_train_loss"], baseline["mean_train_loss"], False
                ),
            }
    return results


def pick_learning_rate(results: dict[str, dict], inner: str, num_validation: int) -> float:
    """The inner optimizer's learning rate with the best mean validation accuracy.

    Runs within one validation example of the best count as tied; among those the
    lowest final train loss wins. Diverged runs (non-finite loss) are out.
    """
    runs = [
        result
        for result in results.values()
        if result["optimizer"] == inner and math.isfinite(result["final"]["train_loss"]["mean"])
    ]
    best = max(result["final"]["test_accuracy"]["mean"] for result in runs)
    tied = [
        result
        for result in runs
        if best - result["final"]["test_accuracy"]["mean"] <= 1.0 / num_validation + 1e-9
    ]
    return min(tied, key=lambda result: result["final"]["train_loss"]["mean"])["learning_rate"]


def markdown_table(
    results: dict[str, dict], epochs: int, num_seeds: int, accuracy_name: str = "Test accuracy"
) -> str:
    """The paper-style table: final test accuracy and train loss, mean ± std over seeds."""
    lines = [
        f"| Optimizer | {accuracy_name} (%) after {epochs} epochs | Final train loss "
        "| Train loss averaged over epochs | vs inner optimizer |",
        "|---|---|---|---|---|",
    ]
    for result in results.values():
        accuracy = result["final"]["test_accuracy"]
        loss = result["final"]["train_loss"]
        mean_loss = result["final"]["mean_train_loss"]
        verdict = "(baseline)"
        if "vs_inner" in result:
            verdict = ", ".join(
                f"{short}: {result['vs_inner'][name]}"
                for short, name in (
                    ("accuracy", "test_accuracy"),
                    ("final loss", "train_loss"),
                    ("averaged loss", "mean_train_loss"),
                )
            )
        losses = [
            f"{value['mean']:.2e} ± {value['std']:.1e}"
            if math.isfinite(value["mean"])
            else "diverged (NaN)"
            for value in (loss, mean_loss)
        ]
        lines.append(
            f"| {result['label']} | {100 * accuracy['mean']:.2f} ± {100 * accuracy['std']:.2f} "
            f"| {losses[0]} | {losses[1]} | {verdict} |"
        )
    lines.append("")
    lines.append(
        f"Mean ± sample std over {num_seeds} seeds. Lookahead is evaluated at its slow weights. "
        "'tie' means the means differ by less than sqrt(std1² + std2²)."
    )
    return "\n".join(lines) + "\n"


def plot_curves(results: dict[str, dict], path: Path, title: str) -> None:
    """Train loss (log scale) and test accuracy against epoch: mean over seeds, min-max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_axes, accuracy_axes) = plt.subplots(1, 2, figsize=(12, 4.5))
    for result in results.values():
        linestyle = "-" if result["optimizer"].startswith("lookahead") else "--"
        for axes, name in ((loss_axes, "train_loss"), (accuracy_axes, "test_accuracy")):
            values = np.asarray(result["curves"][name])
            scale = 100.0 if name == "test_accuracy" else 1.0
            epochs = np.arange(values.shape[1])
            (line,) = axes.plot(epochs, scale * values.mean(0), linestyle, label=result["label"])
            axes.fill_between(
                epochs,
                scale * values.min(0),
                scale * values.max(0),
                color=line.get_color(),
                alpha=0.2,
            )
    loss_axes.set(xlabel="epoch", ylabel="train loss (whole train set)", yscale="log")
    accuracy_axes.set(xlabel="epoch", ylabel="test accuracy (%)")
    accuracy_axes.set_ylim(bottom=max(0.0, accuracy_axes.get_ylim()[0]))
    # Zoom on the end of training, where the optimizers differ.
    final = [100 * result["final"]["test_accuracy"]["mean"] for result in results.values()]
    accuracy_axes.set_ylim(max(0.0, min(final) - 8.0), min(100.0, max(final) + 2.0))
    loss_axes.legend(fontsize=8)
    loss_axes.grid(alpha=0.3)
    accuracy_axes.grid(alpha=0.3)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def validation_split(dataset: Dataset, fraction: float = 0.25, seed: int = 0) -> Dataset:
    """The train set split into train and validation (as the "test" set), for tuning."""
    order = np.random.default_rng(seed).permutation(len(dataset.y_train))
    num_validation = int(fraction * len(order))
    validation, train = order[:num_validation], order[num_validation:]
    return dataset._replace(
        x_train=dataset.x_train[train],
        y_train=dataset.y_train[train],
        x_test=dataset.x_train[validation],
        y_test=dataset.y_train[validation],
        name=f"{dataset.name} (validation split of the train set)",
    )


# Not benchmarks/results/: that holds the committed results, rewritten only on purpose.
DEFAULT_OUT_DIR = Path(__file__).resolve().parent.parent / "runs"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=("digits", "cifar10"), default="digits")
    parser.add_argument("--data-dir", help="the CIFAR-10 python archive or its directory")
    parser.add_argument("--model", choices=("mlp", "cnn"), help="default: per dataset")
    parser.add_argument("--epochs", type=int, default=None, help="default: 30 digits, 20 cifar10")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (0, 1, ...)")
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS), help="comma list")
    parser.add_argument("--k", type=int, default=5, help="Lookahead sync period")
    parser.add_argument(
        "--alpha", type=float, default=0.8, help="Lookahead slow step (0.8: picked by --tune)"
    )
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--sgd-lr", type=float, default=None, help="default: tuned per dataset")
    parser.add_argument("--adam-lr", type=float, default=None, help="default: tuned per dataset")
    parser.add_argument("--grid", action="store_true", help="k in {5,10} x alpha in {0.5,0.8}")
    parser.add_argument(
        "--tune",
        action="store_true",
        help="learning-rate grid for the inner optimizers, on a validation split of the train set",
    )
    parser.add_argument(
        "--out-dir",
        default=str(DEFAULT_OUT_DIR),
        help="where to write (default: runs/, ignored by git; the committed results: "
        "--out-dir benchmarks/results)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the tqdm bars")
    args = parser.parse_args(argv)
    defaults = DEFAULTS[args.dataset]
    for name in ("model", "epochs", "batch_size", "sgd_lr", "adam_lr"):
        if getattr(args, name) is None:
            setattr(args, name, defaults[name])
    args.optimizers = [name.strip() for name in args.optimizers.split(",") if name.strip()]
    for name in args.optimizers:
        if name not in OPTIMIZERS:
            parser.error(f"--optimizers must be a comma list from {OPTIMIZERS}, got {name!r}")
    if args.epochs < 1 or args.seeds < 1:
        parser.error("--epochs and --seeds must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    """Runs the benchmark (or the grid), prints the table, writes JSON, Markdown and PNG."""
    args = parse_args(argv)
    dataset = load_dataset(args.dataset, args.data_dir)
    seeds = list(range(args.seeds))
    base = {"sgd_lr": args.sgd_lr, "adam_lr": args.adam_lr, "k": args.k, "alpha": args.alpha}
    if args.tune:
        # Hold out a quarter of the training set; the test set is not looked at.
        stem = "convergence_tune"
        dataset = validation_split(dataset)
        configs = {
            f"{inner}_lr{lr:g}": {**base, "optimizer": inner, f"{inner}_lr": lr}
            for inner, lrs in TUNE_LRS.items()
            for lr in lrs
        }
    elif args.grid:
        stem = "convergence_grid"
        configs = {}
        for inner in ("sgd", "adam"):
            configs[inner] = {**base, "optimizer": inner}
            for k in GRID_K:
                for alpha in GRID_ALPHA:
                    configs[f"lookahead_{inner}_k{k}_alpha{alpha:g}"] = {
                        **base,
                        "optimizer": f"lookahead_{inner}",
                        "k": k,
                        "alpha": alpha,
                    }
    else:
        stem = "convergence"
        configs = {name: {**base, "optimizer": name} for name in args.optimizers}
    if args.dataset != "digits":
        stem += f"_{args.dataset}"

    print(
        f"{dataset.name}: {len(dataset.y_train)} train / {len(dataset.y_test)} test examples, "
        f"{args.model.upper()}, batch {args.batch_size}, {args.epochs} epochs, seeds {seeds}, "
        f"jax {jax.__version__} on {jax.default_backend()}"
    )
    start = time.perf_counter()
    run = partial(
        run_configs,
        dataset,
        args.model,
        seeds=seeds,
        epochs=args.epochs,
        batch_size=args.batch_size,
        progress=not args.no_progress,
    )
    results = run(configs)
    if args.tune:
        # Then Lookahead (k=5, both alphas) around each tuned inner optimizer, unchanged.
        tuned = {
            f"{inner}_lr": pick_learning_rate(results, inner, len(dataset.y_test))
            for inner in TUNE_LRS
        }
        print(f"tuned: {tuned}")
        results |= run(
            {
                f"lookahead_{inner}_k5_alpha{alpha:g}": {
                    **base,
                    **tuned,
                    "optimizer": f"lookahead_{inner}",
                    "k": 5,
                    "alpha": alpha,
                }
                for inner in TUNE_LRS
                for alpha in GRID_ALPHA
            }
        )
    results = compare_with_inner(results)
    accuracy_name = "Validation accuracy" if args.tune else "Test accuracy"
    table = markdown_table(results, args.epochs, len(seeds), accuracy_name)
    print()
    print(table)

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/convergence.py " + " ".join(sys.argv[1:] if argv is None else argv)
    report = {
        "dataset": dataset.name,
        "num_train": int(len(dataset.y_train)),
        "num_test": int(len(dataset.y_test)),
        "model": args.model,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "seeds": seeds,
        "command": command.strip(),
        "seconds": round(time.perf_counter() - start, 1),
        "environment": {
            "jax": jax.__version__,
            "optax": optax.__version__,
            "backend": jax.default_backend(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
        },
        "results": results,
    }
    json_path = out_dir / f"{stem}.json"
    json_path.write_text(json.dumps(_nan_to_none(report), indent=1) + "\n")
    md_path = out_dir / f"{stem}.md"
    md_path.write_text(f"Command: `{report['command']}`\n\n{table}")
    written = [json_path, md_path]
    if not (args.grid or args.tune):
        png_path = out_dir / f"{stem}.png"
        plot_curves(
            results,
            png_path,
            f"{dataset.name}, {args.model.upper()}: mean over {len(seeds)} seeds, band = min-max",
        )
        written.append(png_path)
    print("wrote " + ", ".join(str(path) for path in written))
    return report


if __name__ == "__main__":
    main()

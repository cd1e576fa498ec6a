"""Fixed vs adaptive alpha: the noisy quadratic model (Monte Carlo) and digits.

Noisy quadratic (the paper's model): L(x) = 0.5 sum a_i (x_i - c_i)^2 with c ~ N(0, diag
sigma^2) drawn fresh every step, a_i log-spaced in [0.01, 1]. Many independent runs at once
(vmap); reported: the excess expected loss 0.5 sum a_i x_i^2 of the slow weights after the
last sync (mean over runs), and the alphas the adaptive rule chose. Two noise models:
sigma^2 = 1/a (gradient covariance = Hessian: the empirical Fisher is the curvature) and
sigma^2 = 1 (isotropic noise: the Fisher is a^2, not a).

Digits: the MLP of benchmarks/convergence.py, same data, seeds, schedule and learning rates,
Lookahead evaluated at its slow weights.

    python benchmarks/adaptive_alpha.py            # both parts, about 5 minutes on 2 cores
    python benchmarks/adaptive_alpha.py --part nqm
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lookahead_optax as lo  # noqa: E402

K = 5
DIMS = 20
CURVATURE = np.logspace(0, -2, DIMS)


def nqm_configs(lr_sgd: float, lr_adam: float):
    a = jnp.asarray(CURVATURE, jnp.float32)
    sgd, adam = (lambda: optax.sgd(lr_sgd)), (lambda: optax.adam(lr_adam))
    return {
        "SGD": (sgd, None),
        "SGD + LA alpha=0.5": (sgd, 0.5),
        "SGD + LA alpha=0.8": (sgd, 0.8),
        "SGD + LA adaptive (exact A)": (sgd, lo.adaptive_alpha(0.1, curvature=a)),
        'SGD + LA adaptive ("ema")': (sgd, lo.adaptive_alpha(0.1, curvature="ema")),
        "Adam": (adam, None),
        "Adam + LA alpha=0.5": (adam, 0.5),
        "Adam + LA alpha=0.8": (adam, 0.8),
        "Adam + LA adaptive (exact A)": (adam, lo.adaptive_alpha(0.1, curvature=a)),
        'Adam + LA adaptive ("adam")': (adam, lo.adaptive_alpha(0.1, curvature="adam")),
        'Adam + LA adaptive ("ema")': (adam, lo.adaptive_alpha(0.1, curvature="ema")),
    }


def nqm_run(make_inner, alpha, sigma2: np.ndarray, steps: int, runs: int, seed: int = 0):
    """Excess loss of the evaluated weights at the end, per run; alphas at every sync."""
    a = jnp.asarray(CURVATURE, jnp.float32)
    sigma = jnp.asarray(np.sqrt(sigma2), jnp.float32)
    tx = make_inner() if alpha is None else lo.lookahead(make_inner(), k=K, alpha=alpha)

    def one_run(key):
        x0 = jnp.ones(DIMS, jnp.float32)

        def step(carry, key):
            x, opt_state = carry
            c = sigma * jax.random.normal(key, (DIMS,))
            grads = a * (x - c)
            updates, opt_state = tx.update(grads, opt_state, x)
            x = optax.apply_updates(x, updates)
            chosen = (
                opt_state.adaptive.alpha
                if alpha is not None and not isinstance(alpha, float)
                else jnp.float32(jnp.nan)
            )
            return (x, opt_state), chosen

        (x, opt_state), chosen = jax.lax.scan(step, (x0, tx.init(x0)), jax.random.split(key, steps))
        evaluated = x if alpha is None else lo.slow_params(opt_state, x)
        return 0.5 * jnp.sum(a * evaluated**2), chosen[K - 1 :: K]

    keys = jax.random.split(jax.random.key(seed), runs)
    excess, alphas = jax.jit(jax.vmap(one_run))(keys)
    return np.asarray(excess), np.asarray(alphas)


def run_nqm(steps: int, runs: int) -> dict:
    results = {}
    for noise_name, sigma2 in {"sigma2=1/a": 1.0 / CURVATURE, "sigma2=1": np.ones(DIMS)}.items():
        # Learning rates: SGD near its stability limit (2 / max a = 2), where Lookahead's
        # averaging matters; Adam's chosen so that it is not dominated by its own noise floor.
        for lr_name, lr_sgd, lr_adam in (("high lr", 1.5, 0.1), ("low lr", 0.5, 0.03)):
            rows = {}
            for name, (make_inner, alpha) in nqm_configs(lr_sgd, lr_adam).items():
                excess, alphas = nqm_run(make_inner, alpha, sigma2, steps, runs)
                row = {
                    "excess_loss_mean": float(excess.mean()),
                    "excess_loss_sem": float(excess.std(ddof=1) / np.sqrt(runs)),
                }
                if not np.all(np.isnan(alphas)):
                    row["alpha_mean"] = float(alphas.mean())
                    row["alpha_at_min"] = float(np.mean(alphas <= 0.1 + 1e-6))
                    row["alpha_at_1"] = float(np.mean(alphas >= 1 - 1e-6))
                rows[name] = row
            results[f"{noise_name}, {lr_name} (SGD {lr_sgd:g}, Adam {lr_adam:g})"] = rows
    return results


def nqm_markdown(results: dict, steps: int, runs: int) -> str:
    lines = [
        f"Noisy quadratic, {DIMS} dims, a in [0.01, 1], k={K}, {steps} steps, {runs} runs; "
        "excess expected loss of the evaluated weights (mean ± s.e.m.); adaptive: alpha_min=0.1.",
        "",
    ]
    for setting, rows in results.items():
        lines += [f"**{setting}**", "", "| Optimizer | Excess loss | mean alpha | at 0.1 | at 1 |"]
        lines.append("|---|---|---|---|---|")
        for name, row in rows.items():
            alpha_cells = (
                f"{row['alpha_mean']:.2f} | {100 * row['alpha_at_min']:.0f}% | "
                f"{100 * row['alpha_at_1']:.0f}%"
                if "alpha_mean" in row
                else "| |"
            )
            lines.append(
                f"| {name} | {row['excess_loss_mean']:.3e} ± {row['excess_loss_sem']:.1e} | "
                f"{alpha_cells} |"
            )
        lines.append("")
    return "\n".join(lines)


def run_digits(seeds: int, epochs: int) -> dict:
    import convergence  # noqa: PLC0415 (benchmarks/convergence.py: model, data, training loop)
    from _data import load_dataset  # noqa: PLC0415

    defaults = convergence.DEFAULTS["digits"]
    dataset = load_dataset("digits", None)
    model = convergence.make_model(defaults["model"], dataset.num_classes)
    seed_list = list(range(seeds))
    initial = convergence.init_params(model, dataset, seed_list)
    sgd = lambda: optax.sgd(defaults["sgd_lr"], momentum=convergence.MOMENTUM)  # noqa: E731
    adam = lambda: optax.adam(defaults["adam_lr"])  # noqa: E731
    configs = {
        "Adam": adam(),
        "Adam + LA alpha=0.5": lo.lookahead(adam(), k=K, alpha=0.5),
        "Adam + LA alpha=0.8": lo.lookahead(adam(), k=K, alpha=0.8),
        'Adam + LA adaptive ("adam")': lo.lookahead(
            adam(), k=K, alpha=lo.adaptive_alpha(0.1, curvature="adam")
        ),
        'Adam + LA adaptive ("ema")': lo.lookahead(adam(), k=K, alpha=lo.adaptive_alpha(0.1)),
        "SGD+m": sgd(),
        "SGD+m + LA alpha=0.5": lo.lookahead(sgd(), k=K, alpha=0.5),
        "SGD+m + LA alpha=0.8": lo.lookahead(sgd(), k=K, alpha=0.8),
        'SGD+m + LA adaptive ("ema")': lo.lookahead(sgd(), k=K, alpha=lo.adaptive_alpha(0.1)),
    }
    results = {}
    for name, tx in configs.items():
        start = time.perf_counter()
        curves = convergence.train(
            dataset,
            model,
            tx,
            initial,
            seeds=seed_list,
            epochs=epochs,
            batch_size=defaults["batch_size"],
            label=name,
            progress=False,
        )
        row = {
            "test_accuracy": convergence.summarise(curves["test_accuracy"][:, -1]),
            "train_loss": convergence.summarise(curves["train_loss"][:, -1]),
            "mean_train_loss": convergence.summarise(curves["train_loss"].mean(axis=1)),
            "seconds": round(time.perf_counter() - start, 1),
        }
        if "adaptive" in name:
            row["alphas"] = digits_alphas(dataset, model, tx, initial, defaults, epochs)
        results[name] = row
        print(name, row["test_accuracy"]["mean"], row["train_loss"]["mean"], flush=True)
    return results


def digits_alphas(dataset, model, tx, initial, defaults, epochs) -> dict:
    """The alphas chosen at every sync, for seed 0 (same data order as convergence.train)."""
    x_train, y_train = jnp.asarray(dataset.x_train), jnp.asarray(dataset.y_train)
    n, batch = x_train.shape[0], defaults["batch_size"]
    steps = n // batch
    params = jax.tree.map(lambda x: x[0], initial)

    def loss_fn(params, x, y):
        logits = model.apply(params, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def epoch(params, opt_state, order):
        def step(carry, idx):
            params, opt_state = carry
            grads = jax.grad(loss_fn)(params, x_train[idx], y_train[idx])
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), opt_state.adaptive.alpha

        (params, opt_state), alphas = jax.lax.scan(step, (params, opt_state), order)
        return params, opt_state, alphas

    opt_state = tx.init(params)
    chosen = []
    for e in range(1, epochs + 1):
        order = np.random.default_rng([0, e]).permutation(n)[: steps * batch]
        params, opt_state, alphas = epoch(params, opt_state, order.reshape(steps, batch))
        chosen.append(np.asarray(alphas))
    chosen = np.concatenate(chosen)[K - 1 :: K]
    return {
        "mean": float(chosen.mean()),
        "first_epoch_mean": float(chosen[: steps // K].mean()),
        "last_epoch_mean": float(chosen[-(steps // K) :].mean()),
        "at_min": float(np.mean(chosen <= 0.1 + 1e-6)),
        "at_1": float(np.mean(chosen >= 1 - 1e-6)),
    }


def digits_markdown(results: dict, seeds: int, epochs: int) -> str:
    lines = [
        f"Digits MLP (benchmarks/convergence.py's model, data and learning rates), k={K}, "
        f"{epochs} epochs, mean ± std over {seeds} seeds, Lookahead at its slow weights.",
        "",
        "| Optimizer | Test accuracy (%) | Final train loss | Train loss averaged over epochs "
        "| alpha chosen: mean (first → last epoch), at 0.1, at 1 |",
        "|---|---|---|---|---|",
    ]
    for name, row in results.items():
        acc, loss, mean_loss = row["test_accuracy"], row["train_loss"], row["mean_train_loss"]
        alphas = row.get("alphas")
        alpha_cell = (
            f"{alphas['mean']:.2f} ({alphas['first_epoch_mean']:.2f} → "
            f"{alphas['last_epoch_mean']:.2f}), {100 * alphas['at_min']:.0f}%, "
            f"{100 * alphas['at_1']:.0f}%"
            if alphas
            else ""
        )
        lines.append(
            f"| {name} | {100 * acc['mean']:.2f} ± {100 * acc['std']:.2f} | "
            f"{loss['mean']:.2e} ± {loss['std']:.1e} | {mean_loss['mean']:.2e} ± "
            f"{mean_loss['std']:.1e} | {alpha_cell} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("nqm", "digits", "both"), default="both")
    parser.add_argument("--steps", type=int, default=500, help="noisy quadratic steps")
    parser.add_argument("--runs", type=int, default=500, help="noisy quadratic runs")
    parser.add_argument("--seeds", type=int, default=3, help="digits seeds")
    parser.add_argument("--epochs", type=int, default=30, help="digits epochs")
    parser.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {"command": "python benchmarks/adaptive_alpha.py " + " ".join(argv or sys.argv[1:])}
    markdown = []
    if args.part in ("nqm", "both"):
        report["nqm"] = run_nqm(args.steps, args.runs)
        markdown.append(nqm_markdown(report["nqm"], args.steps, args.runs))
    if args.part in ("digits", "both"):
        report["digits"] = run_digits(args.seeds, args.epochs)
        markdown.append(digits_markdown(report["digits"], args.seeds, args.epochs))
    text = "\n".join(markdown)
    print(text)
    stem = "adaptive_alpha" if args.part == "both" else f"adaptive_alpha_{args.part}"
    (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=1))
    (out_dir / f"{stem}.md").write_text(f"Command: `{report['command'].strip()}`\n\n{text}")


if __name__ == "__main__":
    main()

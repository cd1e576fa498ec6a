"""Language modelling: AdamW, Lookahead(AdamW) and SNOO(AdamW) on CPython's help text.

**Corpus.** The English help text that ships with CPython: ``pydoc_data/topics.py`` under
the standard library directory (``sysconfig.get_paths()["stdlib"]``), the file that ``help()``
reads its topics from. Recorded for CPython 3.11.7: the file is 757,011 bytes, sha256
``abaa56a64551d8eead1b19cbae3c6db443f99f0cab81df07bed3cb75c0db9346``. The text is the values of
its ``topics`` dict joined in sorted key order ("assert" ... "yield"), UTF-8 encoded:
466,117 bytes (464,970 characters, 107 distinct byte values), sha256
``37d06970fc926e60c16dff401e441b84752446a36b6b64516c229fdec77e992c``. Other CPython
versions ship other help text; the script prints and records the hashes it found and warns
when they differ from these (results are then not comparable). The model reads bytes
(vocabulary 256). Splits, in text order: train = the first 80%, validation = the next 10%
(``--tune`` only), test = the last 10% (held out: topics "typesseq" ... "yield").

**Model.** A decoder-only transformer in Flax NNX: learned token and position embeddings,
pre-LayerNorm blocks (causal multi-head self-attention, GELU MLP of width 4 d), a final
LayerNorm and an untied output layer. Default: 2 layers, d_model 64, 4 heads, context 64
bytes, 136,704 parameters; 840 steps of batch 16 windows at uniform random offsets of the
train split (860K bytes seen, 2.3 passes over it).

**Protocol.** Every optimizer wraps the same inner AdamW (b1 0.9, b2 0.99, weight decay
0.1 on matrices, global-norm clipping at 1, linear warmup over 5% of the steps then cosine
decay to a tenth of the peak lr); its peak lr was tuned for AdamW alone (``--tune``: lr in
{1, 2, 4, 8, 16} x 1e-3, final validation loss, 3 seeds: 4e-3, results/language_model_tune.md)
and is used unchanged inside Lookahead and SNOO. Lookahead:
k in {5, 10} x alpha in {0.5, 0.8} (the paper's grid). SNOO: ``outer=optax.sgd(0.68,
momentum=0.37, nesterov=True)``, k = 28 (modded-nanogpt's record). DiLoCo-like: outer
lr 0.7, momentum 0.9, Nesterov (Douillard et al. 2023) with k scaled to the run length
(DiLoCo ran 128 outer steps; default k = 7, 120 outer steps in 840). All methods run the
same steps from the same initial weights on the same batches (per seed), and are evaluated
at equal steps on the whole test split (non-overlapping windows of the context length:
every byte a target once): cross-entropy in nats/byte (bits/byte = nats / ln 2). Lookahead and SNOO
are evaluated at their slow weights (``lo.slow_params``), their output; their fast weights'
loss is recorded too. The default step count is a multiple of every k, so every method ends
on a sync. Each seed has its own initial weights and batches, shared by all methods (so
differences are paired). Speed: every ``--chunk`` steps of all seeds are one ``jit`` (a
``lax.scan`` of ``lo.update_and_apply`` steps, the seeds in turn with ``lax.map``).

    python benchmarks/language_model.py                       # the default run, ~10 CPU-min
    python benchmarks/language_model.py --tune                # the AdamW lr sweep
    python benchmarks/language_model.py --quick               # a tiny model for 20 steps (the test)
    python benchmarks/language_model.py --out benchmarks/results   # rewrite the committed results

Writes ``<out>/language_model{,_tune,_quick}.{json,md,png}`` (``--out`` defaults to
``runs/language_model/``, ignored by git).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import sysconfig
import time
import warnings
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lookahead_optax as lo  # noqa: E402

CORPUS_FILE = "pydoc_data/topics.py"  # relative to the standard library directory
RECORDED = {  # CPython 3.11.7
    "file_bytes": 757_011,
    "file_sha256": "abaa56a64551d8eead1b19cbae3c6db443f99f0cab81df07bed3cb75c0db9346",
    "text_bytes": 466_117,
    "text_sha256": "37d06970fc926e60c16dff401e441b84752446a36b6b64516c229fdec77e992c",
}
TRAIN_FRACTION, VALIDATION_FRACTION = 0.8, 0.1  # the test split is the rest, the last 10%

# Peak AdamW lr picked by `--tune` (results/language_model_tune.md): the lowest mean final
# validation loss over 3 seeds among TUNE_LRS, with the default model and steps (nats/byte:
# 2.010, 1.750, 1.605, 1.608, 1.861; 8e-3 is within noise of 4e-3).
TUNED_LR = 4e-3
TUNE_LRS = (1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2)

DEFAULTS = {
    "layers": 2,
    "d_model": 64,
    "heads": 4,
    "context": 64,
    "batch_size": 16,
    "steps": 840,  # a multiple of 5, 10, 28 and 7: every method ends on a sync
    "chunk": 24,  # steps per compiled lax.scan; checkpoints are multiples of it
    "checkpoints": 6,  # evaluations besides step 0, the last at the final step
    "seeds": 3,
    "lr": TUNED_LR,
    "diloco_k": 7,  # 120 outer steps in 840 (DiLoCo: 128 outer steps of H = 500)
    "eval_bytes": 0,  # 0: the whole split
}
QUICK = {
    "layers": 1,
    "d_model": 32,
    "heads": 2,
    "context": 32,
    "batch_size": 8,
    "steps": 20,
    "chunk": 2,
    "checkpoints": 5,  # steps 4, 8, 12, 16, 20: step 4 is before the first sync (k = 5)
    "seeds": 2,
    "lr": TUNED_LR,
    "diloco_k": 10,
    "eval_bytes": 4096,  # the first 4,096 bytes of the test split
}


# ----------------------------------------------------------------------------- corpus


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def load_corpus() -> tuple[np.ndarray, dict]:
    """The corpus as uint8 bytes, and a record of where it came from (path, sizes, hashes)."""
    import pydoc_data.topics as topics

    path = Path(topics.__file__).resolve()
    file_bytes = path.read_bytes()
    text = "".join(topics.topics[key] for key in sorted(topics.topics)).encode("utf-8")
    record = {
        "file": CORPUS_FILE,
        "path": str(path),
        "python": platform.python_version(),
        "stdlib": sysconfig.get_paths()["stdlib"],
        "file_bytes": len(file_bytes),
        "file_sha256": _sha256(file_bytes),
        "text_bytes": len(text),
        "text_sha256": _sha256(text),
        "text": "the values of topics.topics joined in sorted key order, UTF-8",
    }
    record["matches_recorded"] = all(record[key] == value for key, value in RECORDED.items())
    if not record["matches_recorded"]:
        warnings.warn(
            f"{path} is not the recorded CPython 3.11.7 file ({RECORDED}); found "
            f"{ {key: record[key] for key in RECORDED} }: results are not comparable",
            stacklevel=2,
        )
    return np.frombuffer(text, np.uint8), record


def split_corpus(data: np.ndarray) -> dict[str, np.ndarray]:
    """train / validation / test: the first 80%, the next 10%, the last 10%, in text order."""
    n = len(data)
    a, b = int(TRAIN_FRACTION * n), int((TRAIN_FRACTION + VALIDATION_FRACTION) * n)
    return {"train": data[:a], "validation": data[a:b], "test": data[b:]}


# ------------------------------------------------------------------------------ model


class Block(nnx.Module):
    """Pre-LayerNorm transformer block: causal self-attention, then a GELU MLP."""

    def __init__(self, d_model: int, heads: int, *, rngs: nnx.Rngs):
        self.heads = heads
        self.ln1 = nnx.LayerNorm(d_model, rngs=rngs)
        self.qkv = nnx.Linear(d_model, 3 * d_model, use_bias=False, rngs=rngs)
        self.proj = nnx.Linear(d_model, d_model, use_bias=False, rngs=rngs)
        self.ln2 = nnx.LayerNorm(d_model, rngs=rngs)
        self.fc = nnx.Linear(d_model, 4 * d_model, rngs=rngs)
        self.out = nnx.Linear(4 * d_model, d_model, rngs=rngs)

    def __call__(self, x):
        batch, length, d_model = x.shape
        q, k, v = jnp.split(self.qkv(self.ln1(x)), 3, axis=-1)
        q, k, v = (t.reshape(batch, length, self.heads, d_model // self.heads) for t in (q, k, v))
        # Written out: on CPU its gradient ran about 2x faster than jax.nn.dot_product_attention's.
        scores = jnp.einsum("bthd,bshd->bhts", q, k) / math.sqrt(d_model // self.heads)
        causal = jnp.tril(jnp.ones((length, length), bool))
        weights = jax.nn.softmax(jnp.where(causal, scores, -1e9), axis=-1)
        y = jnp.einsum("bhts,bshd->bthd", weights, v).reshape(batch, length, d_model)
        x = x + self.proj(y)
        return x + self.out(jax.nn.gelu(self.fc(self.ln2(x))))


class TransformerLM(nnx.Module):
    """Decoder-only byte-level transformer: [batch, length] int32 -> [batch, length, 256]."""

    def __init__(self, layers: int, d_model: int, heads: int, context: int, *, rngs: nnx.Rngs):
        if d_model % heads:
            raise ValueError(f"d_model ({d_model}) must be a multiple of heads ({heads})")
        embed_init = nnx.initializers.normal(0.02)
        self.embed = nnx.Embed(256, d_model, embedding_init=embed_init, rngs=rngs)
        self.position = nnx.Param(embed_init(rngs.params(), (context, d_model)))
        self.blocks = nnx.List([Block(d_model, heads, rngs=rngs) for _ in range(layers)])
        self.ln = nnx.LayerNorm(d_model, rngs=rngs)
        self.head = nnx.Linear(d_model, 256, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens) + self.position[...][: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def make_model_fns(layers, d_model, heads, context):
    """(init(key) -> params, apply(params, tokens) -> logits, parameter count)."""

    def build(key):
        return TransformerLM(layers, d_model, heads, context, rngs=nnx.Rngs(key))

    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: build(jax.random.key(0))))

    def init(key):
        return nnx.state(build(key))

    def apply(params, tokens):
        return nnx.merge(graphdef, params)(tokens)

    count = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(abstract))
    return init, apply, count


def cross_entropy(apply, params, x, y):
    """Mean next-byte cross-entropy in nats."""
    return optax.softmax_cross_entropy_with_integer_labels(apply(params, x), y).mean()


def sample_batch(train: jax.Array, key, batch_size: int, context: int):
    """batch_size windows of context + 1 bytes at uniform random offsets of the train split."""
    starts = jax.random.randint(key, (batch_size,), 0, train.shape[0] - context)
    windows = train[starts[:, None] + jnp.arange(context + 1)].astype(jnp.int32)
    return windows[:, :-1], windows[:, 1:]


def eval_windows(split: np.ndarray, context: int) -> tuple[jax.Array, jax.Array]:
    """Non-overlapping windows covering the split: every byte but the first is a target once."""
    n = (len(split) - 1) // context
    x = split[: n * context].reshape(n, context).astype(np.int32)
    y = split[1 : n * context + 1].reshape(n, context).astype(np.int32)
    return jnp.asarray(x), jnp.asarray(y)


# ------------------------------------------------------------------------- optimizers


def inner_adamw(lr: float, steps: int) -> optax.GradientTransformation:
    """The AdamW every method uses: clipping, warmup + cosine decay, decay on matrices."""
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, lr, warmup_steps=max(1, steps // 20), decay_steps=steps, end_value=lr / 10
    )
    return optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(
            schedule,
            b1=0.9,
            b2=0.99,
            weight_decay=0.1,
            mask=lambda params: jax.tree.map(lambda x: x.ndim >= 2, params),
        ),
    )


def make_configs(lr: float, steps: int, diloco_k: int, quick: bool = False) -> dict[str, dict]:
    """name -> {label, kind, k, alpha / outer hyperparameters}; the inner AdamW is shared."""
    configs = {"adamw": {"kind": "adamw", "label": f"AdamW (lr {lr:g})"}}
    for k, alpha in ((5, 0.5), (5, 0.8), (10, 0.5), (10, 0.8)):
        if quick and (k, alpha) != (5, 0.5):
            continue
        configs[f"lookahead_k{k}_a{alpha:g}"] = {
            "kind": "lookahead",
            "k": k,
            "alpha": alpha,
            "label": f"Lookahead(AdamW), k={k}, alpha={alpha:g}",
        }
    snoo = [
        ("snoo", 28, 0.68, 0.37, "SNOO(AdamW), modded-nanogpt"),
        ("diloco", diloco_k, 0.7, 0.9, "SNOO(AdamW), DiLoCo outer step"),
    ]
    if quick:
        # A check of the library (tests/test_language_model.py): Nesterov SGD with momentum 0
        # and lr a as the outer step is Lookahead with alpha = a.
        snoo = [("snoo", 5, 0.5, 0.0, "SNOO(AdamW), momentum 0 (= Lookahead alpha 0.5)")]
    for name, k, outer_lr, momentum, label in snoo:
        configs[f"{name}_k{k}_lr{outer_lr:g}_m{momentum:g}"] = {
            "kind": "snoo",
            "k": k,
            "outer_lr": outer_lr,
            "momentum": momentum,
            "nesterov": True,
            "label": f"{label}: k={k}, outer lr {outer_lr:g}, momentum {momentum:g}, Nesterov",
        }
    for config in configs.values():
        if config["kind"] != "adamw" and steps % config["k"]:
            warnings.warn(
                f"{config['label']}: {steps} steps is not a multiple of k, so its final slow "
                f"weights are {steps % config['k']} steps old",
                stacklevel=2,
            )
    return configs


def make_optimizer(config: dict, lr: float, steps: int) -> optax.GradientTransformation:
    inner = inner_adamw(lr, steps)
    if config["kind"] == "adamw":
        return inner
    if config["kind"] == "lookahead":
        return lo.lookahead(inner, k=config["k"], alpha=config["alpha"])
    outer = optax.sgd(config["outer_lr"], momentum=config["momentum"], nesterov=True)
    return lo.lookahead(inner, k=config["k"], outer=outer)


# --------------------------------------------------------------------------- training


def has_lookahead(opt_state) -> bool:
    is_state = lambda s: isinstance(s, lo.LookaheadState)  # noqa: E731
    return any(is_state(s) for s in jax.tree.leaves(opt_state, is_leaf=is_state))


def checkpoint_steps(steps: int, chunk: int, count: int, ks: Sequence[int]) -> list[int]:
    """0, then ``count`` roughly even multiples of ``chunk``, the last one ``steps``.

    The intermediate ones avoid multiples of every k where a nearby multiple of ``chunk``
    does, so the fast and slow weights differ there (at a sync they coincide).
    """
    if steps % chunk:
        raise ValueError(f"steps ({steps}) must be a multiple of chunk ({chunk})")
    chunks = steps // chunk
    if not 1 <= count <= chunks:
        raise ValueError(f"checkpoints must be in [1, {chunks}], got {count}")
    chosen = [0]
    for i in range(1, count):
        target = round(i * chunks / count)
        nearby = sorted(range(chosen[-1] // chunk + 1, chunks), key=lambda m: abs(m - target))
        clear = [m for m in nearby if all((m * chunk) % k for k in ks)]
        best = clear[0] if clear and abs(clear[0] - target) <= chunks / count / 2 else target
        chosen.append(max(best, chosen[-1] // chunk + 1) * chunk)
    return [*chosen, steps]


def make_evaluator(apply):
    """(params stacked over seeds, x, y) -> [seeds] mean cross-entropy; seeds in turn."""
    one_seed = partial(cross_entropy, apply)
    return jax.jit(lambda p, x, y: jax.lax.map(lambda params: one_seed(params, x, y), p))


def train_config(
    tx: optax.GradientTransformation,
    apply,
    evaluate,
    initial_params,
    data_keys,
    train: jax.Array,
    eval_data: tuple[jax.Array, jax.Array],
    *,
    steps: int,
    chunk: int,
    checkpoints: Sequence[int],
    batch_size: int,
    context: int,
    label: str = "",
    progress: bool = True,
) -> dict:
    """Trains one optimizer for every seed; returns curves and the final params and state.

    ``evaluate`` is :func:`make_evaluator`'s (compiled once for all optimizers).
    ``initial_params`` and ``data_keys`` are stacked over seeds. Curves are [seeds,
    len(checkpoints)] arrays: ``loss`` at the output weights (slow for a lookahead) and
    ``fast_loss`` at the params, both on ``eval_data``, and ``train_loss``, the mean
    minibatch loss at the params over the steps since the previous checkpoint (NaN at 0).
    Each ``chunk`` steps are one ``lax.scan``; the seeds run one after another inside the
    same ``jit`` (``lax.map``: on this CPU ``vmap`` over seeds was slower, and it would turn
    the lookahead's ``lax.cond`` into a select that runs both branches).
    """

    def seed_chunk(params, opt_state, data_key, start):
        def step(carry, index):
            params, opt_state = carry
            x, y = sample_batch(train, jax.random.fold_in(data_key, index), batch_size, context)
            loss, grads = jax.value_and_grad(partial(cross_entropy, apply))(params, x, y)
            params, opt_state = lo.update_and_apply(tx, grads, opt_state, params)
            return (params, opt_state), loss

        (params, opt_state), losses = jax.lax.scan(
            step, (params, opt_state), start + jnp.arange(chunk)
        )
        return params, opt_state, losses.sum()

    run_chunk = jax.jit(
        lambda p, s, keys, start: jax.lax.map(lambda a: seed_chunk(*a, start), (p, s, keys)),
        donate_argnums=(0, 1),
    )
    params = jax.tree.map(jnp.copy, initial_params)  # donated below; the caller's stay intact
    opt_state = jax.jit(jax.lax.map, static_argnums=0)(tx.init, params)
    two_loop = has_lookahead(opt_state)
    # The output: the slow weights for a lookahead (Lookahead's and SNOO's result).
    output_params = jax.jit(jax.vmap(lo.slow_params)) if two_loop else None
    num_seeds = len(data_keys)
    curves = {"loss": [], "fast_loss": [], "train_loss": []}

    def record(train_loss):
        fast_loss = evaluate(params, *eval_data)
        loss = evaluate(output_params(opt_state, params), *eval_data) if two_loop else fast_loss
        curves["loss"].append(np.asarray(loss))
        curves["fast_loss"].append(np.asarray(fast_loss))
        curves["train_loss"].append(np.asarray(train_loss))

    record(np.full(num_seeds, np.nan))
    train_sum, since = np.zeros(num_seeds), 0
    bar = tqdm(total=steps, desc=label, disable=not progress, leave=True)
    for start in range(0, steps, chunk):
        params, opt_state, chunk_sum = run_chunk(params, opt_state, data_keys, start)
        train_sum, since = train_sum + np.asarray(chunk_sum), since + chunk
        bar.update(chunk)
        if start + chunk in checkpoints:
            record(train_sum / since)
            train_sum, since = np.zeros(num_seeds), 0
            bar.set_postfix(loss=f"{curves['loss'][-1].mean():.4f}")
    bar.close()
    curves = {name: np.stack(values, axis=1) for name, values in curves.items()}
    return {"curves": curves, "params": params, "opt_state": opt_state, "two_loop": two_loop}


# -------------------------------------------------------------------------- reporting


def summarise(values) -> dict:
    """mean, sample std (ddof=1; 0 for one seed) and per-seed values."""
    values = np.asarray(values, dtype=np.float64)
    std = float(values.std(ddof=1)) if values.size > 1 else 0.0
    return {"mean": float(values.mean()), "std": std, "per_seed": values.tolist()}


def verdict(differences: Sequence[float]) -> str:
    """'better' / 'worse' when every seed's paired difference has that sign, else 'mixed'."""
    if all(d < 0 for d in differences):
        return "better"
    if all(d > 0 for d in differences):
        return "worse"
    return "mixed"


def _nan_to_none(tree):
    if isinstance(tree, dict):
        return {key: _nan_to_none(value) for key, value in tree.items()}
    if isinstance(tree, list):
        return [_nan_to_none(value) for value in tree]
    if isinstance(tree, float) and not math.isfinite(tree):
        return None
    return tree


def summarise_run(config: dict, curves: dict, baseline_curves: dict | None) -> dict:
    loss = curves["loss"][:, -1]
    result = {
        **config,
        "final": {
            "loss": summarise(loss),
            "bits": summarise(loss / math.log(2)),
            "fast_loss": summarise(curves["fast_loss"][:, -1]),
            "train_loss": summarise(curves["train_loss"][:, -1]),
        },
        "curves": {name: values.tolist() for name, values in curves.items()},
    }
    if baseline_curves is not None:
        differences = loss - baseline_curves["loss"][:, -1]
        result["vs_adamw"] = {
            "difference": summarise(differences),  # paired: same seed, init and batches
            "seeds_better": int((differences < 0).sum()),
            "verdict": verdict(differences.tolist()),
        }
    return result


def markdown_report(report: dict) -> str:
    split = report["eval_split"]
    results = report["results"]
    seeds = len(report["seeds"])
    before = report["checkpoints"][-2]  # the last checkpoint before the end: not a sync
    lines = [
        f"Command: `{report['command']}`",
        "",
        f"Corpus: `{report['corpus']['file']}` of CPython {report['corpus']['python']} "
        f"({report['corpus']['file_bytes']:,} bytes, sha256 `{report['corpus']['file_sha256']}`), "
        f"{report['corpus']['text_bytes']:,} bytes of help text. Model: {report['model']['text']}. "
        f"{report['steps']} steps of batch {report['batch_size']} x {report['model']['context']} "
        f"bytes, {seeds} seeds, jax {report['environment']['jax']} on "
        f"{report['environment']['cpu_count']} CPU cores, {report['seconds']:.0f} s wall "
        f"({report['cpu_seconds']:.0f} s CPU).",
        "",
        f"| Optimizer | {split} loss (nats/byte) after {report['steps']} steps | bits/byte "
        f"| paired difference vs AdamW (nats) | seeds better | step {before}: slow / fast |",
        "|---|---|---|---|---|---|",
    ]
    for result in results.values():
        final = result["final"]
        row = [
            result["label"],
            f"{final['loss']['mean']:.4f} ± {final['loss']['std']:.4f}",
            f"{final['bits']['mean']:.4f} ± {final['bits']['std']:.4f}",
        ]
        if "vs_adamw" in result:
            vs = result["vs_adamw"]
            row += [
                f"{vs['difference']['mean']:+.4f} ± {vs['difference']['std']:.4f} "
                f"({vs['verdict']})",
                f"{vs['seeds_better']}/{seeds}",
            ]
        else:
            row += ["(baseline)", ""]
        index = report["checkpoints"].index(before)
        slow, fast = (
            np.asarray(result["curves"][name], dtype=float)[:, index].mean()
            for name in ("loss", "fast_loss")
        )
        row.append(f"{slow:.4f} / {fast:.4f}" if result["kind"] != "adamw" else f"{slow:.4f}")
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        f"Mean ± sample std over {seeds} seeds; Lookahead and SNOO at their slow weights. "
        "Paired: each seed has its own initial weights and batches, shared by every optimizer; "
        "'better'/'worse' when every seed agrees, else 'mixed'. The final step is a sync for "
        "every k here, so the fast weights equal the slow ones there; the last column is "
        "the checkpoint before, between syncs.",
        "",
        f"{split.capitalize()} loss (nats/byte, mean over seeds) at the checkpoints; "
        "slow / fast weights for the two-loop methods:",
        "",
        "| Optimizer | " + " | ".join(str(step) for step in report["checkpoints"]) + " |",
        "|---|" + "---|" * len(report["checkpoints"]),
    ]
    for result in results.values():
        loss = np.asarray(result["curves"]["loss"], dtype=float).mean(0)
        fast = np.asarray(result["curves"]["fast_loss"], dtype=float).mean(0)
        cells = [
            f"{a:.3f}" if result["kind"] == "adamw" or a == b else f"{a:.3f} / {b:.3f}"
            for a, b in zip(loss, fast, strict=True)
        ]
        lines.append(f"| {result['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    """Held-out loss against steps: mean over seeds (min-max band); fast weights dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (full, zoom) = plt.subplots(1, 2, figsize=(13, 4.8))
    steps = np.asarray(report["checkpoints"])
    for result in report["results"].values():
        loss = np.asarray(result["curves"]["loss"], dtype=float)
        for axes, start in ((full, 0), (zoom, len(steps) // 2)):
            (line,) = axes.plot(
                steps[start:], loss.mean(0)[start:], "o-", ms=3, label=result["label"]
            )
            axes.fill_between(
                steps[start:],
                loss.min(0)[start:],
                loss.max(0)[start:],
                color=line.get_color(),
                alpha=0.15,
            )
            if result["kind"] != "adamw":
                fast = np.asarray(result["curves"]["fast_loss"], dtype=float).mean(0)
                axes.plot(steps[start:], fast[start:], ":", color=line.get_color())
    split = report["eval_split"]
    full.set(xlabel="step", ylabel=f"{split} loss (nats/byte)", title="whole run")
    zoom.set(xlabel="step", ylabel=f"{split} loss (nats/byte)", title="second half")
    zoom.legend(fontsize=7)
    for axes in (full, zoom):
        axes.grid(alpha=0.3)
    figure.suptitle(
        f"Byte-level transformer on CPython's pydoc_data help text: mean over "
        f"{len(report['seeds'])} seeds (band: min-max); dotted: fast weights"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# ------------------------------------------------------------------------------- main

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "runs" / "language_model"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model for a few steps")
    parser.add_argument("--tune", action="store_true", help="AdamW lr sweep on validation")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="output folder")
    for name, kind in (
        ("layers", int),
        ("d_model", int),
        ("heads", int),
        ("context", int),
        ("batch_size", int),
        ("steps", int),
        ("chunk", int),
        ("checkpoints", int),
        ("seeds", int),
        ("lr", float),
        ("diloco_k", int),
        ("eval_bytes", int),
    ):
        parser.add_argument(
            "--" + name.replace("_", "-"),
            type=kind,
            default=None,
            help=f"default {DEFAULTS[name]} (--quick: {QUICK[name]})",
        )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = parser.parse_args(argv)
    defaults = QUICK if args.quick else DEFAULTS
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def run(args: argparse.Namespace) -> tuple[dict, dict]:
    """Trains every config; returns the report and, per config, the final (params, state)."""
    start_time, start_cpu = time.perf_counter(), time.process_time()
    data, corpus = load_corpus()
    splits = split_corpus(data)
    eval_split = "validation" if args.tune else "test"
    init, apply, num_params = make_model_fns(args.layers, args.d_model, args.heads, args.context)
    seeds = list(range(args.seeds))
    keys = jax.vmap(jax.random.key)(jnp.asarray(seeds))
    initial_params = jax.jit(jax.vmap(init))(keys)
    data_keys = jax.vmap(lambda key: jax.random.fold_in(key, 1))(keys)
    train = jnp.asarray(splits["train"])
    eval_bytes = args.eval_bytes or len(splits[eval_split])
    eval_data = eval_windows(splits[eval_split][:eval_bytes], args.context)
    evaluate = make_evaluator(apply)

    if args.tune:
        configs = {
            f"adamw_lr{lr:g}": {"kind": "adamw", "label": f"AdamW (lr {lr:g})", "lr": lr}
            for lr in TUNE_LRS
        }
    else:
        configs = make_configs(args.lr, args.steps, args.diloco_k, quick=args.quick)
        for config in configs.values():
            config["lr"] = args.lr
    ks = sorted({config["k"] for config in configs.values() if "k" in config})
    checkpoints = checkpoint_steps(args.steps, args.chunk, args.checkpoints, ks)
    model_text = (
        f"{args.layers}-layer decoder-only transformer, d_model {args.d_model}, {args.heads} "
        f"heads, context {args.context} bytes, {num_params:,} parameters"
    )
    print(
        f"{corpus['file']} (CPython {corpus['python']}): {corpus['text_bytes']:,} bytes of text, "
        f"sha256 {corpus['text_sha256'][:16]}...; train {len(splits['train']):,} / {eval_split} "
        f"{len(splits[eval_split]):,} bytes; {model_text}; {args.steps} steps of batch "
        f"{args.batch_size}; seeds {seeds}; jax {jax.__version__} on {jax.default_backend()}"
    )
    results, finals = {}, {}
    for name, config in configs.items():
        tx = make_optimizer(config, config["lr"], args.steps)
        started, started_cpu = time.perf_counter(), time.process_time()
        trained = train_config(
            tx,
            apply,
            evaluate,
            initial_params,
            data_keys,
            train,
            eval_data,
            steps=args.steps,
            chunk=args.chunk,
            checkpoints=checkpoints,
            batch_size=args.batch_size,
            context=args.context,
            label=name,
            progress=not args.no_progress,
        )
        baseline = None if config["kind"] == "adamw" else results["adamw"]["_curves"]
        results[name] = summarise_run(config, trained["curves"], baseline)
        results[name]["_curves"] = trained["curves"]
        results[name]["seconds"] = round(time.perf_counter() - started, 1)
        results[name]["cpu_seconds"] = round(time.process_time() - started_cpu, 1)
        finals[name] = (trained["params"], trained["opt_state"])
    for result in results.values():
        del result["_curves"]

    command = "python benchmarks/language_model.py " + " ".join(args.argv)
    report = {
        "command": command.strip(),
        "corpus": corpus,
        "splits": {name: len(split) for name, split in splits.items()},
        "eval_split": eval_split,
        "eval_bytes_scored": int(eval_data[1].size),
        "model": {
            "layers": args.layers,
            "d_model": args.d_model,
            "heads": args.heads,
            "context": args.context,
            "parameters": num_params,
            "text": model_text,
        },
        "inner": "chain(clip_by_global_norm(1), adamw(warmup 5% + cosine to lr/10, b1 0.9, "
        "b2 0.99, weight decay 0.1 on matrices))",
        "steps": args.steps,
        "batch_size": args.batch_size,
        "checkpoints": checkpoints,
        "seeds": seeds,
        "lr": None if args.tune else args.lr,
        "tuning": "peak lr 4e-3 = TUNED_LR: --tune, results/language_model_tune.md",
        "seconds": round(time.perf_counter() - start_time, 1),
        # CPU time of this process (all threads): on a shared machine wall time also counts
        # the waits for other jobs' cores.
        "cpu_seconds": round(time.process_time() - start_cpu, 1),
        "load_average_at_end": os.getloadavg(),
        "environment": {
            "jax": jax.__version__,
            "optax": optax.__version__,
            "flax": flax.__version__,
            "lookahead_optax": lo.__version__,
            "backend": jax.default_backend(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
        },
        "results": results,
    }
    if args.tune:
        best = min(results.values(), key=lambda r: r["final"]["loss"]["mean"])
        report["tuned_lr"] = best["lr"]
    return report, finals


def main(argv: Sequence[str] | None = None, finals: dict | None = None) -> dict:
    """Runs the benchmark, prints the table, writes JSON, Markdown and PNG; returns the report.

    ``finals``, if given, receives each config's final ``(params, opt_state)``, stacked over
    seeds (the tests evaluate them independently).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.argv = argv
    report, trained = run(args)
    if finals is not None:
        finals.update(trained)
    stem = "language_model" + ("_tune" if args.tune else "_quick" if args.quick else "")
    table = markdown_report(report)
    if args.tune:
        table += f"\nTuned AdamW lr (lowest mean final validation loss): {report['tuned_lr']:g}\n"
    print()
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(_nan_to_none(report), indent=1) + "\n")
    (out / f"{stem}.md").write_text(table)
    plot(report, out / f"{stem}.png")
    print(f"wrote {out / stem}.{{json,md,png}} in {report['seconds']:.0f} s")
    return report


if __name__ == "__main__":
    main()

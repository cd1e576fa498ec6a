"""DiLoCo (``lookahead(..., workers=8)``) against data-parallel AdamW: held-out loss per byte sent.

Eight workers on eight devices (on a CPU, ``--xla_force_host_platform_device_count=8``, set
here before JAX starts), each with its own disjoint shard of the training data and the same
per-worker batch size, so every method takes the same steps on the same examples:

* **DP**: data-parallel AdamW. One copy of the params (replicated on the mesh); each step
  every worker computes the gradient of its minibatch and the 8 gradients are averaged
  (one all-reduce of one params' worth, every step).
* **DiLoCo**: ``lo.lookahead(AdamW, k, workers=8, outer=optax.sgd(0.7, momentum=0.9,
  nesterov=True))``: every worker takes k AdamW steps on its own shard, then the workers'
  pseudo-gradients are averaged (one all-reduce of one params' worth per sync) and the
  outer Nesterov step moves the shared slow weights. Evaluated at ``lo.slow_params``.
* **Averaging** (local SGD / FedAvg with an AdamW inner step): the same with
  ``outer=optax.sgd(1.0)``: at each sync the slow weights become the workers' mean.

**Bytes.** Each method's training step is compiled once (params and batches sharded over a
``("workers",)`` mesh with ``NamedSharding(mesh, P("workers"))``) and that compiled program
is the one that trains. Its HLO is parsed: the result bytes of every collective
(all-reduce, all-gather, reduce-scatter, collective-permute, all-to-all; a tuple's elements
summed), split into those every execution runs and those inside a conditional's branches.
Bytes sent = every-step bytes x steps + the sync branch's bytes x the number of syncs (read
from the final state's ``syncs``, and checked to be steps // k). The unit is the
all-reduce's *payload* per device (the size of the buffer being summed); a ring all-reduce
sends 2 (N - 1) / N = 1.75 times that per device, the same factor for every method.

**Tasks** (``--task all``, the default, runs both). ``digits``: the convergence benchmark's
MLP (two hidden ReLU layers of 256, 85,002 parameters) on scikit-learn's digits, the training
split cut into 8 disjoint random shards of 168 examples, held out: the test split (450
images); 400 steps, 16 examples per worker per step, k in {5, 20, 50, 100}, 3 seeds, constant
AdamW lrs tuned per method (TUNED below; ``--tune``: final validation loss on a quarter of the
training set). ``lm``: the byte-level transformer of ``benchmarks/language_model.py`` (its
corpus, splits, model, cross-entropy and inner AdamW with clipping and warmup-cosine decay,
imported from there; 136,704 parameters), its train split cut into 8 contiguous shards, held
out: its test split; 240 steps, 8 windows of 64 bytes per worker per step, k in {12, 48}, 2
seeds, that file's lr (tuned for single-worker AdamW; not tuned here), plus DiLoCo k=48 at a
tenth of it.

    python benchmarks/diloco.py                        # both tasks: 8 min on 2 busy cores
    python benchmarks/diloco.py --task digits          # digits only: 2 min
    python benchmarks/diloco.py --tune                 # the digits learning-rate sweep: 20 min
    python benchmarks/diloco.py --quick                # tiny runs for tests (~1 min: compiles)
    python benchmarks/diloco.py --outer-sweep          # outer lr x momentum: 40 min, 2 busy cores
    python benchmarks/diloco.py --outer-sweep --extend # + a third inner lr: 18 min more
    python benchmarks/diloco.py --out benchmarks/results   # rewrite the committed results

``--outer-sweep`` (digits): outer lr in {0.35, 0.7, 1.0, 1.4} x Nesterov momentum in {0, 0.5,
0.9} (1.0/0 is plain averaging, 0.7/0.9 DiLoCo's published setting) at k in {5, 20, 100},
each setting at two inner AdamW lrs (1e-3, 3e-3 at momentum 0; 3e-4, 1e-3 at 0.5; 1e-4, 3e-4
at 0.9), 3 seeds, 400 steps; reports which setting wins at each k and by how much (paired over
seeds) against averaging and 0.7/0.9, each at its best inner lr. The workers are vmapped on one
device (the same arithmetic as the sharded runs; no bytes are counted), and all settings and
seeds of one k are one compiled function. Writes ``<out>/diloco_outer[_quick].{json,md,png}``.

Writes ``<out>/diloco[_<task>][_quick].{json,md,png}`` (``_<task>`` unless ``--task all``;
``--out`` defaults to ``runs/diloco/``, ignored by git) and ``--tune`` ``diloco_tune.{json,md}``.
With ``--quick`` also ``..._final.npz``: per DiLoCo run and seed, the final worker params and
``lo.slow_params``, so a test can recompute the reported loss.
"""

from __future__ import annotations

import os

WORKERS = 8
_FLAG = f"--xla_force_host_platform_device_count={WORKERS}"
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from _hlo import collective_bytes  # noqa: E402

import lookahead_optax as lo  # noqa: E402

NESTEROV = (0.7, 0.9)  # DiLoCo's outer step: lr 0.7, momentum 0.9, Nesterov
DIGITS = {
    "steps": 400,  # a multiple of every k: every DiLoCo run ends on a sync
    "batch_size": 16,  # per worker; DP's global batch is 8 x 16 = 128
    "ks": (5, 20, 50, 100),
    "seeds": 3,
    "eval_every": 20,
    "weight_decay": 1e-4,
}
# Learning rates (constant, AdamW), from `--tune`: for each method, the lowest mean final
# validation loss over 3 seeds among 3e-5 .. 1e-2, with a quarter of the training set held
# out as validation. Results: results/diloco_tune.md. DiLoCo's Nesterov outer step amplifies
# the averaged update (up to 0.7 (1 + 0.9 / (1 - 0.9)) = 7x once its momentum builds up), so
# its inner lr comes out 10x below DP's.
TUNE_LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)  # then `--tune --lrs 3e-5`: 1e-4 was at the edge
TUNED = {
    "dp": 1e-3,
    **{f"nesterov_k{k}": 1e-4 for k in (5, 20, 50, 100)},
    "average_k5": 1e-3,
    "average_k20": 1e-2,
    "average_k50": 3e-3,
    "average_k100": 3e-3,
    "nesterov": 1e-4,  # other k
    "average": 3e-3,
}
LM = {
    "steps": 240,  # a multiple of every k
    "batch_size": 8,  # windows per worker; DP's global batch is 64 windows
    "ks": (12, 48),
    "average_ks": (48,),
    # DiLoCo k=48 again at a tenth of DP's lr (on digits its tuned inner lr was DP's / 10)
    "extra": (("nesterov", 48, 0.1),),
    "seeds": 2,
    "eval_every": 120,  # the whole test split, ~1-4 s an evaluation on 2 cores
    "lr": None,  # None: language_model.TUNED_LR (tuned there for single-worker AdamW)
}
QUICK_DIGITS = {"steps": 12, "batch_size": 4, "ks": (3, 5), "average_ks": (3,), "seeds": 2,
                "eval_every": 4, "weight_decay": 1e-4}  # fmt: skip
QUICK_LM = {"steps": 8, "batch_size": 2, "ks": (4,), "seeds": 1, "eval_every": 4, "lr": None}
QUICK_LM_MODEL = {"layers": 1, "d_model": 16, "heads": 2, "context": 16}
# --outer-sweep: DiLoCo's outer lr x Nesterov momentum at each k, every setting at each of
# the inner AdamW lrs (the outer step scales the averaged update, so the best inner lr moves
# with it). (1.0, 0) is plain averaging, (0.7, 0.9) DiLoCo's published setting.
# Two inner lrs per momentum, around the inner lrs --tune found for averaging (1e-3 to 1e-2)
# and for 0.7/0.9 (1e-4; results/diloco_tune.md): a full inner grid for every setting did
# not fit the 2 shared cores.
OUTER_SWEEP = {
    "steps": 400, "batch_size": 16, "ks": (5, 20, 100), "seeds": 3, "chunk": 100,
    "weight_decay": 1e-4, "outer_lrs": (0.35, 0.7, 1.0, 1.4), "momenta": (0.0, 0.5, 0.9),
    "inner_lrs": {0.0: (1e-3, 3e-3), 0.5: (3e-4, 1e-3), 0.9: (1e-4, 3e-4)}, "group": 12,
}  # fmt: skip
# --outer-sweep --extend: a third inner lr per momentum, above the first two (in the first
# run most settings were best at the upper of their two).
OUTER_SWEEP_EXTEND = {0.0: (1e-2,), 0.5: (3e-3,), 0.9: (1e-3,)}
QUICK_OUTER_SWEEP = {
    "steps": 8, "batch_size": 4, "ks": (2, 4), "seeds": 2, "chunk": 4, "weight_decay": 1e-4,
    "outer_lrs": (0.7, 1.0), "momenta": (0.0, 0.9),
    "inner_lrs": {0.0: (1e-3, 3e-3), 0.9: (1e-3, 3e-3)}, "group": 4,
}  # fmt: skip


# ------------------------------------------------------------------------------ tasks


class Task:
    """A model and data: one worker's params and loss, held-out evaluation, batches."""

    name: str
    num_params: int

    def init(self, seed: int):  # one worker's params
        raise NotImplementedError

    def loss(self, params, x, y):  # one worker's minibatch
        raise NotImplementedError

    def evaluate(self, params) -> dict:  # held-out metrics, jittable
        raise NotImplementedError

    def batches(self, seed: int, steps: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """[steps, WORKERS, batch_size, ...] inputs and targets, worker w from its shard."""
        raise NotImplementedError


class DigitsTask(Task):
    """The convergence benchmark's MLP on digits; 8 disjoint random shards of the train set."""

    name = "digits"

    def __init__(self, validation: bool = False):
        from _data import load_digits
        from convergence import MLP

        data = load_digits()
        x_train, y_train, x_test, y_test = data.x_train, data.y_train, data.x_test, data.y_test
        if validation:  # --tune: hold out a quarter of the training set, never the test set
            order = np.random.default_rng(1).permutation(len(x_train))
            cut = len(x_train) // 4
            x_test, y_test = x_train[order[:cut]], y_train[order[:cut]]
            x_train, y_train = x_train[order[cut:]], y_train[order[cut:]]
        self.held_out = "validation" if validation else "test"
        order = np.random.default_rng(0).permutation(len(x_train))
        per_worker = len(x_train) // WORKERS
        self.shards = [order[w * per_worker : (w + 1) * per_worker] for w in range(WORKERS)]
        self.x_train, self.y_train = x_train, y_train
        self.x_test, self.y_test = jnp.asarray(x_test), jnp.asarray(y_test)
        self.model = MLP(data.num_classes)
        self.num_params = sum(p.size for p in jax.tree.leaves(self.init(0)))
        self.info = {
            "train_examples": len(x_train), "per_worker_shard": per_worker,
            "held_out": self.held_out, "held_out_examples": len(x_test),
            "dropped_examples": len(x_train) - WORKERS * per_worker,
        }  # fmt: skip

    def init(self, seed):
        return self.model.init(jax.random.key(seed), jnp.asarray(self.x_train[:1]))

    def loss(self, params, x, y):
        logits = self.model.apply(params, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def evaluate(self, params):
        logits = self.model.apply(params, self.x_test)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, self.y_test).mean()
        return {"loss": loss, "accuracy": (logits.argmax(-1) == self.y_test).mean()}

    def batches(self, seed, steps, batch_size):
        index = np.empty((steps, WORKERS, batch_size), np.int64)
        for w, shard in enumerate(self.shards):
            rng = np.random.default_rng([seed, w])
            epochs = math.ceil(steps * batch_size / len(shard))
            stream = np.concatenate([rng.permutation(shard) for _ in range(epochs)])
            index[:, w] = stream[: steps * batch_size].reshape(steps, batch_size)
        return self.x_train[index], self.y_train[index]


class LanguageModelTask(Task):
    """benchmarks/language_model.py's transformer and corpus; 8 contiguous train shards."""

    name = "lm"

    def __init__(self, quick: bool = False):
        import language_model as lm

        self.lm = lm
        config = QUICK_LM_MODEL if quick else {k: lm.DEFAULTS[k] for k in QUICK_LM_MODEL}
        self.context = config["context"]
        init, self.apply, self.num_params = lm.make_model_fns(**config)
        self._init = init
        data, self.corpus = lm.load_corpus()
        splits = lm.split_corpus(data)
        per_worker = len(splits["train"]) // WORKERS
        self.shards = [
            splits["train"][w * per_worker : (w + 1) * per_worker] for w in range(WORKERS)
        ]
        self.eval_x, self.eval_y = lm.eval_windows(splits["test"], self.context)
        if quick:
            self.eval_x, self.eval_y = self.eval_x[:64], self.eval_y[:64]
        self.model_config = config
        self.info = {
            "model": config, "train_bytes": len(splits["train"]), "per_worker_shard": per_worker,
            "held_out": "test", "held_out_windows": int(self.eval_x.shape[0]),
            "corpus_matches_recorded": self.corpus["matches_recorded"],
        }  # fmt: skip

    def init(self, seed):
        return self._init(jax.random.key(seed))

    def loss(self, params, x, y):
        return self.lm.cross_entropy(self.apply, params, x, y)

    def evaluate(self, params):
        return {"loss": self.lm.cross_entropy(self.apply, params, self.eval_x, self.eval_y)}

    def batches(self, seed, steps, batch_size):
        xs = np.empty((steps, WORKERS, batch_size, self.context), np.int32)
        ys = np.empty_like(xs)
        for w, shard in enumerate(self.shards):
            rng = np.random.default_rng([seed, w, 1])
            starts = rng.integers(0, len(shard) - self.context, size=(steps, batch_size))
            windows = shard[starts[..., None] + np.arange(self.context + 1)].astype(np.int32)
            xs[:, w], ys[:, w] = windows[..., :-1], windows[..., 1:]
        return xs, ys


# --------------------------------------------------------------------------- methods


def inner_optimizer(task: Task, lr: float, steps: int, weight_decay: float | None):
    if task.name == "lm":
        return task.lm.inner_adamw(lr, steps)
    return optax.adamw(lr, weight_decay=weight_decay)


def make_methods(ks, lrs: dict, average_ks=None, extra=()) -> dict[str, dict]:
    methods = {"dp": {"kind": "dp", "k": None, "lr": lrs["dp"], "label": "DP AdamW"}}
    names = {"nesterov": "DiLoCo", "average": "Averaging"}
    for outer in ("nesterov", "average"):
        for k in ks if outer == "nesterov" or average_ks is None else average_ks:
            key = f"{outer}_k{k}"
            lr = lrs.get(key, lrs.get(outer))
            methods[key] = {"kind": outer, "k": k, "lr": lr, "label": f"{names[outer]} k={k}"}
    for outer, k, scale in extra:  # the same at another inner lr: DP's lr times scale
        lr = lrs["dp"] * scale
        methods[f"{outer}_k{k}_lr{lr:g}"] = {
            "kind": outer, "k": k, "lr": lr, "label": f"{names[outer]} k={k}, lr {lr:g}",
        }  # fmt: skip
    return methods


def outer_optimizer(kind: str):
    if kind == "nesterov":
        return optax.sgd(NESTEROV[0], momentum=NESTEROV[1], nesterov=True)
    return optax.sgd(1.0)  # phi <- mean of the workers' params


def compile_step(task: Task, method: dict, tx, params, x, y, mesh):
    """The method's training step, compiled for the mesh; params and batches as placed."""
    if method["kind"] == "dp":

        def worker_grads(params, x, y):  # on each device: its worker's minibatch
            # Device-varying params, so the gradient is this worker's alone (the gradient
            # of invariant params would already be summed over the workers, by autodiff).
            params = jax.tree.map(lambda p: jax.lax.pcast(p, "workers", to="varying"), params)
            grads = jax.grad(task.loss)(params, x[0], y[0])
            return jax.lax.pmean(grads, "workers")  # the all-reduce

        spec = PartitionSpec("workers")
        mean_grads = jax.shard_map(
            worker_grads, mesh=mesh, in_specs=(PartitionSpec(), spec, spec),
            out_specs=PartitionSpec(),
        )  # fmt: skip

        def step(params, opt_state, x, y):
            grads = mean_grads(params, x, y)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

    else:

        def step(params, opt_state, x, y):
            grads = jax.vmap(jax.grad(task.loss))(params, x, y)
            return lo.update_and_apply(tx, grads, opt_state, params)

    with jax.set_mesh(mesh):
        opt_state = jax.eval_shape(tx.init, params)
        compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, x, y).compile()
    return compiled


class Runner:
    """One method on one task: its step compiled once (the program counted), then any seed."""

    def __init__(self, task: Task, method: dict, cfg: dict, mesh):
        self.task, self.method, self.cfg, self.mesh = task, method, cfg, mesh
        self.sharded = NamedSharding(mesh, PartitionSpec("workers"))
        self.replicated = NamedSharding(mesh, PartitionSpec())
        inner = inner_optimizer(task, method["lr"], cfg["steps"], cfg.get("weight_decay"))
        if method["kind"] == "dp":
            self.tx = inner
        else:
            outer = outer_optimizer(method["kind"])
            options = {name: COMM_DTYPES.get(value, value) if name == "communication_dtype"
                       else value for name, value in method.get("options", {}).items()}  # fmt: skip
            self.tx = lo.lookahead(inner, k=method["k"], outer=outer, workers=WORKERS, **options)
        self.init = jax.jit(self.tx.init)
        params = self.place(task.init(0))
        xs, ys = task.batches(0, 1, cfg["batch_size"])
        self.step = compile_step(task, method, self.tx, params, self.put(xs[0]),
                                 self.put(ys[0]), mesh)  # fmt: skip
        self.communication = collective_bytes(self.step.as_text())

        self._evaluate = jax.jit(task.evaluate)

    def evaluate(self, params, opt_state) -> dict:
        """Held-out metrics at DP's params or DiLoCo's slow weights, on one device (the
        evaluated weights are replicated: evaluating on the mesh would repeat it 8 times)."""
        if self.method["kind"] != "dp":
            params = lo.slow_params(opt_state, params)
        metrics = self._evaluate(jax.device_get(params))  # via the host: 1 device
        return {name: float(value) for name, value in metrics.items()}

    def put(self, batch):
        return jax.device_put(batch, self.sharded)

    def place(self, params):
        if self.method["kind"] == "dp":
            return jax.device_put(params, self.replicated)
        return jax.device_put(lo.replicate(params, WORKERS), self.sharded)

    def train(self, seed: int) -> dict:
        task, method, cfg = self.task, self.method, self.cfg
        steps, k = cfg["steps"], method["k"]
        params = self.place(task.init(seed))
        with jax.set_mesh(self.mesh):
            opt_state = self.init(params)
        xs, ys = task.batches(seed, steps, cfg["batch_size"])
        eval_steps = set(range(0, steps + 1, cfg["eval_every"])) | {steps}
        if method["kind"] == "dp":  # DP after as many steps as a DiLoCo run syncs: equal bytes
            eval_steps |= {steps // kk for kk in cfg["ks"]}
        curve = []
        start = time.perf_counter()
        for t in range(steps + 1):
            if t in eval_steps:
                curve.append({"step": t, **self.evaluate(params, opt_state)})
            if t < steps:
                params, opt_state = self.step(params, opt_state, self.put(xs[t]), self.put(ys[t]))
                # One step in flight at a time: with several queued, XLA:CPU's in-process
                # all-reduce over 8 host devices deadlocked here (a rendezvous that one
                # device never joined; jax 0.10.2, 2 cores), within a few hundred steps.
                jax.block_until_ready(params)
        seconds = time.perf_counter() - start

        communication = self.communication
        branches = [b for b in communication["branches"] if any(b)]
        if method["kind"] == "dp":
            if branches:
                raise AssertionError(f"DP's step has collectives inside a conditional: {branches}")
            syncs, sync_bytes = 0, 0
        else:
            if len(branches) != 1 or sorted(branches[0])[-2:-1] != [0]:
                raise AssertionError(f"expected one conditional with one communicating branch, "
                                     f"got {communication['branches']}")  # fmt: skip
            syncs, sync_bytes = int(opt_state.syncs), max(branches[0])
            if syncs != steps // k:
                raise AssertionError(f"{syncs} syncs in {steps} steps with k={k}")
        per_step = communication["every_step"]
        curve_bytes = lambda t: per_step * t + sync_bytes * (t // k if k else 0)  # noqa: E731
        for point in curve:
            point["bytes"] = curve_bytes(point["step"])
        result = {
            "seed": seed, "final": curve[-1], "curve": curve, "seconds": seconds,
            "hlo": {**communication, "sync_branch_bytes": sync_bytes, "syncs": syncs},
            "bytes": curve_bytes(steps),
        }  # fmt: skip
        if method["kind"] != "dp":
            slow = lo.slow_params(opt_state, params)
            result["arrays"] = {"params": jax.device_get(params), "slow": jax.device_get(slow)}
        return result


def summarise(values) -> dict:
    values = np.asarray(values, np.float64)
    std = float(values.std(ddof=1)) if values.size > 1 else 0.0
    return {"mean": float(values.mean()), "std": std, "per_seed": values.tolist()}


def run_task(task: Task, cfg: dict, lrs: dict, mesh, progress: bool = True) -> dict:
    methods = make_methods(cfg["ks"], lrs, cfg.get("average_ks"), cfg.get("extra", ()))
    seeds = list(range(cfg["seeds"]))
    results, arrays = {}, {}
    params_bytes = 4 * task.num_params
    for name, method in methods.items():
        runs, compile_start = [], time.perf_counter()
        runner = Runner(task, method, cfg, mesh)
        compile_seconds = time.perf_counter() - compile_start
        for seed in seeds:
            run = runner.train(seed)
            if "arrays" in run:
                arrays[(name, seed)] = run.pop("arrays")
            runs.append(run)
        metrics = runs[0]["final"].keys() - {"step", "bytes"}
        results[name] = {
            **method,
            "final": {m: summarise([r["final"][m] for r in runs]) for m in sorted(metrics)},
            "bytes": runs[0]["bytes"],
            "bytes_per_params": runs[0]["bytes"] / params_bytes,
            "hlo": runs[0]["hlo"],
            "seconds": sum(r["seconds"] for r in runs),
            "compile_seconds": compile_seconds,
            "curves": [r["curve"] for r in runs],
        }
        if any(r["bytes"] != runs[0]["bytes"] for r in runs):
            raise AssertionError(f"{name}: seeds moved different bytes")
        if progress:
            final = results[name]["final"]["loss"]
            print(f"  {task.name} {name:14s} held-out loss {final['mean']:.4f} ± {final['std']:.4f}"
                  f"  {results[name]['bytes'] / 1e6:9.2f} MB  {results[name]['seconds']:.1f} s",
                  flush=True)  # fmt: skip
    dp_curves = results["dp"]["curves"]
    for name, result in results.items():  # DP after the same bytes (steps // k steps)
        if result["k"]:
            at = cfg["steps"] // result["k"]
            losses = [next(p["loss"] for p in c if p["step"] == at) for c in dp_curves]
            result["dp_at_equal_bytes"] = {"step": at, "loss": summarise(losses)}
    return {
        "task": task.name, "config": dict(cfg, ks=list(cfg["ks"])), "learning_rates": lrs,
        "num_params": task.num_params, "params_bytes": params_bytes, "info": task.info,
        "methods": results,
    }, arrays  # fmt: skip


# --------------------------------------------------------------------------- reports


def _fmt(summary: dict, digits: int = 4, scale: float = 1.0) -> str:
    return f"{summary['mean'] * scale:.{digits}f} ± {summary['std'] * scale:.{digits}f}"


def markdown(report: dict) -> str:
    lines = [f"Command: `{report['command']}`", ""]
    for task in report["tasks"].values():
        cfg = task["config"]
        lines += [
            f"### {task['task']}: {WORKERS} workers, {cfg['steps']} steps, per-worker batch "
            f"{cfg['batch_size']}, {cfg['seeds']} seeds", "",
            f"{task['num_params']:,} parameters = {task['params_bytes']:,} bytes (f32); "
            f"{task['seconds']:.0f} s.", "",
        ]  # fmt: skip
        has_acc = "accuracy" in next(iter(task["methods"].values()))["final"]
        header = "| Method | Inner lr | Held-out loss | " + ("Accuracy (%) | " if has_acc else "")
        header += "All-reduce bytes (payload) | x params | Syncs | DP loss at equal bytes |"
        lines += [header, "|---" * (header.count("|") - 1) + "|"]
        for result in task["methods"].values():
            row = f"| {result['label']} | {result['lr']:g} | {_fmt(result['final']['loss'])} | "
            if has_acc:
                row += f"{_fmt(result['final']['accuracy'], 2, 100)} | "
            syncs = result["hlo"]["syncs"] if result["k"] else f"{cfg['steps']} (every step)"
            equal = result.get("dp_at_equal_bytes")
            equal = f"{_fmt(equal['loss'])} ({equal['step']} steps)" if equal else "—"
            row += (f"{result['bytes']:,} | {result['bytes_per_params']:g} | {syncs} | "
                    f"{equal} |")  # fmt: skip
            lines.append(row)
        lines.append("")
    lines += [
        "Mean ± sample std over seeds, held-out split, at equal steps and equal examples (every "
        "method takes the same steps on the same per-worker batches). DiLoCo and Averaging are "
        "evaluated at their slow weights (`lo.slow_params`). Bytes: collective result bytes "
        "in each method's compiled step (HLO), times executions: DP's gradient all-reduce every "
        "step, DiLoCo's only in the sync branch, once per sync. Payload per device; a ring "
        "all-reduce sends 1.75x that. 'DP loss at equal bytes': DP after steps // k steps.",
        "",
    ]  # fmt: skip
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(report["tasks"].values())
    fig, axes = plt.subplots(len(tasks), 2, figsize=(12, 4.5 * len(tasks)), squeeze=False)
    colours = {"dp": "black", "nesterov": "tab:blue", "average": "tab:orange"}
    for row, task in zip(axes, tasks):
        ks = task["config"]["ks"]
        markers = dict(zip(ks, "osD^v<>"))
        for name, result in task["methods"].items():
            loss = result["final"]["loss"]
            marker = markers.get(result["k"], "*")
            colour = colours[result["kind"]]
            extra = "lr" in name.removeprefix(f"{result['kind']}_k{result['k']}")
            face = "white" if extra else colour  # hollow: a run at another inner lr
            row[0].errorbar(result["bytes"], loss["mean"], yerr=loss["std"], fmt=marker,
                            color=colour, mfc=face, label=result["label"], ms=7,
                            capsize=3)  # fmt: skip
            curve = result["curves"][0]
            points = [(p["bytes"], np.mean([c[i]["loss"] for c in result["curves"]]))
                      for i, p in enumerate(curve) if p["bytes"] > 0]  # fmt: skip
            if points:
                row[1].plot(*zip(*points), marker=marker, ms=3, color=colour, mfc=face,
                            ls=":" if extra else "-", label=result["label"], alpha=0.8)  # fmt: skip
        for ax, title in zip(row, ("after all steps (mean ± std)", "during training (mean)")):
            ax.set_xscale("log")
            ax.set_xlabel("all-reduce bytes sent per device (payload, from the compiled HLO)")
            ax.set_ylabel("held-out loss" + (" (nats/byte)" if task["task"] == "lm" else ""))
            ax.set_title(f"{task['task']}: {title}")
            ax.grid(True, which="both", alpha=0.3)
        dp = task["methods"]["dp"]["final"]["loss"]["mean"]
        row[0].axhline(dp, color="black", ls="--", lw=0.8, label="DP (after all steps)")
        row[1].set_yscale("log")
        row[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _jsonable(tree):
    if isinstance(tree, dict):
        return {str(k): _jsonable(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_jsonable(v) for v in tree]
    if isinstance(tree, float) and not math.isfinite(tree):
        return None
    return tree


# ------------------------------------------------------------------------------ tune


def tune(mesh, lrs=TUNE_LRS, previous: dict | None = None, progress=True) -> dict:
    """Digits: each method's AdamW lr by final validation loss, 3 seeds.

    ``previous`` (an earlier ``diloco_tune.json``) is extended: its learning rates are
    kept unless run again, so a sweep can be widened without rerunning it.
    """
    task = DigitsTask(validation=True)
    cfg = dict(DIGITS)
    table = {
        name: dict(by_lr) for name, by_lr in (previous or {}).get("validation_loss", {}).items()
    }
    for lr in lrs:
        if progress:
            print(f"lr {lr:g}", flush=True)
        result, _ = run_task(task, cfg, {"dp": lr, "nesterov": lr, "average": lr}, mesh, progress)
        for name, method in result["methods"].items():
            table.setdefault(name, {})[f"{lr:g}"] = method["final"]["loss"]
    table = {name: dict(sorted(by_lr.items(), key=lambda item: float(item[0])))
             for name, by_lr in table.items()}  # fmt: skip
    best = {name: min(by_lr, key=lambda lr: by_lr[lr]["mean"]) for name, by_lr in table.items()}
    return {"validation_loss": table, "best_lr": best, "info": task.info, "config": cfg}


def tune_markdown(tuned: dict) -> str:
    lrs = sorted({lr for by_lr in tuned["validation_loss"].values() for lr in by_lr}, key=float)
    commands = "; ".join(f"`{c}`" for c in tuned["commands"])
    lines = [f"Commands: {commands}", "", "| Method | " + " | ".join(f"lr {lr}" for lr in lrs)
             + " | best |", "|---" * (len(lrs) + 2) + "|"]  # fmt: skip
    for name, by_lr in tuned["validation_loss"].items():
        cells = [_fmt(by_lr[lr]) if lr in by_lr else "" for lr in lrs]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {tuned['best_lr'][name]} |")
    lines += ["", "Final validation loss (a quarter of the digits training set held out, the rest "
              "cut into the 8 worker shards), mean ± std over 3 seeds, AdamW at a constant lr, "
              f"{DIGITS['steps']} steps.", ""]  # fmt: skip
    return "\n".join(lines)


# ------------------------------------------------------------------------ outer sweep


def outer_tx(inner_lr, outer_lr, momentum, k: int, weight_decay: float):
    """DiLoCo on WORKERS workers: AdamW inside, SGD with Nesterov momentum outside.

    All three hyperparameters may be traced (vmapped); momentum 0 is plain SGD on the
    pseudo-gradient, so outer lr 1.0 with momentum 0 is plain averaging."""
    inner = optax.adamw(inner_lr, weight_decay=weight_decay)
    outer = optax.sgd(outer_lr, momentum=momentum, nesterov=True)
    return lo.lookahead(inner, k=k, outer=outer, workers=WORKERS)


def outer_sweep_configs(cfg: dict) -> list[tuple[float, float, float]]:
    """(inner lr, outer lr, momentum) of every run at one k: each outer setting at the inner
    lrs listed for its momentum."""
    return [(inner_lr, outer_lr, momentum)
            for momentum in cfg["momenta"] for outer_lr in cfg["outer_lrs"]
            for inner_lr in cfg["inner_lrs"][momentum]]  # fmt: skip


def outer_sweep_runs(task: Task, cfg: dict, progress: bool = True) -> dict:
    """Every (inner lr, outer lr, momentum, seed) at each k, on one device.

    The 8 workers are the leading axis of the params (``lo.lookahead(..., workers=8)``), as
    in the sharded runs but unsharded: the sweep measures loss, not bytes. At each k one
    ``jit`` holds a ``lax.scan`` over ``chunk`` steps, vmapped over a group of configurations
    (:func:`outer_sweep_configs`) and the seeds; it is called per group and chunk. Returns
    ``{(k, inner lr, outer lr, momentum): {"loss", "accuracy"}}``, arrays [seeds, chunks]
    (held-out, at ``lo.slow_params`` after each chunk).
    """
    steps, chunk, seeds = cfg["steps"], cfg["chunk"], list(range(cfg["seeds"]))
    if steps % chunk:
        raise ValueError(f"steps ({steps}) must be a multiple of chunk ({chunk})")
    configs = outer_sweep_configs(cfg)
    group = cfg["group"]
    if len(configs) % group:
        raise ValueError(f"{len(configs)} configurations do not split into groups of {group}")
    data = [task.batches(seed, steps, cfg["batch_size"]) for seed in seeds]
    xs = np.stack([x for x, _ in data])  # [S, steps, W, B, ...]
    ys = np.stack([y for _, y in data])
    params0 = jax.tree.map(lambda *p: jnp.stack(p), *[
        lo.replicate(task.init(seed), WORKERS) for seed in seeds])  # fmt: skip
    runs = {}
    bar = tqdm(total=len(cfg["ks"]) * len(configs) // group * (steps // chunk),
               desc="outer sweep", disable=not progress)  # fmt: skip
    for k in cfg["ks"]:

        def tx_of(hp, k=k):
            return outer_tx(hp["inner_lr"], hp["outer_lr"], hp["momentum"], k,
                            cfg["weight_decay"])  # fmt: skip

        def init_one(hp, params):
            return tx_of(hp).init(params)

        def chunk_one(hp, params, opt_state, x, y):
            tx = tx_of(hp)

            def step(carry, batch):
                params, opt_state = carry
                grads = jax.vmap(jax.grad(task.loss))(params, *batch)  # per worker
                updates, opt_state = tx.update(grads, opt_state, params)
                return (optax.apply_updates(params, updates), opt_state), None

            (params, opt_state), _ = jax.lax.scan(step, (params, opt_state), (x, y))
            metrics = task.evaluate(lo.slow_params(opt_state, params))
            return params, opt_state, metrics["loss"], metrics["accuracy"]

        # configurations outside, seeds inside; the batches are per seed
        init_all = jax.jit(jax.vmap(jax.vmap(init_one, (None, 0)), (0, None)))
        run_chunk = jax.jit(
            jax.vmap(jax.vmap(chunk_one, (None, 0, 0, 0, 0)), (0, 0, 0, None, None)),
            donate_argnums=(1, 2),
        )
        for g in range(0, len(configs), group):
            batch = configs[g : g + group]
            hp = {name: jnp.asarray([c[i] for c in batch], jnp.float32)
                  for i, name in enumerate(("inner_lr", "outer_lr", "momentum"))}  # fmt: skip
            params = jax.tree.map(lambda p: jnp.broadcast_to(p, (group, *p.shape)), params0)
            opt_state = init_all(hp, params0)
            loss, accuracy = [], []
            for c in range(steps // chunk):
                window = slice(c * chunk, (c + 1) * chunk)
                params, opt_state, chunk_loss, chunk_acc = run_chunk(
                    hp, params, opt_state, xs[:, window], ys[:, window]
                )
                loss.append(np.asarray(chunk_loss))
                accuracy.append(np.asarray(chunk_acc))
                bar.set_postfix(k=k, best=f"{np.nanmin(loss[-1].mean(-1)):.4f}")
                bar.update(1)
            if not (np.asarray(opt_state.syncs) == steps // k).all():
                raise AssertionError(f"{opt_state.syncs} syncs in {steps} steps with k={k}")
            loss, accuracy = np.stack(loss, -1), np.stack(accuracy, -1)  # [group, S, chunks]
            for i, config in enumerate(batch):
                runs[(k, *config)] = {"loss": loss[i], "accuracy": accuracy[i]}
    bar.close()
    return runs


def paired(a, b) -> dict:
    """a - b per seed (the same seeds: same initial weights and batches): mean, std, wins."""
    diff = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    return {**summarise(diff), "a_lower_on": int((diff < 0).sum()), "seeds": int(diff.size)}


def outer_sweep_report(cfg: dict, runs: dict) -> dict:
    """Per k: each outer setting at its best inner lr, the winner, and its margins."""
    per_k = {}
    for k in cfg["ks"]:
        settings, seeds_of = {}, {}
        for momentum in cfg["momenta"]:
            for outer_lr in cfg["outer_lrs"]:
                inner_lrs = cfg["inner_lrs"][momentum]
                final = {lr: runs[(k, lr, outer_lr, momentum)] for lr in inner_lrs}
                means = [final[lr]["loss"][:, -1].mean() for lr in inner_lrs]
                means = [m if np.isfinite(m) else np.inf for m in means]
                best = inner_lrs[int(np.argmin(means))]
                key = f"{outer_lr:g}/{momentum:g}"
                settings[key] = {
                    "outer_lr": outer_lr, "momentum": momentum, "best_inner_lr": best,
                    "loss": summarise(final[best]["loss"][:, -1]),
                    "accuracy": summarise(final[best]["accuracy"][:, -1]),
                    "by_inner_lr": {f"{lr:g}": summarise(final[lr]["loss"][:, -1])
                                    for lr in inner_lrs},
                }  # fmt: skip
                seeds_of[key] = final[best]["loss"][:, -1]
        ranked = sorted(settings, key=lambda key: np.nan_to_num(
            settings[key]["loss"]["mean"], nan=np.inf))  # fmt: skip
        winner = ranked[0]
        margins = {}
        for name, key in (("averaging", "1/0"), ("diloco", "0.7/0.9"), ("runner_up", ranked[1])):
            if key in settings:
                margin = paired(seeds_of[winner], seeds_of[key])
                margins[name] = {"setting": key, "loss": settings[key]["loss"],
                                 "winner_minus_it": margin}  # fmt: skip
        per_k[str(k)] = {"k": k, "syncs": cfg["steps"] // k, "winner": winner,
                         "ranking": ranked, "margins": margins, "settings": settings}  # fmt: skip
    return per_k


def outer_sweep_markdown(report: dict) -> str:
    cfg, env = report["config"], report["environment"]
    lines = [
        f"Command: `{report['command']}`", "",
        f"Machine: {env['cpu']} ({env['cpus']} cores, shared), jax {env['jax']}, optax "
        f"{env['optax']}, Python {env['python']}; {report['seconds']:.0f} s wall.", "",
        f"digits MLP ({report['num_params']:,} parameters), {WORKERS} workers on disjoint shards "
        f"of {report['info']['per_worker_shard']} training images, {cfg['steps']} steps of "
        f"{cfg['batch_size']} examples per worker, AdamW inside (weight decay "
        f"{cfg['weight_decay']:g}, constant lr), outer step `optax.sgd(lr, momentum=mu, "
        f"nesterov=True)`, {cfg['seeds']} seeds (paired: each seed's initial weights and batches "
        "are shared by every setting). Held-out loss on the test split at `lo.slow_params` after "
        "the last step (a sync for every k). Each outer setting is shown at its best inner lr "
        "among those run for its momentum ("
        + "; ".join(f"momentum {m}: {', '.join(f'{lr:g}' for lr in lrs)}"
                    for m, lrs in cfg["inner_lrs"].items())
        + "), picked on the same held-out split (the same optimism for every setting).", "",
        "### Winner per k", "",
        "| k (syncs) | winner: outer lr/momentum (inner lr) | held-out loss | accuracy (%) | "
        "vs plain averaging 1/0 | vs DiLoCo 0.7/0.9 | vs runner-up |",
        "|---|---|---|---|---|---|---|",
    ]  # fmt: skip

    def margin(m):
        d = m["winner_minus_it"]
        if d["std"] == 0 and d["mean"] == 0:
            return f"{m['setting']} is the winner"
        return (f"{m['setting']} at {m['loss']['mean']:.4f}: Δ {d['mean']:+.4f} ± {d['std']:.4f} "
                f"(lower on {d['a_lower_on']}/{d['seeds']} seeds)")  # fmt: skip

    for k, r in report["per_k"].items():
        w = r["settings"][r["winner"]]
        cells = [margin(r["margins"][n]) if n in r["margins"] else "—"
                 for n in ("averaging", "diloco", "runner_up")]  # fmt: skip
        lines.append(
            f"| {k} ({r['syncs']}) | {r['winner']} ({w['best_inner_lr']:g}) | "
            f"{_fmt(w['loss'])} | {_fmt(w['accuracy'], 2, 100)} | " + " | ".join(cells) + " |"
        )
    lines += ["", "Δ: winner minus the other setting, per seed (each at its own best inner lr); "
              "mean ± sample std over seeds.", ""]  # fmt: skip
    for k, r in report["per_k"].items():
        mus = cfg["momenta"]
        lines += [f"### k = {k}: held-out loss at the best inner lr (that lr)", "",
                  "| outer lr | " + " | ".join(f"momentum {m:g}" for m in mus) + " |",
                  "|---" * (len(mus) + 1) + "|"]  # fmt: skip
        for olr in cfg["outer_lrs"]:
            cells = []
            for mu in mus:
                s = r["settings"][f"{olr:g}/{mu:g}"]
                cells.append(f"{_fmt(s['loss'])} ({s['best_inner_lr']:g})"
                             if math.isfinite(s["loss"]["mean"]) else "diverged")  # fmt: skip
            lines.append(f"| {olr:g} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [
        "### Every run: held-out loss per inner lr",
        "",
        "| k | outer lr/momentum | held-out loss at each inner lr |",
        "|---|---|---|",
    ]
    for k, r in report["per_k"].items():
        for key, s in r["settings"].items():
            cells = [f"{lr}: " + (_fmt(v) if math.isfinite(v["mean"]) else "diverged")
                     for lr, v in s["by_inner_lr"].items()]  # fmt: skip
            lines.append(f"| {k} | {key} | " + "; ".join(cells) + " |")
    lines.append("")
    return "\n".join(lines)


def outer_sweep_plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = report["config"]
    ks = list(report["per_k"])
    fig, axes = plt.subplots(1, len(ks), figsize=(4.8 * len(ks), 4.2), squeeze=False)
    for ax, k in zip(axes[0], ks):
        r = report["per_k"][k]
        grid = np.array([[r["settings"][f"{o:g}/{m:g}"]["loss"]["mean"] for m in cfg["momenta"]]
                         for o in cfg["outer_lrs"]], float)  # fmt: skip
        grid[~np.isfinite(grid)] = np.nan
        best = np.nanmin(grid)
        top = min(np.nanmax(grid), 3 * best)
        image = ax.imshow(grid, cmap="viridis_r", vmin=best, vmax=top, aspect="auto")
        for i, o in enumerate(cfg["outer_lrs"]):
            for j, m in enumerate(cfg["momenta"]):
                s = r["settings"][f"{o:g}/{m:g}"]
                bold = "bold" if f"{o:g}/{m:g}" == r["winner"] else "normal"
                ax.text(j, i, f"{s['loss']['mean']:.3f}\n±{s['loss']['std']:.3f}\n"
                        f"({s['best_inner_lr']:g})", ha="center", va="center", fontsize=7,
                        weight=bold,  # white on the dark end of the colour map
                        color="white" if grid[i, j] > best + 0.55 * (top - best)
                        else "black")  # fmt: skip
        ax.set_xticks(range(len(cfg["momenta"])), [f"{m:g}" for m in cfg["momenta"]])
        ax.set_yticks(range(len(cfg["outer_lrs"])), [f"{o:g}" for o in cfg["outer_lrs"]])
        ax.set_xlabel("outer Nesterov momentum")
        ax.set_ylabel("outer lr")
        ax.set_title(f"k = {k} ({r['syncs']} syncs): held-out loss\n(best inner lr in brackets)")
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.suptitle(f"DiLoCo, {WORKERS} workers, digits, {cfg['steps']} steps: outer settings "
                 f"(mean ± std over {cfg['seeds']} seeds)")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def outer_sweep(quick: bool, command: str, progress: bool, previous: dict | None = None) -> dict:
    """Runs the sweep; with ``previous`` (an earlier report) runs OUTER_SWEEP_EXTEND's inner
    lrs only and merges them into it, so a sweep can be widened without rerunning it."""
    from _timing import machine_info

    cfg = dict(QUICK_OUTER_SWEEP if quick else OUTER_SWEEP)
    runs = {}
    if previous is not None:
        runs = {(r["k"], r["inner_lr"], r["outer_lr"], r["momentum"]):
                {"loss": np.asarray(r["loss"], float), "accuracy": np.asarray(r["accuracy"], float)}
                for r in previous["runs"]}  # fmt: skip
        cfg["inner_lrs"] = {m: OUTER_SWEEP_EXTEND[m] for m in cfg["momenta"]}
    task = DigitsTask()
    start = time.perf_counter()
    runs |= outer_sweep_runs(task, cfg, progress)
    if previous is not None:
        cfg["inner_lrs"] = {float(m): tuple(sorted(set(lrs) | set(OUTER_SWEEP_EXTEND[float(m)])))
                            for m, lrs in previous["config"]["inner_lrs"].items()}  # fmt: skip
        command = f"{previous['command']}; {command}"
    machine = machine_info()
    return {
        "command": command, "workers": WORKERS, "task": task.name, "info": task.info,
        "num_params": task.num_params,
        "config": {**{k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
                   "inner_lrs": {str(m): list(v) for m, v in cfg["inner_lrs"].items()}},
        "environment": {"jax": jax.__version__, "optax": optax.__version__,
                        "python": platform.python_version(), "cpu": machine["cpu"],
                        "cpus": os.cpu_count(), "machine": platform.machine(),
                        "device": "1 x cpu (workers vmapped on one device)"},
        "per_k": outer_sweep_report(cfg, runs),
        # every run: held-out loss and accuracy per seed after each chunk of steps
        "runs": [{"k": key[0], "inner_lr": key[1], "outer_lr": key[2], "momentum": key[3],
                  "loss": value["loss"].tolist(), "accuracy": value["accuracy"].tolist()}
                 for key, value in runs.items()],
        "seconds": round(time.perf_counter() - start, 1) + (previous or {}).get("seconds", 0),
    }  # fmt: skip


# ------------------------------------------------------------------------------ main


# --------------------------------------------------------------------------- --comm
# Compression and overlap (digits, DiLoCo k=20 at its tuned inner lr, 400 steps, 3 seeds): the
# quantized exchange (int8, fp8 e4m3, int4, int2, each with and without error feedback; 256
# values per scale) and overlapped syncs (tau = 1 and k / 2 = 10, mixing 0 and 0.5), against the f32
# exchange and DP. Bytes are wire bytes per device from each compiled step's collectives: a
# ring all-reduce sends 2 (N - 1) / N of its buffer, an all-to-all and an all-gather (N - 1) / N.
COMM_DTYPES = {"int8": jnp.int8, "int4": jnp.int4, "int2": jnp.int2, "fp8": jnp.float8_e4m3fn}
COMM_K = 20
COMM_POINTS = (
    ("f32", "DiLoCo f32", {}),
    ("int8", "int8", {"communication_dtype": "int8"}),
    ("int8_ef", "int8 + error feedback", {"communication_dtype": "int8", "error_feedback": True}),
    ("fp8", "fp8 e4m3", {"communication_dtype": "fp8"}),
    ("fp8_ef", "fp8 e4m3 + error feedback", {"communication_dtype": "fp8", "error_feedback": True}),
    ("int4", "int4", {"communication_dtype": "int4"}),
    ("int4_ef", "int4 + error feedback", {"communication_dtype": "int4", "error_feedback": True}),
    ("int2", "int2", {"communication_dtype": "int2"}),
    ("int2_ef", "int2 + error feedback", {"communication_dtype": "int2", "error_feedback": True}),
    ("tau1_a0", "overlap 1, mixing 0", {"overlap": 1}),
    ("tau1_a05", "overlap 1, mixing 0.5", {"overlap": 1, "mixing": 0.5}),
    ("tauhalf_a0", "overlap k/2, mixing 0", {"overlap": "half"}),
    ("tauhalf_a05", "overlap k/2, mixing 0.5", {"overlap": "half", "mixing": 0.5}),
)
QUICK_COMM = {"steps": 8, "batch_size": 4, "k": 4, "seeds": 1, "eval_every": 4,
              "weight_decay": 1e-4}  # fmt: skip


def wire_bytes(hlo: str) -> float:
    """Bytes a device sends for the collectives of one compiled program's text (every op
    counted once): ring all-reduce 2 (N - 1) / N of its buffer, the others (N - 1) / N."""
    from _hlo import collective_ops

    factor = {"all-reduce": 2 * (WORKERS - 1) / WORKERS}
    return sum(factor.get(op, (WORKERS - 1) / WORKERS) * size for op, size in collective_ops(hlo))


def comm_sweep(quick: bool, mesh, progress: bool) -> dict:
    from _hlo import collective_ops

    cfg = dict(QUICK_COMM if quick else {**DIGITS, "k": COMM_K})
    k = cfg.pop("k")
    cfg["ks"] = (k,)
    task = DigitsTask()
    methods = {"dp": {"kind": "dp", "k": None, "lr": TUNED["dp"], "label": "DP AdamW"}}
    for name, label, options in COMM_POINTS:
        options = dict(options)
        if options.get("overlap") == "half":
            options["overlap"] = k // 2
        label = label.replace("k/2", str(k // 2))
        methods[name] = {"kind": "nesterov", "k": k, "lr": TUNED.get(f"nesterov_k{k}", 1e-4),
                         "label": label, "options": options}  # fmt: skip
    results, start = {}, time.perf_counter()
    for name, method in methods.items():
        runner = Runner(task, method, cfg, mesh)
        hlo = runner.step.as_text()
        wire = wire_bytes(hlo)
        runs = [runner.train(seed) for seed in range(cfg["seeds"])]
        executions = cfg["steps"] if method["kind"] == "dp" else runs[0]["hlo"]["syncs"]
        results[name] = {
            **method,
            "loss": summarise([r["final"]["loss"] for r in runs]),
            "accuracy": summarise([r["final"]["accuracy"] for r in runs]),
            "wire_bytes_per_execution": wire, "executions": executions,
            "wire_bytes": wire * executions,
            "collectives": sorted({op for op, _ in collective_ops(hlo)}),
        }  # fmt: skip
        if progress:
            r = results[name]
            print(f"  {name:12s} loss {_fmt(r['loss'])}  {r['wire_bytes'] / 1e6:8.3f} MB "
                  f"{r['collectives']}", flush=True)  # fmt: skip
    return {"config": dict(cfg, k=k), "num_params": task.num_params, "methods": results,
            "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip


def comm_markdown(report: dict, command: str) -> str:
    cfg = report["config"]
    base = report["methods"]["f32"]
    lines = [f"Command: `{command}`", "",
             f"digits, {WORKERS} workers, {cfg['steps']} steps, per-worker batch "
             f"{cfg['batch_size']}, DiLoCo k={cfg['k']} (Nesterov 0.7/0.9, inner AdamW "
             f"{base['lr']:g}), {cfg['seeds']} seeds; {report['num_params']:,} parameters; "
             f"{report['seconds']:.0f} s.", "",
             "| Method | Held-out loss | Accuracy (%) | Loss - f32 (paired) | Wire bytes/device "
             "| x f32 | Collectives |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for result in report["methods"].values():
        diff = np.asarray(result["loss"]["per_seed"]) - np.asarray(base["loss"]["per_seed"])
        spread = diff.std(ddof=1) if diff.size > 1 else 0.0
        diff_text = "—" if result["kind"] == "dp" else f"{diff.mean():+.4f} ± {spread:.4f}"
        lines.append(
            f"| {result['label']} | {_fmt(result['loss'])} | "
            f"{_fmt(result['accuracy'], 2, 100)} | {diff_text} | {result['wire_bytes']:,.0f} | "
            f"{result['wire_bytes'] / base['wire_bytes']:.3f} | "
            f"{', '.join(result['collectives'])} |"
        )  # fmt: skip
    lines += ["", "Mean ± sample std over seeds (paired differences: mean ± std over seeds), at "
              "equal steps and examples; DiLoCo at its slow weights. Wire bytes: each compiled "
              "step's collectives (HLO) times the executions of the branch holding them (the "
              "syncs; DP: every step), a ring all-reduce counted 2 (N - 1) / N of its buffer, "
              "an all-to-all or all-gather (N - 1) / N.", ""]  # fmt: skip
    return "\n".join(lines)


def comm_plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    styles = {"dp": ("black", "s"), "f32": ("tab:blue", "o"), "int8": ("tab:green", "v"),
              "int8_ef": ("tab:green", "^"), "fp8": ("tab:red", "v"),
              "fp8_ef": ("tab:red", "^"), "int4": ("tab:olive", "v"), "int4_ef": ("tab:olive", "^"),
              "int2": ("tab:brown", "v"), "int2_ef": ("tab:brown", "^")}  # fmt: skip
    for name, result in report["methods"].items():
        colour, marker = styles.get(name, ("tab:purple", "D" if "a05" in name else "d"))
        ax.errorbar(result["wire_bytes"], result["loss"]["mean"], yerr=result["loss"]["std"],
                    fmt=marker, color=colour, label=result["label"], ms=7, capsize=3)  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("bytes sent per device (wire, from the compiled HLO)")
    ax.set_ylabel("held-out loss")
    ax.set_title(f"digits: DiLoCo k={report['config']['k']}, compressed and overlapped syncs")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=("digits", "lm", "all"), default="all")
    parser.add_argument("--out", default=str(HERE.parent / "runs" / "diloco"))
    parser.add_argument("--quick", action="store_true", help="seconds: tiny runs, for tests")
    parser.add_argument("--tune", action="store_true", help="the digits learning-rate sweep")
    parser.add_argument("--outer-sweep", action="store_true",
                        help="digits: outer lr x momentum at k in {5, 20, 100}, each at its "
                        "best inner lr")  # fmt: skip
    parser.add_argument("--extend", action="store_true",
                        help="--outer-sweep: one more inner lr per momentum (OUTER_SWEEP_EXTEND), "
                        "merged into <out>/diloco_outer[_quick].json")  # fmt: skip
    parser.add_argument("--lrs", type=float, nargs="+", help="--tune: these learning rates, "
                        "added to <out>/diloco_tune.json if it exists")  # fmt: skip
    parser.add_argument("--replot", action="store_true",
                        help="rewrite the .md and .png from the .json in --out")  # fmt: skip
    parser.add_argument("--comm", action="store_true",
                        help="digits: int8/fp8 exchange (with and without error feedback) and "
                        "overlapped syncs against f32 DiLoCo and DP")  # fmt: skip
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/diloco.py " + " ".join(argv if argv is not None else sys.argv[1:])
    command = command.strip()
    if len(jax.devices()) < WORKERS:
        raise SystemExit(f"needs {WORKERS} devices, found {jax.devices()}: set XLA_FLAGS="
                         f"{_FLAG} before JAX starts")  # fmt: skip
    # JAX's default axis type, Explicit. (On an Auto mesh, jit(tx.init) returned the
    # per-worker inner states replicated, and the step then was compiled for that layout.)
    mesh = jax.make_mesh((WORKERS,), ("workers",), devices=jax.devices()[:WORKERS])
    progress = not args.no_progress
    start = time.perf_counter()
    if args.comm:
        stem = "diloco_comm" + "_quick" * args.quick
        if args.replot:
            report = json.loads((out / f"{stem}.json").read_text())
        else:
            report = comm_sweep(args.quick, mesh, progress)
            report["command"] = command
            (out / f"{stem}.json").write_text(json.dumps(_jsonable(report), indent=1))
        text = comm_markdown(report, report["command"])
        (out / f"{stem}.md").write_text(text)
        comm_plot(report, out / f"{stem}.png")
        print(text)
        return report
    if args.outer_sweep:
        stem = "diloco_outer" + "_quick" * args.quick
        if args.replot:
            report = json.loads((out / f"{stem}.json").read_text())
        else:
            previous = None
            if args.extend:
                previous = json.loads((out / f"{stem}.json").read_text())
            report = outer_sweep(args.quick, command, progress, previous)
            (out / f"{stem}.json").write_text(json.dumps(_jsonable(report), indent=1))
        text = outer_sweep_markdown(report)
        (out / f"{stem}.md").write_text(text)
        outer_sweep_plot(report, out / f"{stem}.png")
        print(text)
        print(f"{report['seconds']} s; wrote {out}/{stem}.{{json,md,png}}")
        return report
    if args.tune:
        path = out / "diloco_tune.json"
        previous = json.loads(path.read_text()) if args.lrs and path.is_file() else None
        tuned = tune(mesh, args.lrs or TUNE_LRS, previous, progress)
        earlier = (previous or {}).get(
            "commands", ["python benchmarks/diloco.py --tune"] * bool(previous)
        )
        tuned["commands"] = [*earlier, command]
        tuned["seconds"] = round(time.perf_counter() - start, 1) + (previous or {}).get(
            "seconds", 0
        )
        path.write_text(json.dumps(_jsonable(tuned), indent=1))
        (out / "diloco_tune.md").write_text(tune_markdown(tuned))
        print(tune_markdown(tuned))
        return tuned

    stem = "diloco" + ("" if args.task == "all" else f"_{args.task}") + "_quick" * args.quick
    if args.replot:
        report = json.loads((out / f"{stem}.json").read_text())
        ran = {k: v for k, v in report["tasks"].items() if "skipped" not in v}
        (out / f"{stem}.md").write_text(markdown({**report, "tasks": ran}))
        plot({**report, "tasks": ran}, out / f"{stem}.png")
        return report

    tasks = ("digits", "lm") if args.task == "all" else (args.task,)
    report = {"command": command, "workers": WORKERS, "tasks": {}, "environment": {
        "jax": jax.__version__, "optax": optax.__version__, "python": platform.python_version(),
        "devices": f"{len(jax.devices())} x {jax.devices()[0].platform}",
        "machine": platform.machine(), "cpus": os.cpu_count(),
    }}  # fmt: skip
    all_arrays = {}
    for name in tasks:
        if name == "digits":
            task = DigitsTask()
            cfg, lrs = (QUICK_DIGITS if args.quick else DIGITS), dict(TUNED)
        else:
            try:
                task = LanguageModelTask(quick=args.quick)
            except ImportError as error:
                if args.task == "lm":
                    raise
                print(f"skipping --task lm: {error}", flush=True)
                report["tasks"]["lm"] = {"skipped": str(error)}
                continue
            cfg = QUICK_LM if args.quick else LM
            lr = cfg["lr"] or task.lm.TUNED_LR
            lrs = {"dp": lr, "nesterov": lr, "average": lr}
        task_start = time.perf_counter()
        report["tasks"][name], arrays = run_task(task, cfg, lrs, mesh, progress)
        report["tasks"][name]["seconds"] = round(time.perf_counter() - task_start, 1)
        all_arrays.update({(name, *key): value for key, value in arrays.items()})
    report["tasks"] = {k: v for k, v in report["tasks"].items() if "skipped" not in v} | {
        k: v for k, v in report["tasks"].items() if "skipped" in v
    }
    report["seconds"] = round(time.perf_counter() - start, 1)
    ran = {k: v for k, v in report["tasks"].items() if "skipped" not in v}
    (out / f"{stem}.json").write_text(json.dumps(_jsonable(report), indent=1))
    text = markdown({**report, "tasks": ran})
    (out / f"{stem}.md").write_text(text)
    plot({**report, "tasks": ran}, out / f"{stem}.png")
    if args.quick:  # the final arrays, so a test can recompute the reported loss
        flat = {}
        for (task_name, method, seed), trees in all_arrays.items():
            for which, tree in trees.items():
                for i, leaf in enumerate(jax.tree.leaves(tree)):
                    flat[f"{task_name}/{method}/{seed}/{which}/{i}"] = np.asarray(leaf)
        np.savez(out / f"{stem}_final.npz", **flat)
    print(text)
    print(f"{report['seconds']} s; wrote {out}/{stem}.{{json,md,png}}")
    return report


if __name__ == "__main__":
    main()

"""Helpers shared by the test modules (the reference itself lives in reference.py).

Fixtures (``strict_promotion``, ``mesh``) are in conftest.py; what reads compiled HLO is in
benchmarks/_hlo.py, shared with the benchmarks. No test module imports another: what two
of them share lives here.
"""

import ast
import builtins
import functools
import os
import random
import re
import socket

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import lookahead_optax as lo
from tests import reference


def with_promotion(
    tx: optax.GradientTransformation, mode: str
) -> optax.GradientTransformationExtraArgs:
    """Traces ``tx``'s init and update under ``jax.numpy_dtype_promotion(mode)``.

    The core tests run under strict promotion, but some optax transformations are
    not strict-clean (Adam's bias correction computes ``float ** int32``, MultiSteps
    divides by an int32 count). Only their own code runs under "standard"; a
    lookahead inside them is wrapped back to "strict", so our code stays checked.
    """
    tx = optax.with_extra_args_support(tx)

    def init_fn(params):
        with jax.numpy_dtype_promotion(mode):
            return tx.init(params)

    def update_fn(updates, state, params=None, **extra_args):
        with jax.numpy_dtype_promotion(mode):
            return tx.update(updates, state, params, **extra_args)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def standard_promotion(tx: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    return with_promotion(tx, "standard")


def strict_promotion(tx: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    return with_promotion(tx, "strict")


def adam(learning_rate, **kwargs) -> optax.GradientTransformationExtraArgs:
    """optax.adam, usable inside strict-promotion tests."""
    return standard_promotion(optax.adam(learning_rate, **kwargs))


def multi_steps(inner, every_k_schedule) -> optax.GradientTransformationExtraArgs:
    """optax.MultiSteps under standard promotion, ``inner`` still under strict."""
    return standard_promotion(optax.MultiSteps(strict_promotion(inner), every_k_schedule))


class JaxInner:
    """A jax inner optimizer as an inner optimizer of tests/reference.py (lists of leaves).

    Only for tests about the Lookahead wrapping (its sync, its inner-state policies,
    what reaches the inner optimizer), never about the inner optimizer itself: the
    reference then runs the same inner step as the library, in ``dtype``, and the
    reference's Algorithm 1 around it. ``update(grads, state, params)`` defaults to
    ``tx.update``; give it to pass extra arguments.
    """

    def __init__(self, tx, treedef, update=None, dtype=jnp.float32):
        self.tx, self.treedef, self.dtype = tx, treedef, dtype
        self._update = jax.jit(update or tx.update)

    def tree(self, leaves):
        return jax.tree.unflatten(self.treedef, [jnp.asarray(x, self.dtype) for x in leaves])

    def init(self, params):
        return self.tx.init(self.tree(params))

    def step(self, grads, state, params):
        updates, state = self._update(self.tree(grads), state, self.tree(params))
        return [np.asarray(u, np.float64) for u in jax.tree.leaves(updates)], state


# ---- the logistic quadratic most trajectory tests run, against the reference ----------------

PROBLEM = reference.LogisticQuadratic()
NUM_STEPS = 13  # not a multiple of 2, 3 or 5: the run ends mid-cycle
loss_grad = jax.jit(jax.grad(PROBLEM.loss))
# float32 library against the float64 reference, over NUM_STEPS steps.
F32_TOL = dict(rtol=2e-5, atol=2e-5)
# (library inner optimizer, reference inner optimizer) pairs with the same hyperparameters.
REFERENCE_INNERS = {
    "sgd": (lambda: optax.sgd(0.1), lambda: reference.SGD(0.1)),
    "momentum": (lambda: optax.sgd(0.1, momentum=0.9), lambda: reference.Momentum(0.1, 0.9)),
    "adam": (lambda: adam(0.05), lambda: reference.Adam(0.05)),
}


def initial_params(dtype=jnp.float32):
    return jax.tree.map(lambda x: jnp.asarray(x, dtype), PROBLEM.params0)


def assert_history_close(history, expected, **tol):
    """history: pytree with a leading step axis; expected: per step, a list of leaves."""
    leaves = jax.tree.leaves(history)
    assert len(expected) == leaves[0].shape[0]
    for step, expected_leaves in enumerate(expected):
        for leaf, want in zip(leaves, expected_leaves, strict=True):
            np.testing.assert_allclose(
                np.asarray(leaf[step], np.float64), want, err_msg=f"step {step + 1}", **tol
            )


def check_against_reference(inner_name, k, alpha, history):
    """history: (params, slow_params, state.slow) after each of NUM_STEPS steps (stacked) of
    lookahead(REFERENCE_INNERS[inner_name], k, alpha) on PROBLEM, against the reference."""
    params, slow_via_accessor, slow_in_state = history
    fast, slow = reference.lookahead_trajectory(
        PROBLEM.leaves0(), PROBLEM.grad, REFERENCE_INNERS[inner_name][1](), k, alpha, NUM_STEPS
    )
    assert_history_close(params, fast, **F32_TOL)
    assert_history_close(slow_via_accessor, slow, **F32_TOL)
    assert_history_close(slow_in_state, slow, **F32_TOL)
    # The sync is inside call k: right after it, params and slow weights coincide.
    for step in range(k - 1, NUM_STEPS, k):
        for p, s in zip(jax.tree.leaves(params), jax.tree.leaves(slow_in_state)):
            np.testing.assert_allclose(p[step], s[step], rtol=1e-6, atol=1e-6)


# ---- one training step, and a loop of them --------------------------------------------------


def fused_step(params, opt_state, grads, tx, **extra_args):
    return lo.update_and_apply(tx, grads, opt_state, params, **extra_args)


def two_call_step(params, opt_state, grads, tx, **extra_args):
    updates, opt_state = tx.update(grads, opt_state, params, **extra_args)
    return optax.apply_updates(params, updates), opt_state


def run_steps(tx, params, grad_fn=loss_grad, num_steps=NUM_STEPS, fused=False):
    """(params, opt_state) after every step, each step one jitted call: ``tx.update`` and
    ``optax.apply_updates``, or ``lo.update_and_apply`` with ``fused``."""
    step_fn = fused_step if fused else two_call_step
    step = jax.jit(lambda p, s: step_fn(p, s, grad_fn(p), tx))
    opt_state = tx.init(params)
    history = []
    for _ in range(num_steps):
        params, opt_state = step(params, opt_state)
        history.append((params, opt_state))
    return history


def _multi_transform():
    # Two lookaheads, one per parameter group: update_and_apply takes the two-call path.
    transforms = {
        "slow": lo.lookahead(optax.sgd(0.1, momentum=0.9), k=2),
        "fast": lo.lookahead(adam(0.05), k=3),
    }
    return optax.multi_transform(
        transforms, lambda p: {k: "slow" if k == "w" else "fast" for k in p}
    )


# Compositions of lookahead for update_and_apply against the two calls (test_fused, test_device).
CONFIGURATIONS = {
    "sgd": lambda: lo.lookahead(optax.sgd(0.1), k=3, alpha=0.5),
    "momentum": lambda: lo.lookahead(optax.sgd(0.1, momentum=0.9), k=3, alpha=0.8),
    "adam": lambda: lo.lookahead(adam(0.05), k=2, alpha=0.5),
    "reset": lambda: lo.lookahead(adam(0.05), k=3, inner_state="reset"),
    "pullback": lambda: lo.lookahead(adam(0.05), k=3, inner_state="pullback"),
    "alpha_schedule": lambda: lo.lookahead(
        optax.sgd(0.1), k=2, alpha=lambda j: 0.9 ** j.astype(jnp.float32)
    ),
    "adaptive_alpha": lambda: lo.lookahead(optax.sgd(0.1), k=3, alpha=lo.adaptive_alpha()),
    "slow_dtype": lambda: lo.lookahead(adam(0.05), k=3, slow_dtype=jnp.float32),
    "clip_then_lookahead": lambda: optax.chain(
        optax.clip_by_global_norm(0.5), lo.lookahead(adam(0.05), 3)
    ),
    "inject_hyperparams": lambda: standard_promotion(
        optax.inject_hyperparams(lambda k, alpha: lo.lookahead(optax.adam(0.05), k, alpha))(
            k=3, alpha=0.5
        )
    ),
    "apply_if_finite": lambda: standard_promotion(
        optax.apply_if_finite(lo.lookahead(optax.adam(0.05), k=3), max_consecutive_errors=2)
    ),
    "masked": lambda: optax.masked(
        lo.lookahead(optax.sgd(0.1, momentum=0.9), k=2), lambda p: {k: k != "b" for k in p}
    ),
    # Lookahead under MultiSteps' cond: the two-call path.
    "multi_steps": lambda: standard_promotion(
        optax.MultiSteps(lo.lookahead(optax.adam(0.05), k=2), every_k_schedule=2)
    ),
    "multi_transform": _multi_transform,
    "no_lookahead": lambda: adam(0.05),
}


@functools.cache
def configuration_history(name):
    """run_steps(CONFIGURATIONS[name](), initial_params()): tx.update and apply_updates, under
    strict promotion; computed once per session for the tests that compare other paths to it."""
    with jax.numpy_dtype_promotion("strict"):
        return tuple(run_steps(CONFIGURATIONS[name](), initial_params()))


# ---- memory of a compiled step (test_memory, test_fused) -----------------------------------

MEMORY_K = 4
# Distinct leaf sizes, so a params-sized buffer of any one leaf is visible.
LEAF_SIZES = {"embed": 98_304, "dense": 65_536, "bias": 4_096, "out": 131_072}
MEMORY_INNERS = {
    "adam": lambda: optax.adam(1e-3),
    "sgd_momentum": lambda: optax.sgd(1e-3, momentum=0.9),
    # A global-norm reduction and weight decay (reads params) before the update.
    "clip_adamw": lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3)),
    # Factored second moments: state leaves not shaped like the params.
    "adafactor": lambda: optax.adafactor(1e-3),
}


def make_params(dtype=jnp.float32):
    return {
        name: jnp.linspace(-1.0, 1.0, size, dtype=jnp.float32).astype(dtype)
        for name, size in LEAF_SIZES.items()
    }


def tree_bytes(tree) -> int:
    return sum(np.dtype(x.dtype).itemsize * x.size for x in jax.tree.leaves(tree))


def compile_step(tx, params):
    """The compiled tx.update + apply_updates step, params and state donated."""
    opt_state = tx.init(params)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.01), params)
    step = jax.jit(functools.partial(two_call_step, tx=tx), donate_argnums=(0, 1))
    return step.lower(params, opt_state, grads).compile()


@functools.cache
def compiled_step(inner_name: str, with_lookahead: bool, dtype=jnp.float32, slow_dtype=None):
    """The compiled step of MEMORY_INNERS[inner_name] (or of lookahead around it), cached."""
    tx = MEMORY_INNERS[inner_name]()
    if with_lookahead:
        tx = lo.lookahead(tx, k=MEMORY_K, slow_dtype=slow_dtype)
    return compile_step(tx, make_params(dtype))


def temp_bytes(*key) -> int:
    return compiled_step(*key).memory_analysis().temp_size_in_bytes


# ---- several devices (test_sharding, test_fused, test_outer) -------------------------------

# Inner optimizers of the sharded tests. Global-norm clipping all-reduces on its own:
# lookahead must add nothing on top.
SHARDED_INNERS = {
    "adam": lambda: optax.adam(0.05),
    "sgd_momentum": lambda: optax.sgd(0.05, momentum=0.9),
    "clip_adam": lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adam(0.05)),
}


def shard(tree, mesh):
    """Every leaf split along its first axis over the mesh's "fsdp" axis."""
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec("fsdp")))


def fsdp_state_shardings(tx: optax.GradientTransformation, params: dict, mesh):
    """The usual FSDP recipe: every params-shaped leaf of the state sharded like the params.

    Needed for the inner state: under jit, optax's zeros_like moments come out replicated.
    """
    replicated = NamedSharding(mesh, PartitionSpec())
    return optax.tree_map_params(
        tx,
        lambda _: NamedSharding(mesh, PartitionSpec("fsdp")),
        jax.eval_shape(tx.init, params),
        transform_non_params=lambda _: replicated,
    )


# ---- policies and adaptive alpha on the reference (test_policies, test_subsets, ...) --------

# Which leaves of each reference inner state are params-shaped (what the library's
# inner-state policies act on: those optax.tree_map_params maps), per (inner, policy).
REFERENCE_PARAMS_LIKE = {
    ("momentum", "reset"): reference.every_leaf,  # the trace
    ("momentum", "pullback"): reference.every_leaf,
    ("adam", "reset"): reference.every_leaf,  # one record (count, mu, nu): reset as a whole
    ("adam", "pullback"): reference.under((1,), (2,)),  # mu and nu, not the count
}


def library_trajectory(tx, params0, loss, num_steps):
    """(params, slow_params, opt_state) after every step, each step one jitted call."""
    slow_params = jax.jit(lo.slow_params)
    history = run_steps(tx, params0, jax.grad(loss), num_steps)
    return [(params, slow_params(opt_state, params), opt_state) for params, opt_state in history]


def _dot(xs, ys):
    return sum(float(np.sum(x * y)) for x, y in zip(xs, ys))


def sync_direction(view):
    """d = theta_k - phi at a sync of the reference (a reference.SyncView)."""
    return [f - s for f, s in zip(view.fast, view.slow)]


def model_alpha(view, v_hat, alpha_min):
    """The line search on the diagonal model v_hat: g_k = g + v_hat * u extrapolated."""
    d = sync_direction(view)
    g_k = [g + v * du for g, v, du in zip(view.grads, v_hat, view.updates)]
    alpha = 1.0 - _dot(g_k, d) / _dot(d, [v * di for v, di in zip(v_hat, d)])
    return float(np.clip(alpha, alpha_min, 1.0))


def adam_curvature_alpha(alpha_min, b2):
    """The reference's alpha rule for adaptive_alpha(curvature="adam"): v_hat from the inner
    Adam's (t, mu, nu) state."""

    def alpha_rule(view):
        t, _, nu = view.inner_state[:3]
        return model_alpha(view, [v / (1 - b2**t) for v in nu], alpha_min)

    return alpha_rule


# ---- the ```python blocks of README.md and the guide pages (test_readme, test_docs) ---------

CONTINUES = "Continues the previous block."
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def fenced_blocks(text, language):
    """(line number, code) of every ```language block, in order."""
    pattern = re.compile(rf"^```{language}\n(.*?)^```", re.MULTILINE | re.DOTALL)
    return [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in pattern.finditer(text)]


def python_chains(text):
    """The ```python blocks grouped into chains: a block starts a new chain unless the
    paragraph right before it says CONTINUES. Each chain is a list of (line number, code,
    continues)."""
    chains, previous_end, previous_language = [], 0, None
    for match in FENCE.finditer(text):
        language, code = match.group(1), match.group(2)
        paragraph = text[previous_end : match.start()].strip().split("\n\n")[-1]
        continues = CONTINUES in " ".join(paragraph.split())  # in the paragraph right before
        if continues:
            assert language == "python" and previous_language == "python", (
                f"line {text.count(chr(10), 0, match.start()) + 1}: '{CONTINUES}' "
                "must sit between two ```python blocks"
            )
        if language == "python":
            line = text.count("\n", 0, match.start()) + 1
            if continues:
                chains[-1].append((line, code, True))
            else:
                chains.append([(line, code, False)])
        previous_end, previous_language = match.end(), language
    return chains


def free_names(code):
    """Names a block reads but neither binds, imports nor gets from builtins."""
    tree = ast.parse(code)
    bound, loaded = set(dir(builtins)), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (loaded if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
    return loaded - bound


# ---- SGD on 0.5 ||w||^2, the smallest problem (tests of 0.2.0's defects) -------------------

SGD_LR = 0.1


def reference_sgd(w0, k, alpha, num_steps, lr=SGD_LR):
    """(fast, slow) after every step for SGD(lr) on 0.5 ||w||^2, from tests/reference.py."""
    fast, slow = reference.lookahead_trajectory(
        [np.asarray(w0)], lambda leaves: leaves, reference.SGD(lr), k, alpha, num_steps
    )
    return [f[0] for f in fast], [s[0] for s in slow]


def standard_promotion_test(test):
    """For a test in a strict-promotion module whose optax code is not strict-clean (MultiSteps,
    Adam's bias correction, SGD on bool leaves): the test runs under standard promotion."""

    @functools.wraps(test)
    def wrapped(*args, **kwargs):
        with jax.numpy_dtype_promotion("standard"):
            return test(*args, **kwargs)

    return wrapped


def quick_few(names, quick):
    """``names`` as parameters for ``pytest.mark.parametrize``; those not in ``quick`` are
    marked slow: the quick set keeps a few representatives, the whole suite runs them all."""
    return [name if name in quick else pytest.param(name, marks=pytest.mark.slow) for name in names]


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now, for a jax.distributed coordinator.

    Under pytest-xdist each worker draws from its own block of ports below Linux's ephemeral
    range (32768 and up, where the OS puts port-0 binds and outgoing connections), so two
    workers starting multi-process tests at once never probe the same port. Another program
    can still take it before the coordinator binds it: the callers retry once on "in use".
    """
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(worker[2:]) if worker[2:].isdigit() else 0
    first = 20000 + 500 * (index % 24)  # 20000-31999: 24 blocks of 500
    for port in random.sample(range(first, first + 500), 500):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {first}-{first + 499} on 127.0.0.1")


def version(module) -> tuple[int, ...]:
    """``module.__version__`` as (major, minor, patch) ints, to compare with a floor."""
    return tuple(int(part) for part in re.findall(r"\d+", module.__version__)[:3])

"""Property tests (hypothesis) over pytree shapes, dtypes, k and alpha."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import lookahead_optax as lo
from tests import reference as ref

DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]
# name: (library inner, reference inner, the library's inner state as the reference's)
INNERS = {
    "sgd": (lambda: optax.sgd(0.1), lambda: ref.SGD(0.1), lambda inner_state: ()),
    "momentum": (
        lambda: optax.sgd(0.1, momentum=0.5),
        lambda: ref.Momentum(0.1, 0.5),
        lambda inner_state: as_f64(inner_state[0].trace),
    ),
}
LR = 0.1
# derandomize: the same examples on every run, so CI is reproducible. Each example compiles
# its own program: the quick set draws a few, the slow set (marked) many more.
FEW = dict(deadline=None, derandomize=True, max_examples=5)
MANY = dict(deadline=None, derandomize=True, max_examples=30)


pytestmark = pytest.mark.usefixtures("strict_promotion")


@st.composite
def problems(draw):
    """A random params pytree (several layouts) and the per-leaf curvature of its loss."""
    num_leaves = draw(st.integers(1, 3))
    shapes = [draw(hnp.array_shapes(min_dims=0, max_dims=2, max_side=3)) for _ in range(num_leaves)]
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    leaves = [rng.uniform(-2.0, 2.0, size=shape) for shape in shapes]
    layout = draw(st.sampled_from(["dict", "list", "nested"]))
    if layout == "dict":
        params = {f"p{i}": leaf for i, leaf in enumerate(leaves)}
    elif layout == "list":
        params = list(leaves)
    else:
        params = {"layer": {"kernel": leaves[0]}, "rest": tuple(leaves[1:])}
    return params, [1.0 + 0.5 * i for i in range(num_leaves)]


def quadratic_grad(params, curvatures):
    """Gradient of sum_i 0.5 c_i ||p_i - 1||^2, in the params' dtype."""
    leaves, treedef = jax.tree.flatten(params)
    grads = [jnp.asarray(c, p.dtype) * (p - jnp.ones_like(p)) for p, c in zip(leaves, curvatures)]
    return jax.tree.unflatten(treedef, grads)


def eps(dtype):
    return float(jnp.finfo(dtype).eps)


def as_f64(tree):
    return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


def run_steps(inner, params, curvatures, k, alpha, num_steps):
    """Everything a step sees and returns, stacked over the steps: one compile per call."""

    def body(carry, _):
        params, state = carry
        tx = lo.lookahead(inner, k=k, alpha=alpha)
        grads = quadratic_grad(params, curvatures)
        inner_updates, _ = inner.update(grads, state.inner_state, params)
        updates, new_state = tx.update(grads, state, params)
        new_params = optax.apply_updates(params, updates)
        seen = dict(
            params=params,
            inner_updates=inner_updates,
            slow_before=state.slow,
            updates=updates,
            new_params=new_params,
            slow=new_state.slow,
            slow_params=lo.slow_params(new_state, new_params),
            count=new_state.count,
            syncs=new_state.syncs,
            inner_state=new_state.inner_state,
        )
        return (new_params, new_state), seen

    state = lo.lookahead(inner, k=k, alpha=alpha).init(params)
    return jax.lax.scan(body, (params, state), length=num_steps)[1], state.inner_state


def assert_within(got, want, bound, what):
    bad = np.abs(got - want) > bound
    allowed = np.broadcast_to(bound, bad.shape)[bad]
    assert not bad.any(), f"{what}: got {got[bad]}, reference {want[bad]}, allowed {allowed}"


def one_step_bound(dtype, params, grads, inner_updates, trace, slow_before, slow_after, sync):
    """How far one library step in ``dtype`` may be from the float64 reference step.

    Every rounded operation is off by at most half a unit in the last place of its
    result, eps/2 |result|. The bound allows eps |result| (twice that) for every
    intermediate result of the step, plus the smallest normal number for underflow:
    the gradient c (p - 1), the momentum trace, the inner update and params + update;
    at a sync also theta - phi and alpha (theta - phi) (alpha itself rounded to
    ``dtype``), the new phi, the update phi - params and the params after it.
    """
    e, floor = eps(dtype), float(jnp.finfo(dtype).smallest_normal)
    bounds = []
    for i, (p, g, u) in enumerate(zip(params, grads, inner_updates)):
        fast = p + u
        terms = 2 * np.abs(g) + np.abs(u) + np.abs(fast)
        if trace:
            terms = terms + np.abs(trace[i])
        if sync:
            s_old, s_new = slow_before[i], slow_after[i]
            terms = terms + 2 * np.abs(fast - s_old) + 2 * np.abs(s_new) + np.abs(s_new - p)
        bounds.append(e * terms + floor)
    return bounds


LOOKAHEAD_EXAMPLES = dict(
    problem=problems(),
    dtype=st.sampled_from(DTYPES),
    k=st.integers(1, 5),
    alpha=st.floats(0.05, 1.0),
    inner_name=st.sampled_from(list(INNERS)),
    num_steps=st.integers(1, 11),
    static=st.booleans(),
)


@settings(**FEW)
@given(**LOOKAHEAD_EXAMPLES)
def test_lookahead_properties(**example):
    check_lookahead_properties(**example)


@pytest.mark.slow
@settings(**MANY)
@given(**LOOKAHEAD_EXAMPLES)
def test_lookahead_properties_many_examples(**example):
    check_lookahead_properties(**example)


def check_lookahead_properties(problem, dtype, k, alpha, inner_name, num_steps, static):
    raw_params, curvatures = problem
    params = jax.tree.map(lambda x: jnp.asarray(x, dtype), raw_params)
    make_inner, make_reference, reference_inner_state = INNERS[inner_name]
    run = jax.jit(run_steps, static_argnums=(0, 2, 5) + ((3, 4) if static else ()))
    hyper = (k, alpha) if static else (jnp.asarray(k, jnp.int32), jnp.asarray(alpha, jnp.float32))
    seen, inner_state0 = run(make_inner(), params, tuple(curvatures), *hyper, num_steps)

    # Structure and dtype are those of params, for updates and slow weights.
    for name in ("updates", "new_params", "slow", "slow_params"):
        assert jax.tree.structure(seen[name]) == jax.tree.structure(params)
        assert {x.dtype for x in jax.tree.leaves(seen[name])} == {jnp.dtype(dtype)}
    steps = np.arange(1, num_steps + 1)
    np.testing.assert_array_equal(seen["count"], steps % k)
    np.testing.assert_array_equal(seen["syncs"], steps // k)
    for got, want in zip(as_f64(seen["slow_params"]), as_f64(seen["slow"])):
        np.testing.assert_array_equal(got, want)

    def at(name, t):
        """The library's ``name`` after step t (t = 0: before the first step)."""
        return [x[t - 1] for x in as_f64(seen[name])]

    def reference_grad(leaves):
        return [c * (p - 1.0) for p, c in zip(leaves, curvatures)]

    # Step by step: the reference's step from the library's state after step t - 1 must
    # give the library's state after step t, within the rounding of one step in dtype.
    # (A whole-run tolerance in 16 bits has to grow with the run and hides a wrong sync.)
    reference = ref.Lookahead(make_reference(), k, alpha)
    for t in steps:
        if t == 1:
            params_before, slow_before = as_f64(params), as_f64(params)
            inner_before = reference_inner_state(inner_state0)
        else:
            params_before, slow_before = at("new_params", t - 1), at("slow", t - 1)
            inner_before = reference_inner_state(
                jax.tree.map(lambda x, t=t: x[t - 2], seen["inner_state"])
            )
        before = ref.LookaheadState(inner_before, slow_before, (t - 1) % k, (t - 1) // k)
        grads = reference_grad(params_before)
        updates, after = reference.step(grads, before, params_before)
        assert (after.count, after.syncs) == (t % k, t // k)
        inner_updates, _ = reference.inner.step(grads, inner_before, params_before)
        bound = one_step_bound(
            dtype, params_before, grads, inner_updates, after.inner, slow_before, after.slow,
            sync=t % k == 0,
        )  # fmt: skip
        expected_params = [p + u for p, u in zip(params_before, updates)]
        for got, want, b in zip(at("new_params", t), expected_params, bound, strict=True):
            assert_within(got, want, b, f"params after step {t}")
        for got, want, b in zip(at("slow", t), after.slow, bound, strict=True):
            assert_within(got, want, b, f"slow weights after step {t}")
        got_inner = reference_inner_state(
            jax.tree.map(lambda x, t=t: x[t - 1], seen["inner_state"])
        )
        for got, want, b in zip(got_inner, after.inner, bound):
            assert_within(got, want, b, f"inner state after step {t}")
        if t % k:  # not a sync: exactly the inner optimizer's update, slow weights untouched
            for got, want in zip(at("updates", t), at("inner_updates", t)):
                np.testing.assert_allclose(got, want, rtol=4 * eps(dtype), atol=1e-30)
            for got, want in zip(at("slow", t), at("slow_before", t)):
                np.testing.assert_array_equal(got, want)

    # In float32, also the whole run against the float64 reference run: rounding errors
    # of at most a few eps per step, not amplified (the steps are contractions here).
    if dtype == jnp.float32:
        history = ref.run(reference, as_f64(params), reference_grad, num_steps)
        tol = 4 * num_steps * eps(dtype)
        for got, want in zip(as_f64(seen["new_params"]), zip(*[s.params for s in history])):
            np.testing.assert_allclose(got, np.stack(want), rtol=tol, atol=tol)
        for got, want in zip(as_f64(seen["slow"]), zip(*[s.state.slow for s in history])):
            np.testing.assert_allclose(got, np.stack(want), rtol=tol, atol=tol)


EMA_EXAMPLES = dict(problem=problems(), k=st.integers(1, 4), alpha=st.floats(0.05, 1.0))


@settings(**{**FEW, "max_examples": 3})
@given(**EMA_EXAMPLES)
def test_slow_weights_are_an_ema_of_cycle_ends(**example):
    check_ema_of_cycle_ends(**example)


@pytest.mark.slow
@settings(**{**MANY, "max_examples": 12})
@given(**EMA_EXAMPLES)
def test_slow_weights_are_an_ema_of_cycle_ends_many_examples(**example):
    check_ema_of_cycle_ends(**example)


def check_ema_of_cycle_ends(problem, k, alpha):
    """phi_t = alpha sum_s (1-alpha)^(t-s) theta_{s,k} + (1-alpha)^t phi_0 (the paper's form)."""
    raw_params, curvatures = problem
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), raw_params)
    syncs = 3
    seen, _ = jax.jit(run_steps, static_argnums=(0, 2, 3, 4, 5))(
        optax.sgd(0.1, momentum=0.5), params, tuple(curvatures), k, alpha, syncs * k
    )
    # theta_{s,k}: the params plus the inner update on the sync calls k, 2k, 3k.
    cycle_ends = [
        [
            p[s * k - 1] + u[s * k - 1]
            for p, u in zip(as_f64(seen["params"]), as_f64(seen["inner_updates"]))
        ]
        for s in range(1, syncs + 1)
    ]
    phi0 = as_f64(params)
    for i, got in enumerate(as_f64(seen["slow"])):
        expected = (1 - alpha) ** syncs * phi0[i]
        for s, end in enumerate(cycle_ends, start=1):
            expected = expected + alpha * (1 - alpha) ** (syncs - s) * end[i]
        np.testing.assert_allclose(got[-1], expected, rtol=1e-5, atol=1e-5)

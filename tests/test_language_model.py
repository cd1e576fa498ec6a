"""The language-model benchmark's quick run, checked for what it says about the library.

``benchmarks/language_model.py --quick`` trains a tiny byte-level transformer on CPython's
help text with AdamW, Lookahead(AdamW, k=5, alpha=0.5) and the same Lookahead written as an
outer Nesterov SGD with momentum 0 and lr 0.5, checkpoints at steps 0, 4, 8, 12, 16, 20. The
tests read the JSON it writes and check the library's semantics through it: the slow weights
stay at the initial params until the first sync, a sync lands the params on the slow weights,
``outer=optax.sgd(a)`` is ``alpha=a``, and the reported loss is that of ``lo.slow_params``.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import language_model  # noqa: E402

import lookahead_optax as lo  # noqa: E402

pytestmark = pytest.mark.slow  # compiles three optimizers' training steps: 20-70 s on 2 cores

LOOKAHEAD = "lookahead_k5_a0.5"
OUTER_SGD = "snoo_k5_lr0.5_m0"  # outer=optax.sgd(0.5, momentum=0, nesterov=True)
K = 5


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("language_model")
    finals = {}
    language_model.main(["--quick", "--no-progress", "--out", str(out)], finals=finals)
    report = json.loads((out / "language_model_quick.json").read_text())
    return {"out": out, "report": report, "finals": finals}


def _curves(report, name, curve):
    return np.asarray(report["results"][name]["curves"][curve], dtype=np.float64)


def test_writes_json_markdown_and_plot_and_records_the_corpus(quick):
    for suffix in ("json", "md", "png"):
        assert (quick["out"] / f"language_model_quick.{suffix}").stat().st_size > 0
    corpus = quick["report"]["corpus"]
    import pydoc_data.topics

    data = Path(pydoc_data.topics.__file__).read_bytes()
    assert corpus["file"] == "pydoc_data/topics.py"
    assert corpus["file_bytes"] == len(data)
    assert corpus["file_sha256"] == hashlib.sha256(data).hexdigest()
    assert set(quick["report"]["results"]) == {"adamw", LOOKAHEAD, OUTER_SGD}


def test_slow_weights_stay_at_the_initial_params_until_the_first_sync(quick):
    report = quick["report"]
    checkpoints = report["checkpoints"]
    assert checkpoints[:2] == [0, 4] and 4 < K
    for name in (LOOKAHEAD, OUTER_SGD):
        loss, fast = _curves(report, name, "loss"), _curves(report, name, "fast_loss")
        np.testing.assert_array_equal(loss[:, 1], loss[:, 0])  # step 4: no sync yet
        assert (fast[:, 1] < loss[:, 0] - 0.1).all()  # while the fast weights trained
        # ...exactly as AdamW's did: the first k - 1 steps are the inner optimizer's.
        np.testing.assert_allclose(fast[:, 1], _curves(report, "adamw", "loss")[:, 1], rtol=1e-5)


def test_a_sync_lands_the_params_on_the_slow_weights(quick):
    report = quick["report"]
    checkpoints = report["checkpoints"]
    assert checkpoints[-1] % K == 0  # the last step syncs
    for name in (LOOKAHEAD, OUTER_SGD):
        loss, fast = _curves(report, name, "loss"), _curves(report, name, "fast_loss")
        np.testing.assert_allclose(loss[:, -1], fast[:, -1], rtol=1e-6)
        between = [i for i, step in enumerate(checkpoints) if step % K and step > K]
        assert between and (np.abs(loss[:, between] - fast[:, between]) > 1e-4).all()
        # The slow step moved the weights: the run is not AdamW's.
        adamw = _curves(report, "adamw", "loss")
        assert (np.abs(loss[:, -1] - adamw[:, -1]) > 1e-3).all()


def test_outer_sgd_without_momentum_is_lookahead_alpha(quick):
    report = quick["report"]
    for curve in ("loss", "fast_loss", "train_loss"):
        np.testing.assert_allclose(
            _curves(report, OUTER_SGD, curve)[:, 1:],
            _curves(report, LOOKAHEAD, curve)[:, 1:],
            rtol=1e-5,
        )


def test_reported_loss_is_that_of_slow_params_of_the_final_state(quick):
    report = quick["report"]
    args = language_model.parse_args(["--quick"])
    _, apply, _ = language_model.make_model_fns(args.layers, args.d_model, args.heads, args.context)
    data, _ = language_model.load_corpus()
    test = language_model.split_corpus(data)["test"][: args.eval_bytes]
    x, y = language_model.eval_windows(test, args.context)
    for name in (LOOKAHEAD, OUTER_SGD):
        params, opt_state = quick["finals"][name]
        reported = _curves(report, name, "loss")[:, -1]
        for seed in range(len(report["seeds"])):
            seed_params, seed_state = jax.tree.map(lambda a, s=seed: a[s], (params, opt_state))
            slow = lo.slow_params(seed_state, seed_params)
            loss = float(language_model.cross_entropy(apply, slow, x, y))
            np.testing.assert_allclose(loss, reported[seed], rtol=1e-5)

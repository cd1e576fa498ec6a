"""Session-wide test setup (runs before jax initialises) and the fixtures shared by tests/."""

import os
import pathlib
import subprocess
import sys

# Eight emulated CPU devices for the sharding, pmap and shard_map tests; must be
# set before jax creates its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402  (after XLA_FLAGS)
import numpy as np  # noqa: E402
import pytest  # noqa: E402

DEVICES = 8
# tests/data: files the tests read, and the scripts that wrote them (run by hand with the
# version they write, not collected: --doctest-modules would import them).
collect_ignore = ["tests/data"]


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    """Every core, with pytest-xdist (the test extra installs it): ``python -m pytest`` runs the
    tests in one process per core (``-n auto``, at most 8), as if given
    ``-n auto --maxprocesses 8 --dist loadgroup``. An explicit ``-n`` wins (``-n 0``: one process,
    as ``-p no:xdist`` or ``--pdb``); without xdist (``.ci/floors`` installs only pytest and
    hypothesis) the tests run in one process as before.

    ``loadgroup`` hands out the tests one by one, except those marked
    ``pytest.mark.xdist_group(name)``, which go to one worker together: the tests that share
    an expensive module- or session-scoped result (the docs build, a benchmark run, a trained
    model) or a cache (mypy's). It runs before xdist's own hook, which turns these options
    into workers (a conftest's hook runs before the plugins' of the same order)."""
    if not config.pluginmanager.hasplugin("xdist") or hasattr(config, "workerinput"):
        return
    option = config.option
    if option.numprocesses is None and not option.usepdb and not option.collectonly:
        option.numprocesses = "auto"
        option.maxprocesses = option.maxprocesses or 8
    if option.numprocesses and option.dist == "no":
        option.dist = "loadgroup"


@pytest.fixture(scope="module")
def strict_promotion():
    """jax's strict dtype promotion for a whole module; a module asks for it with
    ``pytestmark = pytest.mark.usefixtures("strict_promotion")``.

    The library's code then runs with no implicit promotion; tests/helpers.py wraps the optax
    transformations that need the standard one.
    """
    with jax.numpy_dtype_promotion("strict"):
        yield


@pytest.fixture(scope="session")
def docs_site(tmp_path_factory) -> pathlib.Path:
    """docs/ built to HTML with warnings as errors (sphinx-build -W), in a fresh process and
    output directory, once per session: tests/test_docs.py checks the build, tests/test_browser.py
    opens it in Chromium. Skipped without the docs tools."""
    pytest.importorskip("sphinx")
    pytest.importorskip("myst_nb")
    root = pathlib.Path(__file__).resolve().parent
    out = tmp_path_factory.mktemp("docs") / "html"
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", "docs", out],
        capture_output=True,
        text=True,
        cwd=root,
        timeout=600,
    )
    assert result.returncode == 0, f"sphinx-build failed:\n{result.stdout}\n{result.stderr}"
    return out


@pytest.fixture(scope="session")
def mesh() -> jax.sharding.Mesh:
    """A one-axis mesh, ("fsdp",), over the eight emulated CPU devices."""
    assert jax.device_count() >= DEVICES, "conftest.py should emulate 8 CPU devices"
    return jax.sharding.Mesh(np.array(jax.devices()[:DEVICES]), ("fsdp",))

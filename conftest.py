"""Session-wide test setup (runs before jax initialises) and the fixtures shared by tests/."""

import os
import pathlib
import shutil
import subprocess
import sys

# Eight emulated CPU devices for the sharding, pmap and shard_map tests; must be
# set before jax creates its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402  (after XLA_FLAGS)
import numpy as np  # noqa: E402
import pytest  # noqa: E402

DEVICES = 8
ROOT = pathlib.Path(__file__).resolve().parent


def compilation_cache() -> dict[str, str]:
    """XLA's compiled programs kept on disk (jax's persistent compilation cache), shared by the
    test processes and by later runs: .pytest_cache/jax-compilation-cache, or the directory in
    $LOOKAHEAD_OPTAX_TEST_CACHE ("off": none). Its key is a fingerprint of the whole program,
    the compile options and the jax version, so a changed program compiles anew and a hit is
    the executable of the identical program. Returns the settings as environment variables,
    for the tests' subprocesses that run as a user would (tests/test_docs.py); {} when off.

    No size limit: jax's limit rescans the directory under a file lock on every write, which
    made a fresh run 60% slower. Instead the first process of a run empties the directory
    when it holds over 1 GiB. Two processes writing one program write the same bytes; one
    reading a file still being written gets a warning and compiles the program itself."""
    where = os.environ.get("LOOKAHEAD_OPTAX_TEST_CACHE", "")
    where = where or str(ROOT / ".pytest_cache" / "jax-compilation-cache")
    if where == "off":
        return {}
    if "PYTEST_XDIST_WORKER" not in os.environ and os.path.isdir(where):
        entries = list(os.scandir(where))
        if sum(entry.stat().st_size for entry in entries) > 2**30:
            shutil.rmtree(where, ignore_errors=True)
    settings = {
        "jax_compilation_cache_dir": where,
        "jax_persistent_cache_min_compile_time_secs": 0.0,
        "jax_persistent_cache_min_entry_size_bytes": 0,
    }
    for name, value in settings.items():
        jax.config.update(name, value)
    return {name.upper(): str(value) for name, value in settings.items()}


COMPILATION_CACHE = compilation_cache()
# tests/data: files the tests read, and the scripts that wrote them (run by hand with the
# version they write, not collected: --doctest-modules would import them).
collect_ignore = ["tests/data"]


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    """Every core, with pytest-xdist (the test extra installs it): ``python -m pytest`` runs the
    tests in a process per core (``-n auto``, at most 8), scheduled by :class:`_Schedule`. An
    explicit ``-n`` wins (``-n 0``: one process, as ``-p no:xdist`` or ``--pdb``), as does an
    explicit ``--dist``. Without xdist (``.ci/floors`` installs only pytest and hypothesis) the
    tests run in one process. This hook runs before xdist's own, which turns the options into
    workers (a conftest's hook runs before the plugins' of the same order)."""
    if hasattr(config, "workerinput") or not config.pluginmanager.hasplugin("xdist"):
        return
    option = config.option
    if option.numprocesses is None and not option.usepdb and not option.collectonly:
        option.numprocesses = "auto"
        option.maxprocesses = option.maxprocesses or 8
    if option.numprocesses and option.dist == "no":
        option.dist = "lookahead_optax"  # pytest_xdist_make_scheduler below


def pytest_collection_modifyitems(config, items):
    """offload_state's example needs pinned_host memory, which the CPU has from jax 0.10.2 on
    (.ci/floors runs 0.8.0): skipped, saying so, where there is none."""
    from lookahead_optax import experimental

    if experimental.memory_kinds_supported():
        return
    reason = "no pinned_host memory on this device (the CPU has it from jax 0.10.2 on)"
    for item in items:
        if item.name == "lookahead_optax._offload.offload_state":  # its doctest
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session):
    """With xdist, ``-x`` (or ``--maxfail``) ends the run as an interruption, exit status 2;
    in one process it is 1, tests failed. 1 here too, as scripts that read it expect (.ci/mutations
    tells a failing test from an error by it)."""
    dsession = session.config.pluginmanager.getplugin("dsession")
    stop = getattr(dsession, "shouldstop", None)
    if (
        session.exitstatus == pytest.ExitCode.INTERRUPTED
        and isinstance(stop, str)
        and stop.startswith("stopping after ")
        and session.testsfailed
    ):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


# How pytest-xdist hands out the tests: first these, in this order (the longest first, so that
# no long test starts last while the other workers idle; measured on 2 cores), then every other
# test one by one in collection order. The tests of a named group go to one worker together:
# they share an expensive module- or session-scoped result (the docs build, a benchmark run,
# trained models), which another worker would compute again. A prefix that no longer matches
# (a renamed test) costs time, never a result. (xdist's own loadgroup and xdist_group marks
# would say the same, but pytest 9.2's node ids no longer take its suffix.)
SCHEDULE = [
    # (node id prefix, group name or None: each test on its own)
    ("tests/test_docs.py", "docs_site"),  # conftest's docs_site: built once for both modules
    ("tests/test_browser.py", "docs_site"),
    ("tests/test_sensitivity.py::test_quick_", "sensitivity_quick"),
    ("tests/test_checkpoint.py", "test_checkpoint"),
    ("tests/test_quantized.py::test_the_comm_benchmark", None),
    ("tests/test_convergence.py::test_benchmark_", None),
    ("tests/test_language_model.py", "test_language_model"),
    ("tests/test_diloco_benchmark.py", "test_diloco_benchmark"),
    ("tests/test_sensitivity.py::test_outer_sweep_", "diloco_outer_quick"),
    ("tests/test_device.py::test_device_benchmark", None),
    ("tests/test_convergence.py::test_lookahead_is_evaluated", None),
    ("tests/test_workers_checkpoint.py", "test_workers_checkpoint"),
    ("tests/test_properties.py::test_lookahead_properties_many", None),
    ("tests/test_notebook_", None),
    ("tests/test_lint.py::test_mypy", None),  # 20 s without its cache (CI), 1 s with
    ("tests/test_combinations.py::test_the_documented_calls_type_check", None),  # the same
    ("tests/test_flax.py", "test_flax"),
    ("tests/test_compose.py::test_lookahead_of_lbfgs", None),
    ("tests/test_workers_multihost.py", None),
    ("tests/test_multihost.py", None),
    ("tests/test_properties.py::test_slow_weights_are_an_ema_of_cycle_ends_many", None),
]


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """pytest-xdist's: the scheduler of ``--dist lookahead_optax`` (the default set above)."""
    if config.option.dist != "lookahead_optax":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class _Schedule(LoadScopeScheduling):
        """xdist's loadscope with SCHEDULE's scopes: a group's tests, or a single test."""

        def _split_scope(self, nodeid):
            for prefix, group in SCHEDULE:
                if nodeid.startswith(prefix):
                    return group or nodeid
            return nodeid

        def _assign_work_unit(self, node):
            if not getattr(self, "_ordered", False):  # once, with the whole queue in hand
                self._ordered = True
                units = list(self.workqueue.items())

                def rank(unit):
                    scope = unit[0]
                    return next(
                        (i for i, (prefix, group) in enumerate(SCHEDULE)
                         if scope == group or scope.startswith(prefix)),
                        len(SCHEDULE),
                    )  # fmt: skip

                self.workqueue.clear()
                self.workqueue.update(sorted(units, key=rank))  # stable: ties in queue order
            super()._assign_work_unit(node)

    return _Schedule(config, log)


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
def compilation_cache_env() -> dict[str, str]:
    """The session's compilation cache settings as environment variables, for a subprocess that
    runs as a user would: the same programs compile once ({} when the cache is off)."""
    return dict(COMPILATION_CACHE)


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

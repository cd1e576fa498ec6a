"""The documentation site (docs/): it builds without a warning, documents every public name, and
every ```python block of its pages runs as printed.

Code blocks follow the README's convention (tests/test_readme.py; the parser is in helpers): each
block runs in a fresh namespace, except those the paragraph right before introduces with
"Continues the previous block.", which run after it. The build (conftest.py's docs_site, which
tests/test_browser.py opens in Chromium) is `sphinx-build -W --keep-going`,
so a broken cross-reference, a docstring napoleon cannot parse, a page outside every toctree or
a missing image fails it; the notebooks are rendered from their committed outputs, not run.
"""

import ast
import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import optax
import pytest

import lookahead_optax as lo
from tests.helpers import CONTINUES, free_names, python_chains

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
# Pages written in Markdown whose code blocks are examples (the API page and the changelog
# hold none of their own).
REFERENCE_PAGES = {"api.md", "changelog.md"}
GUIDE_PAGES = sorted(p.name for p in DOCS.glob("*.md") if p.name not in REFERENCE_PAGES)
AUTODOC = re.compile(r"^\.\. auto(?:function|class|data|exception)::\s+(\S+)", re.MULTILINE)


def page_chains():
    """(page, chain) for every chain of ```python blocks of every guide page."""
    return [
        (page, chain) for page in GUIDE_PAGES for chain in python_chains((DOCS / page).read_text())
    ]


CHAINS = page_chains()


def documented_names():
    """The names the API page passes to autodoc, in order."""
    return [
        name.removeprefix("lookahead_optax.")
        for name in AUTODOC.findall((DOCS / "api.md").read_text())
    ]


SUBMODULES = ("experimental", "flax")


def public_names():
    """lookahead_optax.__all__, with its submodules' public names as ``module.name``."""
    names = set(lo.__all__) - set(SUBMODULES)
    for module in SUBMODULES:
        names |= {f"{module}.{name}" for name in getattr(lo, module).__all__}
    return names


def test_the_api_page_documents_exactly_the_public_names():
    """A name added to lookahead_optax.__all__ (or a submodule's) without an entry in
    docs/api.md fails here (and an entry for a name that is no longer public, too)."""
    names = documented_names()
    assert len(names) == len(set(names)), f"documented twice: {names}"
    assert set(names) == public_names(), (
        f"missing from docs/api.md: {sorted(public_names() - set(names))}; "
        f"not public: {sorted(set(names) - public_names())}"
    )
    for module in SUBMODULES:
        assert f"lookahead_optax.{module}" in (DOCS / "api.md").read_text()


def test_the_guide_pages_hold_examples_and_use_the_convention():
    assert {"getting_started.md", "semantics.md", "flax_orbax.md", "multi_device.md"} <= set(
        GUIDE_PAGES
    )
    text = (DOCS / "getting_started.md").read_text()
    assert CONTINUES in " ".join(text.split())  # stated where a reader starts
    assert len(CHAINS) >= 15, "the guide pages lost their examples"
    assert any(len(chain) > 1 for _, chain in CHAINS)
    for page in GUIDE_PAGES:  # only code blocks are fenced with backticks: directives use :::
        for language in re.findall(r"^```(\S*)", (DOCS / page).read_text(), re.MULTILINE):
            assert language in {"", "python", "bash"}, f"docs/{page}: ```{language}"


def test_every_notebook_is_in_the_docs():
    """docs/notebooks/ links every notebook of notebooks/ (rendered with committed outputs)."""
    notebooks = sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb"))
    linked = sorted(p.name for p in (DOCS / "notebooks").glob("*.ipynb"))
    assert notebooks == linked
    for name in linked:
        assert (DOCS / "notebooks" / name).resolve() == (ROOT / "notebooks" / name).resolve()


def missing_modules(code):
    """Top-level modules a block imports that are not installed (flax, orbax, ...)."""
    modules = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            modules.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            modules.add(node.module.split(".")[0])
    return sorted(m for m in modules if importlib.util.find_spec(m) is None)


def run_chain(page, chain):
    """Executes the blocks of a chain in order in one fresh namespace, and returns it."""
    namespace = {"__name__": "__main__"}
    for line, code, _ in chain:
        try:
            exec(compile(code, f"docs/{page}:{line}", "exec"), namespace)
        except Exception as error:
            raise AssertionError(
                f"the ```python block at docs/{page} line {line} failed"
            ) from error
    return namespace


# Runs the pages' chains as a reader does: a fresh Python process, without the test session's
# environment (conftest.py's XLA_FLAGS emulates 8 CPU devices; a reader's CPU has one), each
# chain in a fresh namespace. Writes {"page:first line": traceback or None} as JSON to argv[1].
READER = """
import json, sys, traceback
chains, results = json.load(sys.stdin), {}
for page, chain in chains:
    namespace = {"__name__": "__main__"}
    try:
        for line, code in chain:
            exec(compile(code, f"docs/{page}:{line}", "exec"), namespace)
        results[f"{page}:{chain[0][0]}"] = None
    except BaseException:
        results[f"{page}:{chain[0][0]}"] = traceback.format_exc()
json.dump(results, open(sys.argv[1], "w"))
"""


@pytest.fixture(scope="session")
def as_a_reader(tmp_path_factory, compilation_cache_env):
    """{"page:first line" of each chain: None, or the traceback of its failure}, every page run
    by READER in one fresh process (one start of jax, not one per page) with the environment
    minus XLA_FLAGS: one CPU device. Only jax's compilation cache is shared with the session."""
    chains = [(page, [(line, code) for line, code, _ in chain]) for page, chain in CHAINS]
    env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
    out = tmp_path_factory.mktemp("docs_as_a_reader") / "results.json"
    result = subprocess.run(
        [sys.executable, "-c", READER, str(out)], input=json.dumps(chains), cwd=ROOT,
        env=env | compilation_cache_env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0 and out.exists(), result.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize(
    "page,chain", CHAINS, ids=[f"docs/{page}:{chain[0][0]}" for page, chain in CHAINS]
)
def test_python_blocks_run_as_printed(page, chain, as_a_reader):
    """As for the README: a standalone block runs in a fresh namespace, every block marked as
    continuing runs after the one before it, and each example asserts something. They run as
    a reader runs them: in a fresh process on one CPU device (not the 8 this session emulates),
    so a block that needs several devices must say so and adapt."""
    for line, code, continues in chain:
        if continues:
            assert free_names(code), f"docs/{page} line {line}: marked but needs nothing earlier"
    assert any("assert " in code for _, code, _ in chain), (
        f"the example at docs/{page} line {chain[0][0]} checks nothing"
    )
    missing = sorted({m for _, code, _ in chain for m in missing_modules(code)})
    if missing:  # only without the extras (.ci/floors' core check); CI installs them
        pytest.skip(f"not installed: {missing}")
    failure = as_a_reader[f"{page}:{chain[0][0]}"]
    assert failure is None, f"the example at docs/{page} line {chain[0][0]} failed:\n{failure}"


def test_alpha_assignment_shown_does_not_retrace_and_the_weak_one_does():
    """The inject_hyperparams block's assignment keeps a jitted step's cache at one entry;
    the weakly typed jnp.asarray(0.8) the page warns about adds exactly one."""
    page, chain = next(
        (page, c) for page, c in CHAINS if any('hyperparams["alpha"] =' in code for _, code, _ in c)
    )
    index = next(i for i, (_, code, _) in enumerate(chain) if 'hyperparams["alpha"] =' in code)
    namespace = run_chain(page, chain[: index + 1])  # the page's own blocks, up to that one
    tx, params, shown = namespace["tx"], namespace["params"], namespace["opt_state"]
    assert float(shown.hyperparams["alpha"]) == pytest.approx(0.8)

    traces = []

    @jax.jit
    def step(params, opt_state):
        traces.append(None)
        updates, opt_state = tx.update(jax.tree.map(jnp.ones_like, params), opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    params_out, state_out = step(params, tx.init(params))
    step(params_out, state_out)
    assert len(traces) == 1
    step(params, shown)  # the assignment the page shows
    assert len(traces) == 1, f"docs/{page}: the alpha assignment retraced the jitted step"

    weak = tx.init(params)
    weak.hyperparams["alpha"] = jnp.asarray(0.8)
    assert weak.hyperparams["alpha"].weak_type
    params_out, state_out = step(params, weak)
    assert len(traces) == 2, f"a weakly typed alpha no longer retraces: update docs/{page}"
    step(params_out, state_out)  # the step's output state is strongly typed again
    assert len(traces) == 2


@pytest.mark.slow
def test_docs_build_without_warnings_and_reference_every_public_name(docs_site):
    from sphinx.util.inventory import InventoryFile

    with open(docs_site / "objects.inv", "rb") as f:
        inventory = InventoryFile.load(f, "", lambda base, uri: uri)
    objects = {name for kind in inventory.values() for name in kind}
    api = (docs_site / "api.html").read_text()
    for name in public_names():
        assert f"lookahead_optax.{name}" in objects, (
            f"lookahead_optax.{name} has no reference entry"
        )
        assert f'id="lookahead_optax.{name}"' in api


@pytest.mark.slow
def test_every_page_is_reachable_from_the_index(docs_site):
    """The index links every guide page, the notebooks, the API reference and the changelog, and
    the notebooks come with their committed outputs (figures)."""
    index = (docs_site / "index.html").read_text()
    pages = [p.stem for p in DOCS.glob("*.md") if p.name != "index.md"]
    pages += [f"notebooks/{p.stem}" for p in (DOCS / "notebooks").glob("*.ipynb")]
    for page in pages:
        assert f'href="{page}.html"' in index, f"{page} is not linked from the index"
    for notebook in (DOCS / "notebooks").glob("*.ipynb"):
        assert "<img" in (docs_site / "notebooks" / f"{notebook.stem}.html").read_text()

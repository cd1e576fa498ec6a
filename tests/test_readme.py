"""README.md runs as printed: every ```python block in a fresh namespace, except those the prose
right before them introduces with "Continues the previous block.", which run after it.

The blocks' own asserts are claims about lookahead_optax (slow weights after a sync, the fused
step equal to two calls, shardings, dtypes, batch statistics, ...), so running them checks the
library, not just the prose. No strict dtype promotion here: the snippets are user code, and
optax's Adam is not strict-promotion clean.
"""

import pathlib
import re

import pytest

from tests.helpers import fenced_blocks, free_names, python_chains

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
DOCS = README.parent / "docs"
CHAINS = python_chains(README.read_text())


def run_chain(chain, namespace=None):
    """Executes the blocks of a chain in order in one namespace, a fresh one by default."""
    namespace = {"__name__": "__main__"} if namespace is None else namespace
    for line, code, _ in chain:
        try:
            exec(compile(code, f"README.md:{line}", "exec"), namespace)
        except Exception as error:
            raise AssertionError(f"the ```python block at README.md line {line} failed") from error
    return namespace


def test_readme_is_short_and_holds_an_example():
    """The README says what the library is and links into docs/ for the rest."""
    text = README.read_text()
    assert len(text.splitlines()) < 200
    assert CHAINS, "README.md lost its example"


def test_readme_links_every_guide_page():
    text = README.read_text()
    for page in sorted(DOCS.glob("*.md")):
        if page.name != "changelog.md":  # linked as CHANGELOG.md
            assert f"(docs/{page.name}" in text, f"README.md does not link docs/{page.name}"


@pytest.mark.parametrize("chain", CHAINS, ids=[f"README.md:{chain[0][0]}" for chain in CHAINS])
def test_python_blocks_run_as_printed(chain):
    """A standalone block runs in a fresh namespace (so it imports and sets up all it uses),
    and every block that says it continues the previous one runs after it."""
    for line, code, continues in chain:
        if continues:  # the marker is there because the block needs earlier names
            assert free_names(code), f"README.md line {line}: marked but needs nothing earlier"
    assert any("assert " in code for _, code, _ in chain), (
        f"the example at README.md line {chain[0][0]} checks nothing"
    )
    run_chain(chain)


def test_no_pointers_to_files_a_user_does_not_have():
    text = README.read_text()
    for name in ("PAPER.md", "ANCHORS.md", "OUTER.md", "STYLE.md", "ACCELERATORS.md", "../shared"):
        assert name not in text
    links = re.findall(r"\]\((?!https?:)([^)]+)\)", text)
    paths = re.findall(r"\b(?:benchmarks|lookahead_optax|notebooks|tests)/[\w/-]+\.\w+", text)
    assert links and paths
    for path in links + paths:
        path = path.split("#")[0]  # docs/page.md#section
        assert (README.parent / path).exists(), f"README.md points to missing {path}"


def test_quickstart_is_one_bash_block_of_two_commands():
    text = README.read_text()
    quickstart = re.search(r"^## Quickstart\n(.*?)(?=^## )", text, re.M | re.S).group(1)
    blocks = fenced_blocks(quickstart, "bash")
    assert len(blocks) == 1, f"Quickstart must have exactly one ```bash block, has {len(blocks)}"
    assert "```" not in re.sub(r"^```bash\n.*?^```", "", quickstart, flags=re.M | re.S)
    commands = [
        line.strip()
        for line in blocks[0][1].splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    assert len(commands) == 2, f"the Quickstart block must hold two commands, has {commands}"
    assert "python benchmarks/convergence.py" in commands[0]  # the main job first
    assert "pytest" in commands[1]  # then the full test suite


def test_no_placeholders_left_in_the_core_sections():
    text = README.read_text()
    for title in (
        "Example",
        "Compared with optax.lookahead and the PyTorch ports",
        "Documentation",
    ):
        match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", text, re.M | re.S)
        assert match, f"README.md has no '## {title}' section"
        assert "<!--" not in match.group(1)
        assert len(match.group(1).split()) > 30

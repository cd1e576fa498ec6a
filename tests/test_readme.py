"""README.md: its python snippets run, and the Quickstart is one bash block of two commands.

No strict dtype promotion here: the snippets are user code, and optax's Adam is not
strict-promotion clean.
"""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def fenced_blocks(text, language):
    """(line number, code) of every ```language block, in order."""
    pattern = re.compile(rf"^```{language}\n(.*?)^```", re.MULTILINE | re.DOTALL)
    return [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in pattern.finditer(text)]


def section(text, title):
    """The text of the '## title' section, up to the next '## ' heading."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    assert match, f"README.md has no '## {title}' section"
    return match.group(1)


def test_python_snippets_run_in_order_in_one_namespace():
    blocks = fenced_blocks(README.read_text(), "python")
    assert blocks, "README.md has no ```python blocks"
    namespace = {"__name__": "readme"}
    for line, code in blocks:
        try:
            exec(compile(code, f"README.md:{line}", "exec"), namespace)
        except Exception as error:
            raise AssertionError(f"the ```python block at README.md line {line} failed") from error


def test_quickstart_is_one_bash_block_of_two_commands():
    quickstart = section(README.read_text(), "Quickstart")
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
    for title in ("Usage", "Semantics", "Compared with optax.lookahead"):
        body = section(text, title)
        assert "<!--" not in body
        assert len(body.split()) > 30

"""Sphinx configuration: MyST Markdown pages, the notebooks as committed, autodoc API reference.

Built by tests/test_docs.py with ``sphinx-build -W --keep-going`` (warnings are errors) and by
Read the Docs (.readthedocs.yaml). Nothing is executed at build time: the notebooks are shown
with their committed outputs, and the guide pages' code blocks are run by the tests instead.
"""

import html
import os
import pathlib
import posixpath
import re
import shutil
import subprocess
import sys

from docutils import nodes

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the package from this checkout, installed or not

import lookahead_optax  # noqa: E402

project = "lookahead_optax"
author = "lookahead_optax authors"
copyright = "lookahead_optax authors, Apache-2.0"
release = version = lookahead_optax.__version__

extensions = [
    "myst_nb",  # Markdown pages (MyST) and .ipynb notebooks
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",  # the docstrings are Google style (Args:, Returns:, Attributes:)
    "sphinx.ext.mathjax",
]

exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints"]
suppress_warnings = []

# Notebooks: rendered with their committed outputs, never executed here.
nb_execution_mode = "off"
myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3

# API reference.
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True

# Broken cross-references are errors (with -W). References into other libraries (jax, optax,
# flax, numpy, typing) are not resolved: no intersphinx, so the build needs no network.
nitpicky = True
nitpick_ignore_regex = [
    (
        r"py:.*",
        r"(jax|jaxlib|optax|flax|numpy|np|jnp|jaxtyping|typing|collections|chex|orbax)(\..*)?",
    ),
    (r"py:.*", r"(Array|ArrayTree|PyTree|Any|Callable|Iterable|Sequence|Literal|NamedTuple)"),
]

html_theme = "furo"
html_title = f"lookahead_optax {release}"
html_static_path = ["_static"]
html_css_files = ["lookahead.css"]

# MathJax is served from the site itself, so math renders offline and in a local preview:
# MathJax 3.2.2 from npm (es5/tex-chtml-full.js, every TeX extension built in, and its woff-v2
# fonts), Apache-2.0; see _static/mathjax/README.md.
mathjax_path = "mathjax/tex-chtml-full.js"

# One box per cell output, not one per stdout/stderr write.
nb_merge_streams = True


def git(*args):
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except OSError:
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def repository_url():
    """The source repository's web address, where the build can tell: LOOKAHEAD_OPTAX_REPOSITORY,
    Read the Docs' clone URL, or this checkout's origin remote; empty when none is known."""
    url = os.environ.get("LOOKAHEAD_OPTAX_REPOSITORY") or os.environ.get(
        "READTHEDOCS_GIT_CLONE_URL", ""
    )
    url = url or git("remote", "get-url", "origin")
    url = re.sub(r"^git@([^:]+):", r"https://\1/", url.strip())
    url = re.sub(r"^https://[^/@]+@", "https://", url)  # no credentials in a page
    return url.removesuffix(".git") if url.startswith("https://") else ""


REPOSITORY = repository_url()
COMMIT = os.environ.get("READTHEDOCS_GIT_COMMIT_HASH") or git("rev-parse", "HEAD") or "main"
html_theme_options = {}
if REPOSITORY:  # GitHub's and GitLab's address scheme: <repository>/blob/<commit>/<path>
    html_theme_options = {
        "source_view_link": f"{REPOSITORY}/blob/{COMMIT}/docs/{{filename}}",
        "footer_icons": [
            {"name": "Source", "url": REPOSITORY, "html": "Source repository", "class": ""}
        ],
    }


# napoleon types a NamedTuple's Attributes from its evaluated annotations, printed with the
# runtime class's private module (jaxtyping's Array is jax.Array, whose class lives in
# jax.jaxlib._jax). Shown as the signatures show it: Array.
PRIVATE_JAX_PATH = re.compile(r"\b(?:jax\.)?jaxlib\._jax\.(\w+)")


def public_jax_names(app, what, name, obj, options, lines):
    lines[:] = [PRIVATE_JAX_PATH.sub(r"\1", line) for line in lines]


# Numbers are never broken across two lines ("6.15e-05 ± 2.3e-" / "06", "0.062 ±" / "0.003"):
# each number with a sign, an exponent or a "± error" becomes <span class="nowrap">, outside code
# and math. tests/test_browser.py checks every page with the same pattern.
NUMBER = re.compile(
    r"[−+-]?\d[\d,]*(?:\.\d+)?(?:e[−+-]?\d+)?(?:\s*±\s*[−+-]?\d[\d,]*(?:\.\d+)?(?:e[−+-]?\d+)?)?"
)
NOT_PROSE = (nodes.literal, nodes.FixedTextElement, nodes.math, nodes.raw, nodes.comment)


def inside(node, kinds):
    while node is not None:
        if isinstance(node, kinds):
            return True
        node = node.parent
    return False


def split_text(text_node, pattern, make):
    """Replaces a Text node by text and make(match) nodes for each match of pattern (make
    returns None to leave a match as it is)."""
    text, parts, last = text_node.astext(), [], 0
    for match in pattern.finditer(text):
        node = make(match)
        if node is None:
            continue
        parts += [nodes.Text(text[last : match.start()]), node]
        last = match.end()
    if parts:
        parts.append(nodes.Text(text[last:]))
        text_node.parent.replace(
            text_node, [p for p in parts if not isinstance(p, nodes.Text) or p]
        )


def keep_numbers_whole(doctree):
    def make(match):
        if not re.search(r"[\s±−-]", match.group()[1:]):
            return None  # nothing inside it can break
        return nodes.inline(match.group(), match.group(), classes=["nowrap"])

    for text in list(doctree.findall(nodes.Text)):
        if not inside(text.parent, NOT_PROSE):
            split_text(text, NUMBER, make)


# The repository's files that the pages name (benchmarks/convergence.py, tests/test_docs.py,
# benchmarks/results/diloco.md) are links: to the rendered notebook for notebooks/*.ipynb, else
# to a copy in the site (_repo/, highlighted), which works offline and matches the docs' version.
REPO_PATH = re.compile(
    r"(?<![\w/.-])(?:benchmarks|tests|notebooks|lookahead_optax|\.ci)/[\w./-]*\w"
)
SOURCE_SUFFIXES = {".py", ".md", ".json", ".toml", ".txt", ".yaml", ".cfg", ""}


def repo_file(path):
    path = path.rstrip("/")
    file = ROOT / path
    return file if file.is_file() and ROOT in file.resolve().parents else None


def source_link(app, docname, path):
    """The address (relative to docname's page) that shows the repository file path."""
    builder = app.builder
    if path.startswith("notebooks/") and path.endswith(".ipynb"):
        target = builder.get_target_uri(f"notebooks/{pathlib.Path(path).stem}")
    else:
        suffix = pathlib.PurePosixPath(path).suffix
        target = f"_repo/{path}.html" if suffix in SOURCE_SUFFIXES else f"_repo/{path}"
    here = posixpath.dirname(builder.get_target_uri(docname))
    return posixpath.relpath(target, here or ".")


def link_source_files(app, doctree, docname):
    if app.builder.format != "html":
        return

    def link(match):
        if not repo_file(match.group()):
            return None
        refuri = source_link(app, docname, match.group())
        return nodes.reference(match.group(), match.group(), internal=False, refuri=refuri)

    # In inline code (`python benchmarks/convergence.py --seeds 5`), the path alone is a link.
    for literal in list(doctree.findall(nodes.literal)):
        if inside(literal.parent, nodes.reference):
            continue
        text, parts, last = literal.astext(), [], 0
        for match in REPO_PATH.finditer(text):
            if repo_file(match.group()):
                ref = nodes.reference("", "", refuri=source_link(app, docname, match.group()))
                ref += nodes.literal(match.group(), match.group(), classes=literal["classes"])
                parts += [text[last : match.start()], ref]
                last = match.end()
        if parts:
            parts.append(text[last:])
            literal.replace_self(
                [
                    p if not isinstance(p, str) else nodes.literal(p, p, classes=literal["classes"])
                    for p in parts
                    if p
                ]
            )
    for text in list(doctree.findall(nodes.Text)):
        if not inside(text.parent, NOT_PROSE + (nodes.reference, nodes.title)):
            split_text(text, REPO_PATH, link)


def write_source_files(app, exception):
    """The files that the built pages link to under _repo/ (link_source_files), written there.
    Read from the pages themselves, so that parallel and incremental builds get them all."""
    if exception or app.builder.format != "html":
        return
    from pygments import highlight
    from pygments.formatters import HtmlFormatter
    from pygments.lexers import TextLexer, get_lexer_for_filename

    linked = set()
    for page in pathlib.Path(app.outdir).rglob("*.html"):
        if "_repo" not in page.relative_to(app.outdir).parts:
            linked.update(re.findall(r'href="[^"#]*?_repo/([^"#?]+)', page.read_text("utf-8")))
    paths = {p.removesuffix(".html") if p.endswith(".html") else p for p in linked}
    for path in sorted(p for p in paths if repo_file(p)):
        source = ROOT / path
        out = pathlib.Path(app.outdir, "_repo", path)
        out.parent.mkdir(parents=True, exist_ok=True)
        if source.suffix not in SOURCE_SUFFIXES:
            shutil.copyfile(source, out)
            continue
        try:
            lexer = get_lexer_for_filename(source.name)
        except Exception:
            lexer = TextLexer()
        where = (
            f'<p><a href="{html.escape(REPOSITORY)}/blob/{COMMIT}/{html.escape(path)}">'
            f"{html.escape(path)} in the source repository</a></p>"
            if REPOSITORY
            else ""
        )
        formatter = HtmlFormatter(full=True, title=path, lineanchors="L", linenos="inline")
        page = highlight(source.read_text(encoding="utf-8"), lexer, formatter)
        head = f'<meta name="viewport" content="width=device-width, initial-scale=1">{where}'
        page = page.replace("<body>", f"<body>\n{head}", 1)
        pathlib.Path(f"{out}.html").write_text(page, encoding="utf-8")


# Inline code may break after . _ / ( , = (a <wbr>, which copying ignores), not inside a word:
# a long name in a narrow table column or on a phone wraps at its parts.
CODE_BREAK = re.compile(r"(?<=[._/(,=])(?=[\w\"'(\[])")


def code_break_points(doctree):
    for literal in list(doctree.findall(nodes.literal)):
        for text in list(literal.findall(nodes.Text)):
            pieces = CODE_BREAK.split(text.astext())
            if len(pieces) > 1:
                parts = [nodes.Text(pieces[0])]
                for piece in pieces[1:]:
                    parts += [nodes.raw("", "<wbr>", format="html"), nodes.Text(piece)]
                text.parent.replace(text, parts)


def doctree_resolved(app, doctree, docname):
    link_source_files(app, doctree, docname)
    keep_numbers_whole(doctree)
    code_break_points(doctree)
    link_images_to_full_size(app, doctree, docname)


# Every image links to its file, full size: plots are drawn larger than the text column, so a
# page shows them scaled down (with smaller legend text) and a click shows every detail.
def link_images_to_full_size(app, doctree, docname):
    if app.builder.format != "html":
        return
    here = posixpath.dirname(app.builder.get_target_uri(docname))
    for image in list(doctree.findall(nodes.image)):
        if isinstance(image.parent, nodes.reference):
            continue
        candidates = [image["uri"], *image.get("candidates", {}).values()]
        name = next((app.env.images[c][1] for c in candidates if c in app.env.images), None)
        if name is None:
            continue  # not a local file
        target = posixpath.relpath(f"{app.builder.imagedir}/{name}", here or ".")
        ref = nodes.reference("", "", internal=True, refuri=target, classes=["image-reference"])
        image.replace_self(ref)
        ref.append(image)


# The search page's snippets are cut from the pages' HTML, math as TeX: the page loads MathJax
# too, and _static/search_math.js typesets the snippets (after dropping a formula cut in two).
def search_page_math(app, pagename, templatename, context, doctree):
    if pagename == "search":
        context["has_maths_elements"] = True
        app.builder.add_js_file("search_math.js")


def setup(app):
    app.connect("autodoc-process-docstring", public_jax_names, priority=600)  # after napoleon
    app.connect("doctree-resolved", doctree_resolved)
    app.connect("build-finished", write_source_files)
    app.connect("html-page-context", search_page_math, priority=400)  # before sphinx.ext.mathjax


# No Python module index page: the API page lists the two submodules.
html_domain_indices = False

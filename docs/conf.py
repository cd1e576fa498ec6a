"""Sphinx configuration: MyST Markdown pages, the notebooks as committed, autodoc API reference.

Built by tests/test_docs.py with ``sphinx-build -W --keep-going`` (warnings are errors) and by
Read the Docs (.readthedocs.yaml). Nothing is executed at build time: the notebooks are shown
with their committed outputs, and the guide pages' code blocks are run by the tests instead.
"""

import pathlib
import re
import sys

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


# napoleon types a NamedTuple's Attributes from its evaluated annotations, printed with the
# runtime class's private module (jaxtyping's Array is jax.Array, whose class lives in
# jax.jaxlib._jax). Shown as the signatures show it: Array.
PRIVATE_JAX_PATH = re.compile(r"\b(?:jax\.)?jaxlib\._jax\.(\w+)")


def public_jax_names(app, what, name, obj, options, lines):
    lines[:] = [PRIVATE_JAX_PATH.sub(r"\1", line) for line in lines]


def setup(app):
    app.connect("autodoc-process-docstring", public_jax_names, priority=600)  # after napoleon

"""The documentation site as a reader sees it: every page of the built site (conftest.py's
docs_site, the build that tests/test_docs.py checks) opened in headless Chromium, at 1280 px and
at 400 px, with every request outside the site blocked, as an offline reader or a local preview
has it.

On every page: no console error, no failed or outside request; every image loaded, and one shown
smaller than its file links to the full size; every plot the page names (``x.png``) is shown on
it; no raw TeX left in the visible text (MathJax is served from the site itself), no pseudo-math
(``θ_k``, ``x^(1/k)``: the pages write math as math); no literal double backticks in prose; no
number broken across two lines (``2.3e-`` / ``06``); at 1280 px no table and no code block wider
than its box; at 400 px nothing of the main text column past the window's edge. The search page
runs a search and checks its snippets the same way. A failure names the page and the element.

Needs Debian's ``chromium`` (``apt-get install chromium``; .ci/run installs it) and playwright
(in the ``test`` extra), and skips with that reason without them. Screenshots are not kept.
"""

import functools
import http.server
import os
import pathlib
import shutil
import threading

import pytest

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",  # no name resolves but ours
]
WIDE, NARROW = 1280, 400
SEARCH_QUERY = "pseudo-gradient"  # found on pages whose snippets hold math

# The pages of the site: the guide and reference pages, the notebooks, and Sphinx's own.
PAGES = sorted(
    [p.stem for p in DOCS.glob("*.md")]
    + [f"notebooks/{p.stem}" for p in (DOCS / "notebooks").glob("*.ipynb")]
    + ["genindex"]
)

# Runs in the page: returns a list of problems, each naming the element.
CHECK_PAGE = r"""
(mode) => {
  const problems = [];
  const main = document.querySelector('[role="main"]') || document.body;
  const column = main.getBoundingClientRect();
  const oneLine = (s, n = 70) => (s || "").replace(/\s+/g, " ").trim().slice(0, n);
  const where = (el) => {
    let name = el.tagName.toLowerCase();
    if (el.id) name += "#" + el.id;
    const classes = typeof el.className === "string" ? el.className.trim().split(/\s+/) : [];
    if (classes[0]) name += "." + classes.slice(0, 2).join(".");
    const section = el.closest("section");
    const heading = section && section.querySelector("h1, h2, h3, h4, h5, h6");
    const under = heading ? ` under "${oneLine(heading.textContent.replace("¶", ""), 50)}"` : "";
    return `<${name}>${under}`;
  };
  const NOT_PROSE = "pre, code, kbd, samp, script, style, textarea, mjx-container, .highlight";
  const proseTextNodes = (root) => {
    const nodes = [];
    const walker = document.createTreeWalker(root, NodeFilter.SHOW_TEXT);
    for (let node = walker.nextNode(); node; node = walker.nextNode()) {
      const el = node.parentElement;
      if (!el || !node.nodeValue.trim() || el.closest(NOT_PROSE)) continue;
      if (!el.getClientRects().length || getComputedStyle(el).visibility === "hidden") continue;
      nodes.push(node);
    }
    return nodes;
  };
  const report = (what, node, match) => {
    const text = node.nodeValue;
    const start = Math.max(0, match.index - 30);
    const context = oneLine(text.slice(start, match.index + match[0].length + 30), 90);
    problems.push(`${what} in ${where(node.parentElement)}: "${context}"`);
  };
  const prose = proseTextNodes(main);

  if (mode === "wide") {
    const TEX = /\\[()[\]]|\\[A-Za-z]+|\$\$|[_^]\{/;
    // θ_k, V_SGD, ρ(T)^(1/k), qᵏ; not snake_case names (lookahead_optax, k_steps)
    const PSEUDO_MATH =
      /(?<![\p{L}\p{N}_.])\p{L}_(?:\{|[\p{L}\p{N}]{1,3}(?![\p{L}\p{N}_(]))|[\p{L}\p{N})]\^[\p{L}\p{N}({]|[ᵃᵇᶜᵈᵉᶠᵍʰⁱʲᵏˡᵐⁿᵒᵖʳˢᵗᵘᵛʷˣʸᶻ₀₁₂₃₄₅₆₇₈₉ₐₑₒₓₕₖₗₘₙₚₛₜ]/u;
    for (const node of prose) {
      let m;
      if ((m = TEX.exec(node.nodeValue))) report("raw TeX", node, m);
      else if ((m = PSEUDO_MATH.exec(node.nodeValue))) report("math written as text", node, m);
    }
    // reST's ``literal``s: one left open shows its backticks, in prose or in inline code.
    const texts = document.createTreeWalker(main, NodeFilter.SHOW_TEXT);
    for (let node = texts.nextNode(); node; node = texts.nextNode()) {
      const el = node.parentElement;
      if (!el || el.closest("pre, .highlight, script, style")) continue;
      const m = /``/.exec(node.nodeValue);
      if (m) report("literal `` in the text", node, m);
    }

    for (const img of document.images) {
      const src = img.getAttribute("src");
      if (!img.complete || img.naturalWidth === 0) {
        problems.push(`image not loaded: ${src} in ${where(img.parentElement)}`);
      } else if (main.contains(img) && img.clientWidth < 0.95 * img.naturalWidth) {
        const link = img.closest("a[href]");
        const full = link && new URL(link.href).pathname === new URL(img.src).pathname;
        if (!full)
          problems.push(
            `image ${src} shown at ${img.clientWidth} px of its ${img.naturalWidth} px ` +
              `without a link to the full size, in ${where(img.parentElement)}`
          );
      }
    }
    // A plot the page names (x.png, x.{md,json,png}) is shown on it.
    const shown = new Set([...document.images].map((img) => img.src.split("/").pop()));
    const text = main.innerText;
    const named = [...text.matchAll(/([\w-]+)(?:\.png\b|\.\{[\w,]*\bpng\b[\w,]*\})/g)];
    for (const name of new Set(named.map((m) => m[1] + ".png")))
      if (!shown.has(name)) problems.push(`names the plot ${name} without showing it`);

    // Files of the repository and web addresses named in the text are links.
    const FILE = new RegExp(
      String.raw`(?<![\w/.-])(?:benchmarks|tests|notebooks|lookahead_optax)/` +
        String.raw`[\w./-]*\.(?:\w+|\{[\w,]+\})`
    );
    const ADDRESS = /\bhttps?:\/\/\S+/;
    const walker = document.createTreeWalker(main, NodeFilter.SHOW_TEXT);
    for (let node = walker.nextNode(); node; node = walker.nextNode()) {
      const el = node.parentElement;
      if (!el || el.closest("pre, .highlight, script, style, a[href], mjx-container")) continue;
      let m;
      if ((m = FILE.exec(node.nodeValue))) report(`names ${m[0]} without a link`, node, m);
      if ((m = ADDRESS.exec(node.nodeValue))) report("a web address that is not a link", node, m);
    }

    // Notebook output in one box per cell (nb_merge_streams), not one per write.
    for (const output of main.querySelectorAll(".cell_output")) {
      const streams = output.querySelectorAll(":scope > .output.stream").length;
      if (streams > 1)
        problems.push(`notebook output split into ${streams} boxes: ${where(output)}`);
    }

    // The API reference: no private module path in what it shows (jax.jaxlib._jax.Array), every
    // name in a signature linked, qualified (optax.Params) or a known one (not a private
    // alias), every module attribute shown with its value and its own description.
    for (const node of prose) {
      const m = /\b[A-Za-z]\w*(?:\.\w+)*\._[a-z]\w*/.exec(node.nodeValue);
      if (m && node.parentElement.closest("dl.py")) report("a private module path", node, m);
    }
    const KNOWN = new Set(
      ("None bool int float complex str bytes object type tuple list dict set Any Callable " +
        "Sequence Iterable Mapping Literal Array GradientTransformation dtype SupportsDType " +
        "Device").split(" ")
    );
    for (const part of main.querySelectorAll("dt.sig em.sig-param, dt.sig .sig-return-typehint")) {
      let annotation = part.classList.contains("sig-return-typehint");
      for (const el of part.querySelectorAll("span.n, span.p, span.o")) {
        const text = el.textContent.trim();
        if (el.matches("span.p") && text === ":") annotation = true;
        if (el.matches("span.o") && text === "=") break;
        if (!annotation || !el.matches("span.n") || el.closest("a")) continue;
        const names = text.replace(/'[^']*'|"[^"]*"/g, "").match(/[A-Za-z_][\w.]*/g) || [];
        for (const name of names) {
          if (name.includes(".") || KNOWN.has(name)) continue;
          if (document.querySelector(`dt[id="lookahead_optax.${name}"], dt[id$=".${name}"]`))
            continue;
          problems.push(`${where(part.closest("dt"))} ${oneLine(part.closest("dt").id)}: ` +
            `the type ${name} is neither documented nor qualified`);
        }
      }
    }
    for (const entry of main.querySelectorAll("dl.py.data")) {
      const dt = entry.querySelector("dt"), dd = entry.querySelector("dd");
      if (!dt.textContent.includes("=")) problems.push(`${dt.id}: shown without its value`);
      if (/\w\(object=/.test(dd ? dd.textContent : ""))
        problems.push(`${dt.id}: shows a builtin's help text: "${oneLine(dd.textContent, 40)}"`);
    }

    for (const table of main.querySelectorAll("table")) {
      const box = table.closest(".table-wrapper");
      const r = table.getBoundingClientRect();
      if (r.right > column.right + 1 || (box && box.scrollWidth > box.clientWidth + 1))
        problems.push(
          `table wider than the text column (${Math.round(r.width)} px in ` +
            `${Math.round(box ? box.clientWidth : column.width)}): ${where(table)} ` +
            `"${oneLine(table.innerText, 50)}"`
        );
    }
    for (const pre of main.querySelectorAll("pre")) {
      if (pre.scrollWidth > pre.clientWidth + 1) {
        const lines = pre.innerText.split("\n");
        const longest = lines.reduce((a, b) => (b.length > a.length ? b : a), "");
        problems.push(
          `code block wider than its box (${pre.scrollWidth} px in ${pre.clientWidth}, ` +
            `${longest.length} characters): ${where(pre)} "${oneLine(longest, 60)}"`
        );
      }
    }
  } else {
    const width = document.documentElement.clientWidth;
    if (document.documentElement.scrollWidth > width + 1)
      problems.push(`the page scrolls sideways (${document.documentElement.scrollWidth} px wide)`);
    const scrolls = (el) => {
      for (let a = el.parentElement; a && a !== main; a = a.parentElement) {
        const overflow = getComputedStyle(a).overflowX;
        if (overflow === "auto" || overflow === "scroll") return true;
      }
      return false;
    };
    const blocks =
      "p, li, dt, dd, h1, h2, h3, h4, h5, h6, img, figure, table, pre, blockquote, mjx-container";
    for (const el of main.querySelectorAll(blocks)) {
      const r = el.getBoundingClientRect();
      if (!r.width || scrolls(el)) continue;
      if (r.right > width + 1 || r.left < -1)
        problems.push(
          `past the window's edge (${Math.round(r.left)} to ${Math.round(r.right)} px of ` +
            `${width}): ${where(el)} "${oneLine(el.innerText, 50)}"`
        );
    }
  }

  // Numbers stay on one line: "6.15e-05 ± 2.3e-06", "0.062 ± 0.003", "−0.003".
  const ONE = String.raw`[−+-]?\d[\d,]*(?:\.\d+)?(?:e[−+-]?\d+)?`;
  const NUMBER = new RegExp(`${ONE}(?:\\s*±\\s*${ONE})?`, "g");
  for (const node of prose) {
    for (const m of node.nodeValue.matchAll(NUMBER)) {
      if (!/[\s±−-]/.test(m[0].slice(1))) continue;  // nothing inside it can break
      const range = document.createRange();
      range.setStart(node, m.index);
      range.setEnd(node, m.index + m[0].length);
      const rects = [...range.getClientRects()].filter((r) => r.width > 0);
      const tops = new Set(rects.map((r) => Math.round(r.bottom)));
      if (tops.size > 1) report("number broken across lines", node, m);
    }
  }
  return problems;
}
"""


@pytest.fixture(scope="module")
def site(docs_site):
    """The built site's address, served on 127.0.0.1 for the module."""
    handler = functools.partial(QuietHandler, directory=str(docs_site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.skip(
            f"Chromium not found ({CHROMIUM}): on Debian, apt-get install chromium "
            "(.ci/run installs it)"
        )
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed: pip install -e '.[test]'"
    )
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        yield browser
        browser.close()


def open_page(browser, site, path):
    """A fresh tab at 1280 px on site + path, recording what goes wrong while it loads."""
    context = browser.new_context(viewport={"width": WIDE, "height": 900})
    trouble = []

    def route(route):
        url = route.request.url
        if url.startswith(site) or url.startswith(("data:", "blob:")):
            route.continue_()
        else:
            trouble.append(f"request outside the site (blocked): {url}")
            route.abort()

    context.route("**/*", route)
    page = context.new_page()
    page.on(
        "console",
        lambda m: m.type == "error" and trouble.append(f"console error: {m.text} ({m.location})"),
    )
    page.on("pageerror", lambda e: trouble.append(f"script error: {e}"))
    page.on(
        "requestfailed",
        lambda r: r.url.startswith(site) and trouble.append(f"request failed: {r.url} {r.failure}"),
    )
    page.on(
        "response",
        lambda r: r.status >= 400 and trouble.append(f"HTTP {r.status}: {r.url}"),
    )
    page.goto(site + path, wait_until="load")
    page.evaluate("document.fonts.ready.then(() => true)")
    typeset(page)
    return context, page, trouble


def typeset(page):
    """Waits for MathJax (when the page loads it) to finish everything queued."""
    page.evaluate(
        "() => window.MathJax && MathJax.startup && MathJax.startup.promise"
        " ? MathJax.startup.promise.then(() => true) : true"
    )


# Runs in the page: the addresses of its links into the site.
LINKS = """
() => [...document.querySelectorAll("a[href]")]
  .map((a) => new URL(a.href))
  .filter((url) => url.origin === location.origin)
  .map((url) => decodeURIComponent(url.pathname))
"""


def broken_links(page, html):
    """Links into the site whose file the build did not write (anchors: the Sphinx build)."""
    paths = sorted(set(page.evaluate(LINKS)))
    return [f"link to a missing file: {p}" for p in paths if not (html / p.lstrip("/")).is_file()]


def check(page, trouble, html):
    problems = page.evaluate(CHECK_PAGE, "wide") + broken_links(page, html)
    page.set_viewport_size({"width": NARROW, "height": 900})
    page.evaluate("new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(done)))")
    problems += [f"at {NARROW} px: {p}" for p in page.evaluate(CHECK_PAGE, "narrow")]
    return trouble + problems


@pytest.mark.parametrize("name", PAGES)
def test_page_as_a_reader_sees_it(browser, site, docs_site, name):
    context, page, trouble = open_page(browser, site, f"{name}.html")
    try:
        problems = check(page, trouble, docs_site)
    finally:
        context.close()
    assert not problems, f"{name}.html:\n  " + "\n  ".join(problems)


def test_search_finds_and_its_snippets_read(browser, site, docs_site):
    """The search page finds pages, and their snippets show math typeset, not TeX."""
    context, page, trouble = open_page(browser, site, f"search.html?q={SEARCH_QUERY}")
    try:
        page.wait_for_function(
            "() => (document.querySelector('#search-results')?.innerText || '')"
            ".includes('Search finished')",
            timeout=30_000,
        )
        page.wait_for_load_state("networkidle")  # the snippets' pages fetched
        typeset(page)
        snippets = page.locator("#search-results p.context").count()
        problems = check(page, trouble, docs_site)
    finally:
        context.close()
    assert snippets >= 2, f"search.html?q={SEARCH_QUERY}: {snippets} snippets"
    assert not problems, f"search.html?q={SEARCH_QUERY}:\n  " + "\n  ".join(problems)


def test_every_page_of_the_site_is_checked(docs_site):
    built = {
        str(p.relative_to(docs_site).with_suffix(""))
        for p in docs_site.rglob("*.html")
        if not p.relative_to(docs_site).parts[0].startswith("_")
    }
    assert built - {"search"} == set(PAGES)

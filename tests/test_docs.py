"""The documentation site builds with ``--strict``, and its runnable examples run.

Convention for Python code blocks in ``docs/``:

* ```` ``` { .python .exec } ````: runnable. Each page's runnable blocks run in
  order in one namespace (``__name__ == "__main__"``), so a later block may use
  what an earlier one defined. Ray is already initialized (the shared
  ``ray_local``); blocks rely on Ray starting on first use and never call
  ``ray.init``.
* ```` ``` { .python .sketch } ````: not run, because it needs what a test machine
  lacks (Megatron, GPUs, a cluster) or is a fragment of a larger program. Every
  sketch says so in the text around it.
* A block holding only ``--8<--`` snippet lines includes a file verbatim; the
  included files are examples that ``tests/test_examples.py`` runs.

Any other ``python`` block fails :func:`test_every_python_block_is_tagged`.

The built site is checked too: one title per API reference page and no heading
twice, no private names, no reST left in the prose, every code block highlighted,
a link to the repository, an install page, and every mermaid diagram rendered to
an SVG in headless Chromium with nothing fetched from the network.
"""

from __future__ import annotations

import contextlib
import html
import io
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

_FENCE_OPEN = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})\s*(?P<info>.*)$")
_PYTHON = re.compile(r"^(?:python|py|pycon)\b|^\{[^}]*\.(?:python|py)\b")


@dataclass(frozen=True)
class Block:
    page: str
    line: int
    info: str
    code: str

    @property
    def is_python(self) -> bool:
        return bool(_PYTHON.match(self.info))

    @property
    def classes(self) -> set[str]:
        return set(re.findall(r"\.([\w-]+)", self.info)) if self.info.startswith("{") else set()

    @property
    def is_snippet(self) -> bool:
        lines = [ln.strip() for ln in self.code.splitlines() if ln.strip()]
        return bool(lines) and all(ln.startswith("--8<--") for ln in lines)


def blocks(path: Path) -> list[Block]:
    """Fenced code blocks of one Markdown page (nested fences are not used in these docs)."""
    out: list[Block] = []
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        match = _FENCE_OPEN.match(lines[i])
        if not match:
            i += 1
            continue
        fence, indent = match["fence"], len(match["indent"])
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence):
            body.append(lines[j][indent:])
            j += 1
        out.append(
            Block(str(path.relative_to(DOCS)), i + 1, match["info"].strip(), "\n".join(body))
        )
        i = j + 1
    return out


PAGES = sorted(DOCS.rglob("*.md"))
RUNNABLE = {str(p.relative_to(DOCS)): [b for b in blocks(p) if "exec" in b.classes] for p in PAGES}
RUNNABLE = {page: bs for page, bs in RUNNABLE.items() if bs}


def test_docs_exist_and_have_runnable_examples() -> None:
    assert (ROOT / "mkdocs.yml").exists()
    assert len(PAGES) >= 10
    assert len(RUNNABLE) >= 4, sorted(RUNNABLE)


def test_every_python_block_is_tagged() -> None:
    untagged = [
        f"{b.page}:{b.line} ({b.info!r})"
        for page in PAGES
        for b in blocks(page)
        if b.is_python and not b.is_snippet and not ({"exec", "sketch"} & b.classes)
    ]
    assert not untagged, (
        "tag these python blocks `{ .python .exec }` (run by the tests) or "
        "`{ .python .sketch }` (explain why not): " + ", ".join(untagged)
    )


@pytest.mark.parametrize("page", sorted(RUNNABLE))
def test_runnable_blocks_run(page: str, request: pytest.FixtureRequest) -> None:
    page_blocks = RUNNABLE[page]
    if any("ray" in b.code for b in page_blocks):
        request.getfixturevalue("ray_local")
    namespace: dict[str, object] = {"__name__": "__main__"}
    for block in page_blocks:
        code = compile(block.code, f"docs/{block.page}:{block.line}", "exec")
        output = io.StringIO()
        try:
            with contextlib.redirect_stdout(output):
                exec(code, namespace)
        except BaseException as exc:
            raise AssertionError(
                f"docs/{block.page}, block at line {block.line} failed "
                f"({type(exc).__name__}); its output:\n{output.getvalue()}"
            ) from exc


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site, built once with ``--strict`` (a warning fails the build)."""
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings_handlers.python")
    pytest.importorskip("material")
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


def test_mkdocs_build_strict(site: Path) -> None:
    assert (site / "reference" / "aio" / "index.html").exists()
    assert (site / "install" / "index.html").exists()
    assert (site / "demo" / "index.html").exists()


def article(page: Path) -> str:
    """The page's main content (Material's ``<article>``), as HTML."""
    text = page.read_text()
    return text.split("<article", 1)[1].split("</article>", 1)[0]


def prose(html_text: str) -> str:
    """Visible text outside code: what a reST leftover would show up in."""
    without_code = re.sub(r"<pre.*?</pre>|<code.*?</code>", "", html_text, flags=re.S)
    return html.unescape(re.sub(r"<[^>]+>", "", without_code))


def headings(html_text: str) -> list[tuple[str, str]]:
    found = re.findall(r"<(h[1-6])[^>]*>(.*?)</h[1-6]>", html_text, flags=re.S)
    return [(tag, " ".join(prose(body).replace("¶", "").split())) for tag, body in found]


def reference_pages(site: Path) -> list[Path]:
    pages = sorted((site / "reference").glob("*/index.html"))
    assert len(pages) >= 10
    return pages


REFERENCE = sorted(p.stem for p in (DOCS / "reference").glob("*.md"))
# Pages whose owner has a fix to make; each xfail is strict, so it fails once fixed.
KNOWN_DOUBLED: dict[str, str] = {}


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=KNOWN_DOUBLED[n]))
        if n in KNOWN_DOUBLED
        else n
        for n in REFERENCE
    ],
)
def test_reference_pages_have_one_title_and_no_doubled_headings(site: Path, name: str) -> None:
    page = site / "reference" / ("" if name == "index" else name) / "index.html"
    found = headings(article(page))
    titles = [text for tag, text in found if tag == "h1"]
    assert len(titles) == 1, f"{name}: h1 headings {titles}"
    top = [text for tag, text in found if tag in ("h1", "h2")]
    doubled = sorted({t for t in top if top.count(t) > 1})
    assert not doubled, f"{name}: headings repeated: {doubled}"


def test_reference_pages_show_no_private_names(site: Path) -> None:
    private = re.compile(r"(?<![\w.])(?:\w+\.)*_[a-z]\w*")  # _x or mod._x, not __dunder__
    for page in reference_pages(site):
        text = article(page)
        ids = [i for i in re.findall(r'id="([^"]+)"', text) if private.fullmatch(i)]
        shown = [
            name
            for name in re.findall(r"<code[^>]*>(.*?)</code>", text, flags=re.S)
            if private.fullmatch(html.unescape(re.sub(r"<[^>]+>", "", name)).strip())
        ]
        assert not ids and not shown, f"{page}: private names {ids + shown}"


def test_no_rest_markup_is_left_in_the_rendered_pages(site: Path) -> None:
    leftovers = ("::", "``", ":class:`", ":func:`", ":meth:`", ":attr:`", ":mod:`", ".. code")
    for page in sorted(site.rglob("*.html")):
        if page.name == "404.html":
            continue
        text = prose(article(page))
        for leftover in leftovers:
            at = text.find(leftover)
            assert at < 0, f"{page}: {leftover!r} in {text[max(0, at - 60) : at + 20]!r}"


def test_code_in_the_reference_is_highlighted(site: Path) -> None:
    for page in reference_pages(site):
        text = article(page)
        wrappers = re.findall(r"(<div[^>]*>)?\s*<pre", text)
        plain = [w or "<pre> alone" for w in wrappers if "highlight" not in w]
        assert not plain, f"{page}: {len(plain)} code blocks without highlighting"
    # The module docstring's example (a reST literal block in the source) is
    # highlighted as Python: its keywords carry Pygments' token class.
    actor = article(site / "reference" / "actor" / "index.html")
    assert (
        '<code><span class="k">class</span><span class="w"> </span><span class="nc">Trainer'
        in actor
    )


def test_the_site_links_the_repository_and_has_an_install_page(site: Path) -> None:
    config = (ROOT / "mkdocs.yml").read_text()
    match = re.search(r"^repo_url:\s*(\S+)", config, flags=re.M)
    assert match, "mkdocs.yml has no repo_url"
    assert f'href="{match.group(1)}"' in (site / "index.html").read_text()
    install = html.unescape(re.sub(r"<[^>]+>", "", article(site / "install" / "index.html")))
    assert 'pip install "asyncsync[hf]"' in install
    table = re.findall(r"^\| `(\w+)` \|", (DOCS / "install.md").read_text(), flags=re.M)
    assert table == ["hf", "demo", "megatron", "trio", "metrics", "bench", "docs", "dev"]
    extras = (ROOT / "pyproject.toml").read_text().split("[project.optional-dependencies]")[1]
    assert sorted(table) == sorted(re.findall(r"^(\w+) = \[", extras.split("\n[")[0], re.M))


def test_diagrams_render_with_no_network(site: Path) -> None:
    """Every mermaid diagram becomes an SVG in headless Chromium, with nothing fetched."""
    from _browser import chromium, classes, find_chromium, walk

    binary = find_chromium()
    if binary is None:
        message = "Chromium is not installed (make test installs Debian's chromium)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    pages = {
        page: page.read_text().count('<pre class="mermaid">')
        for page in sorted(site.rglob("*.html"))
        if '<pre class="mermaid">' in page.read_text()
    }
    assert sum(pages.values()) >= 2, "the concept pages' diagrams are gone"
    with chromium(binary) as browser:
        for page, expected in pages.items():
            tab = browser.open(page.as_uri())
            deadline = time.monotonic() + 30
            while True:
                nodes = list(walk(browser.dom(tab)))
                # Material swaps each pre.mermaid for a div.mermaid whose (closed)
                # shadow root holds the rendered SVG.
                rendered = [
                    n
                    for n in nodes
                    if n.get("nodeName") == "DIV"
                    and "mermaid" in classes(n)
                    and any(
                        m.get("nodeName") == "svg"
                        for root in n.get("shadowRoots", ())
                        for m in walk(root)
                    )
                ]
                if len(rendered) == expected or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert len(rendered) == expected, (
                f"{page.relative_to(site)}: {len(rendered)} of {expected} diagrams rendered"
            )
            fetched = [
                u for u in browser.requested_urls(tab) if not u.startswith(("file:", "data:"))
            ]
            assert not fetched, f"{page.relative_to(site)} reached for the network: {fetched}"

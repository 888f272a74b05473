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
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
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


def test_mkdocs_build_strict(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings_handlers.python")
    pytest.importorskip("material")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "site" / "reference" / "aio" / "index.html").exists()

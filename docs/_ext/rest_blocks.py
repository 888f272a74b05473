"""A griffe extension: render reST literal blocks and definitions in docstrings as Markdown.

A docstring may introduce an example the reST way, a paragraph ending in ``::``
followed by an indented block. mkdocstrings renders docstrings as Markdown, where
that shows a literal ``::`` and an unhighlighted block. This turns the ``::`` into
``:`` (a lone ``::`` line disappears) and the indented block into a fenced block:
``python`` when it parses as Python, ``toml`` when it looks like an ini/TOML
table, ``text`` otherwise.

A reST definition (a line, then its text indented under it) would render as a
heading glued to an indented code block; it becomes a bold term and a paragraph.
Google-style sections (``Args:``, a line ending in ``:``) are left to the parser.
Docstrings already in Markdown pass through unchanged.
"""

from __future__ import annotations

import ast
import re
import textwrap
from typing import Any

import griffe

_TABLE = re.compile(r"^\[[\w.\-]+\]$")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _language(code: str) -> str:
    lines = [ln for ln in code.splitlines() if ln.strip()]
    if lines and _TABLE.match(lines[0].strip()):
        return "toml"
    try:
        ast.parse(code)  # parses `await` at top level too, as examples of async APIs have
    except SyntaxError:
        return "text"
    return "python"


def definitions(text: str) -> str:
    """``text`` with each top-level reST definition turned into a bold term and its text."""
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    in_fence = False
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith(("```", "~~~")):
            in_fence = not in_fence
        term = line.strip()
        is_term = (
            not in_fence
            and term
            and _indent(line) == 0
            and not term.endswith(":")
            and not term.startswith(("-", "*", "#", "```", "~~~"))
            and (i == 0 or not lines[i - 1].strip())
            and i + 1 < len(lines)
            and lines[i + 1].strip()
            and _indent(lines[i + 1]) >= 4
        )
        if not is_term:
            out.append(line)
            i += 1
            continue
        j = i + 1
        while j < len(lines) and (not lines[j].strip() or _indent(lines[j]) >= 4):
            j += 1
        while j > i + 1 and not lines[j - 1].strip():
            j -= 1
        out.extend([f"**{term}**", "", textwrap.dedent("\n".join(lines[i + 1 : j]))])
        i = j
    return "\n".join(out)


def convert(text: str) -> str:
    """``text`` with reST definitions and literal blocks in Markdown (see the module)."""
    return literal_blocks(definitions(text))


def literal_blocks(text: str) -> str:
    """``text`` with every reST literal block turned into a fenced code block."""
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    in_fence = False
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith(("```", "~~~")):
            in_fence = not in_fence
        if in_fence or not line.rstrip().endswith("::"):
            out.append(line)
            i += 1
            continue
        base = _indent(line)
        # The block: after blank lines, every line indented deeper than the paragraph.
        j = i + 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        if j >= len(lines) or _indent(lines[j]) <= base:
            out.append(line)  # a `::` with no block after it: not a literal block
            i += 1
            continue
        k = j
        while k < len(lines) and (not lines[k].strip() or _indent(lines[k]) > base):
            k += 1
        while k > j and not lines[k - 1].strip():
            k -= 1  # trailing blank lines stay outside the fence
        code = textwrap.dedent("\n".join(lines[j:k]))
        head = line.rstrip()[:-2].rstrip()
        if head.strip():
            out.append(head + ":")
        out.append("")
        pad = " " * base
        out.append(f"{pad}```{_language(code)}")
        out.extend(f"{pad}{c}" if c.strip() else "" for c in code.splitlines())
        out.append(f"{pad}```")
        i = k
    return "\n".join(out)


class RestLiteralBlocks(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = convert(obj.docstring.value)

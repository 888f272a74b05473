"""A griffe extension: render Sphinx cross-reference roles in docstrings as code.

asyncsync's docstrings name other objects with Sphinx roles (``:class:`~asyncsync.
BucketCache```). mkdocstrings renders docstrings as Markdown, where a role would show
as raw text; this turns each into an inline code span (``~`` keeps the last dotted
component only, as in Sphinx).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|exc|data|mod|obj|const):`(~?)([^`]+)`")


def _replace(match: re.Match[str]) -> str:
    tilde, target = match.groups()
    return f"`{target.rsplit('.', 1)[-1] if tilde else target}`"


class SphinxRoles(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _ROLE.sub(_replace, obj.docstring.value)

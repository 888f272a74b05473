"""The error hierarchy is written once: the classes, their one list of names, and the
tree in the module's docstring agree, and the package re-exports exactly that list."""

from __future__ import annotations

import pickle
import re

import asyncsync
from asyncsync import errors


def _classes() -> dict[str, type[BaseException]]:
    return {
        name: value
        for name, value in vars(errors).items()
        if isinstance(value, type) and issubclass(value, errors.AsyncSyncError)
    }


def _tree() -> dict[str, str | None]:
    """Class -> its parent, as the docstring's tree draws it."""
    doc = errors.__doc__ or ""
    lines = doc[doc.index("```") + 3 : doc.rindex("```")].strip("\n").splitlines()
    parents: dict[str, str | None] = {}
    stack: list[tuple[int, str]] = []
    for line in lines:
        match = re.match(r"^([│ ├└─]*)(\w+)", line)
        assert match, line
        depth, name = len(match.group(1)) // 4, match.group(2)
        while stack and stack[-1][0] >= depth:
            stack.pop()
        parents[name] = stack[-1][1] if stack else None
        stack.append((depth, name))
    return parents


def test_all_lists_every_error_class_once() -> None:
    assert sorted(errors.__all__) == sorted(_classes())
    assert len(set(errors.__all__)) == len(errors.__all__)


def test_the_docstring_tree_is_the_hierarchy() -> None:
    tree = _tree()
    classes = _classes()
    assert set(tree) == set(classes)
    for name, parent in tree.items():
        bases = [
            b.__name__ for b in classes[name].__bases__ if issubclass(b, errors.AsyncSyncError)
        ]
        assert bases == ([parent] if parent else []), (name, bases, parent)


def test_the_package_reexports_every_error() -> None:
    for name in errors.__all__:
        assert getattr(asyncsync, name) is getattr(errors, name)
        assert name in asyncsync.__all__


def test_no_error_quotes_its_message() -> None:
    # KeyError's str() quotes its argument; no error of ours is one.
    for cls in _classes().values():
        assert not issubclass(cls, KeyError), cls
    message = "engine 'e0' is not in the fleet"
    assert str(errors.FleetError(message)) == message


def test_session_errors_keep_their_fields_across_processes() -> None:
    error = errors.SessionTimeoutError("late", session_id="s", step=3, engine="e1", bucket=2)
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is errors.SessionTimeoutError
    assert (back.session_id, back.step, back.engine, back.bucket) == ("s", 3, "e1", 2)

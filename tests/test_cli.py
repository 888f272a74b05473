"""The ``asyncsync`` command line: help, --version, and arguments checked before Ray starts.

The bench's command line (``python -m benchmarks``) is tested in tests/test_bench.py.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest

from asyncsync import cli
from asyncsync.testing import ray_cluster


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("asyncsync has no subcommands")


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the command tries to start or join Ray."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the command reached Ray before its arguments were checked")

    monkeypatch.setattr(ray_cluster, "connect_or_start_ray", refuse)


def test_version_is_the_installed_distributions(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"asyncsync {version('asyncsync')}"


def test_the_library_commands_are_demo_and_status() -> None:
    assert set(subparsers(cli.build_parser())) == {"demo", "status"}


@pytest.mark.parametrize("command", ["demo", "status"])
def test_every_option_says_what_it_does_and_its_default(command: str) -> None:
    parser = subparsers(cli.build_parser())[command]
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert len(options) >= 5
    missing = [a.option_strings[0] for a in options if not a.help or "default" not in a.help]
    assert not missing, f"asyncsync {command}: options without help or default: {missing}"


@pytest.mark.parametrize("argv", [["--help"], ["demo", "--help"]])
def test_help_is_plain_text(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: asyncsync")
    # No reST or Sphinx markup from docstrings, no unformatted defaults.
    for leftover in ("``", ":class:", ":func:", ":mod:", "%(default)", "::"):
        assert leftover not in text, f"{leftover!r} in asyncsync {' '.join(argv)}"


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["demo", "--steps", "0"], "--steps: must be >= 1, got 0"),
        (["demo", "--steps", "three"], "--steps: expected a whole number, got 'three'"),
        (["demo", "--staleness", "-1"], "--staleness: must be >= 0, got -1"),
        (["demo", "--size", "huge"], "--size: invalid choice: 'huge'"),
        (["demo", "--transport", "carrier-pigeon"], "--transport: invalid choice"),
        (["demo", "--out", "/proc/nope"], "--out: cannot write into '/proc/nope'"),
        (["demo", "--frobnicate"], "unrecognized arguments: --frobnicate"),
    ],
)
def test_a_bad_argument_is_one_line_and_exit_code_2_before_ray_starts(
    argv: list[str], says: str, capsys: pytest.CaptureFixture[str], no_ray: None
) -> None:
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"asyncsync {argv[0]}: error: "), lines[0]
    assert says in lines[0]
    assert lines[0].endswith(f"(see asyncsync {argv[0]} --help)")


def test_an_unwritable_out_is_refused_before_anything_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_ray: None
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert cli.main(["demo", "--out", str(blocker / "out")]) == 2
    assert "--out: cannot write into" in capsys.readouterr().err


def test_the_parser_knows_the_demos_choices_without_importing_it() -> None:
    from asyncsync import demo

    options = {a.dest: a for a in subparsers(cli.build_parser())["demo"]._actions}
    assert tuple(options["size"].choices or ()) == cli.DEMO_SIZES
    assert set(cli.DEMO_SIZES) == set(demo.SIZES)
    assert tuple(options["transport"].choices or ()) == cli.DEMO_TRANSPORTS
    assert set(cli.DEMO_TRANSPORTS) == set(demo.TRANSPORTS)


@pytest.mark.parametrize(
    "argv", [["--version"], ["--help"], ["demo", "--help"], ["status", "--help"]]
)
def test_help_and_version_import_neither_torch_nor_ray(argv: list[str]) -> None:
    probe = (
        "import sys\n"
        "from asyncsync import cli\n"
        f"code = cli.main({argv!r})\n"
        "heavy = sorted({'torch', 'ray', 'matplotlib', 'transformers'} & set(sys.modules))\n"
        "print(code, heavy, file=sys.stderr)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120
    )
    assert done.stderr.strip().splitlines()[-1] == "0 []", done.stderr

"""The ``asyncsync`` command line: help, --version, and arguments checked before Ray starts."""

from __future__ import annotations

import argparse
import re
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest

from asyncsync import cli
from asyncsync.bench import BenchConfig, run_bench
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


@pytest.mark.parametrize("command", ["demo", "bench"])
def test_every_option_says_what_it_does_and_its_default(command: str) -> None:
    parser = subparsers(cli.build_parser())[command]
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert len(options) >= 5
    missing = [a.option_strings[0] for a in options if not a.help or "default" not in a.help]
    assert not missing, f"asyncsync {command}: options without help or default: {missing}"


@pytest.mark.parametrize("argv", [["--help"], ["demo", "--help"], ["bench", "--help"]])
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
        (["bench", "--sizes", "12XB"], "--sizes: cannot read size '12XB'"),
        (["bench", "--bucket", "0"], "--bucket: size must be positive"),
        (["bench", "--engines", "1,0"], "--engines: must be >= 1, got 0"),
        (["bench", "--steps", "0"], "--steps: must be >= 1, got 0"),
        (["bench", "--transports", "carrier-pigeon"], "unknown transport 'carrier-pigeon'"),
        (["bench", "--train-gflop", "-1"], "--train-gflop: must be > 0"),
        (["bench", "--address", "auto", "--num-cpus", "2"], "not with --address"),
        (["bench", "--frobnicate"], "unrecognized arguments: --frobnicate"),
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


def test_bench_publishes_into_the_repository_only_when_asked() -> None:
    bench = subparsers(cli.build_parser())["bench"]
    assert bench.parse_args([]).publish is False
    assert bench.parse_args(["--publish"]).publish is True
    assert bench.parse_args(["--no-publish"]).publish is False
    # The documented way to refresh BENCHMARKS.md publishes.
    makefile = Path(__file__).resolve().parent.parent / "Makefile"
    recipe = re.search(r"^bench:.*\n((?:\t.*\n)+)", makefile.read_text(), re.M)
    assert recipe is not None and "asyncsync bench --publish" in recipe.group(1)


async def test_bench_reports_progress_inside_each_configuration(ray_local: Any) -> None:
    calls: list[tuple[str, int, int]] = []
    config = BenchConfig(
        sizes=(1 << 20,),
        engines=(1,),
        steps=2,
        warmup=1,
        transports=("shm",),
        baseline=False,
        limit_bytes=1 << 20,
        profile=False,
    )
    result = await run_bench(config, progress=lambda *call: calls.append(call))
    assert result.ok, (result.failures, [r.error for r in result.runs])
    assert [(done, total) for _, done, total in calls] == [(0, 3), (1, 3), (2, 3), (3, 3)]
    labels = {label for label, _, _ in calls}
    assert len(labels) == 1 and re.fullmatch(r"\[1/1\] .+ x1 asyncsync/shm", labels.pop())

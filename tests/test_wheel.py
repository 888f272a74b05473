"""The wheel a user installs: what it carries, and that it works without the source tree.

Built offline from a copy of the sources (the checkout is left untouched),
then installed with ``--no-deps`` into a fresh virtual environment that sees the
dependencies through a path entry but not the editable checkout, and used from a
directory outside the repository.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"{args}:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    # The bench and the suite beside the package, as in a checkout, so that the
    # wheel's package selection (not this copy) is what keeps them out.
    for tree in ("asyncsync", "benchmarks", "tests"):
        shutil.copytree(ROOT / tree, src / tree, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("dist")
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--quiet",
            "--wheel-dir",
            str(out),
            str(src),
        ],
        cwd=src,
    )
    (built,) = out.glob("asyncsync-*.whl")
    return built


def test_the_wheel_carries_types_the_plugin_and_the_command(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        entries = zf.read(entry_points).decode()
    assert "asyncsync/py.typed" in names
    for package in ("convert", "engines", "testing", "transport"):
        assert f"asyncsync/{package}/__init__.py" in names
    # The library only: the bench (benchmarks/) and the suite's tools (tests/gpu_check.py)
    # stay in the repository.
    assert not any(n.startswith(("tests/", "docs/", "examples/", "benchmarks/")) for n in names)
    assert not [n for n in names if "bench" in n or "gpu_check" in n]
    sections = _ini_sections(entries)
    assert sections["pytest11"] == {"asyncsync": "asyncsync.testing.pytest_plugin"}
    assert sections["console_scripts"] == {"asyncsync": "asyncsync.cli:main"}


def _ini_sections(text: str) -> dict[str, dict[str, str]]:
    sections: dict[str, dict[str, str]] = {}
    current: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
        elif "=" in line:
            key, value = (part.strip() for part in line.split("=", 1))
            current[key] = value
    return sections


def test_the_installed_wheel_works_outside_the_checkout(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path)
    python = venv / "bin" / "python"
    site = run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        cwd=tmp_path,
    ).stdout.strip()
    # The dependencies, through a plain path entry: the .pth files there (the
    # editable checkout's finder among them) are not processed.
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--no-deps",
            "--no-index",
            "--quiet",
            str(wheel),
        ],
        cwd=tmp_path,
    )
    probe = run(
        [
            str(python),
            "-c",
            "import asyncsync, asyncsync.testing.pytest_plugin, asyncsync.cli\n"
            "from importlib.metadata import distribution\n"
            "print(asyncsync.__file__)\n"
            "print(distribution('asyncsync').locate_file(''))\n"
            "from asyncsync import BucketCache, WeightSyncActor, train_actor\n",
        ],
        cwd=tmp_path,
    ).stdout.splitlines()
    assert Path(probe[0]).is_relative_to(venv), f"imported {probe[0]}, not the installed wheel"
    assert not Path(probe[0]).is_relative_to(ROOT)
    assert Path(probe[1]).is_relative_to(venv), f"metadata of {probe[1]}, not the wheel's"
    version = run([str(venv / "bin" / "asyncsync"), "--version"], cwd=tmp_path).stdout
    assert version.startswith("asyncsync ")

"""The pytest plugin, tested by running small suites with pytester.

The suite that needs Ray runs once, in a subprocess with its own local Ray (a
pytest session cannot share this session's Ray), and each test below checks one
of its outcomes. Suites that need no Ray run in-process.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Any

import pytest

from asyncsync.testing import LoopLagProbe

pytest_plugins = ["pytester"]

INI = """
[pytest]
asyncio_mode = auto
asyncio_default_fixture_loop_scope = session
asyncio_default_test_loop_scope = session
asyncsync_ray_num_cpus = 2
timeout = 240
"""

# Blocks are 300 ms against a 100 ms threshold: a wide margin on a loaded machine.
GUARDED_SUITE = """
import asyncio
import time

import anyio
import pytest
import ray

from asyncsync import aio
from asyncsync.testing import LoopLagMixin


class Probed(LoopLagMixin):
    async def block(self, seconds: float) -> None:
        time.sleep(seconds)  # noqa: ASYNC251 - the blocking call the guard must catch

    async def off_loop(self, seconds: float) -> None:
        await asyncio.to_thread(time.sleep, seconds)

    async def ping(self) -> int:
        return 1


@pytest.fixture(scope="module")
def shared(ray_local):
    # One actor for most tests (an actor start costs seconds); each test's
    # watch() opens a new measurement window on it.
    actor = ray.remote(Probed).options(num_cpus=0, max_concurrency=32).remote()
    yield actor
    ray.kill(actor)


@pytest.mark.max_loop_lag(100)
async def test_factory_actors_are_watched(actor_factory):
    actor = actor_factory(ray.remote(Probed).options(num_cpus=0, max_concurrency=4))
    await actor.ping.remote()
    await actor.block.remote(0.3)


@pytest.mark.max_loop_lag(100)
async def test_marker_catches_a_blocked_loop(shared, loop_lag_guard):
    await loop_lag_guard.watch(shared)
    await shared.block.remote(0.3)


async def test_ini_threshold_catches_a_blocked_loop(shared, loop_lag_guard):
    await loop_lag_guard.watch(shared)
    await shared.block.remote(0.3)


@pytest.mark.max_loop_lag(100)
async def test_work_off_the_loop_passes(shared, loop_lag_guard):
    await loop_lag_guard.watch(shared)
    await asyncio.gather(shared.off_loop.remote(0.3), *[shared.ping.remote() for _ in range(20)])


@pytest.mark.max_loop_lag(2000)
async def test_block_under_a_wide_threshold_passes(shared, loop_lag_guard):
    await loop_lag_guard.watch(shared)
    await shared.block.remote(0.3)


async def test_without_guard_nothing_is_checked(shared):
    await shared.block.remote(0.3)


@pytest.mark.max_loop_lag(100)
async def test_guard_that_watched_nothing_fails():
    pass


@pytest.mark.max_loop_lag(100)
async def test_a_failing_body_reports_its_own_error(shared, loop_lag_guard):
    await loop_lag_guard.watch(shared)
    await shared.block.remote(0.3)
    raise AssertionError("the body's own failure")


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_trio_driver_under_the_guard(shared, loop_lag_guard, anyio_backend):
    import trio

    trio.lowlevel.current_trio_token()  # this body really runs on trio
    await loop_lag_guard.watch(shared)
    await aio.get(shared.block.remote(0.3))


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_trio_driver_passes_when_the_loop_is_free(shared, loop_lag_guard, anyio_backend):
    await loop_lag_guard.watch(shared)
    async with anyio.create_task_group() as group:
        group.start_soon(aio.get, shared.off_loop.remote(0.3))
        for _ in range(10):
            await aio.get(shared.ping.remote())


@pytest.mark.gpu
def test_gpu_only():
    pass


def test_ray_cluster_is_refused_next_to_ray_local(ray_local, request):
    with pytest.raises(pytest.UsageError, match="one Ray per process"):
        request.getfixturevalue("ray_cluster")
"""


@dataclass(frozen=True)
class Outcome:
    status: str  # passed, failed, error, skipped
    message: str


def outcomes(junit_xml: str) -> dict[str, Outcome]:
    """Per-test outcome of a junit-xml report, by test name."""
    out: dict[str, Outcome] = {}
    for case in ET.parse(junit_xml).getroot().iter("testcase"):
        status, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                status = {"failure": "failed"}.get(child.tag, child.tag)
                message = f"{child.get('message', '')}\n{child.text or ''}"
        out[case.get("name", "")] = Outcome(status, message)
    return out


@pytest.fixture(scope="module")
def guarded_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Outcome]:
    """Run GUARDED_SUITE once in a subprocess (its own local Ray)."""
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("guarded")
    (root / "pytest.ini").write_text(INI)
    (root / "test_guarded.py").write_text(GUARDED_SUITE)
    report = root / "report.xml"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", f"--junitxml={report}", "-q"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if not report.exists():
        pytest.fail(
            f"inner run wrote no report (rc={proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return outcomes(str(report))


def test_the_inner_suite_ran_completely(guarded_run: dict[str, Outcome]) -> None:
    assert len(guarded_run) == 12, sorted(guarded_run)


@pytest.mark.parametrize(
    "name",
    [
        "test_factory_actors_are_watched",
        "test_marker_catches_a_blocked_loop",
        "test_ini_threshold_catches_a_blocked_loop",
        "test_trio_driver_under_the_guard[trio]",
    ],
)
def test_a_300_ms_block_fails_the_test(guarded_run: dict[str, Outcome], name: str) -> None:
    outcome = guarded_run[name]
    assert outcome.status == "failed", outcome
    assert "loop_lag_guard:" in outcome.message
    assert "event loop blocked for" in outcome.message
    assert "over the 100 ms allowed" in outcome.message
    assert "asyncio.to_thread" in outcome.message  # says what to do


def test_the_failure_names_the_actor_and_the_threshold_source(
    guarded_run: dict[str, Outcome],
) -> None:
    by_marker = guarded_run["test_marker_catches_a_blocked_loop"].message
    assert "Actor(Probed," in by_marker
    assert "@pytest.mark.max_loop_lag(100)" in by_marker
    by_ini = guarded_run["test_ini_threshold_catches_a_blocked_loop"].message
    assert "asyncsync_max_loop_lag_ms = 100" in by_ini


def test_the_measured_lag_is_about_the_block(guarded_run: dict[str, Outcome]) -> None:
    message = guarded_run["test_marker_catches_a_blocked_loop"].message
    ms = float(message.split("event loop blocked for ")[1].split(" ms")[0])
    assert 250 <= ms < 5000, ms


@pytest.mark.parametrize(
    "name",
    [
        "test_work_off_the_loop_passes",
        "test_block_under_a_wide_threshold_passes",
        "test_without_guard_nothing_is_checked",
        "test_trio_driver_passes_when_the_loop_is_free[trio]",
    ],
)
def test_a_free_loop_passes(guarded_run: dict[str, Outcome], name: str) -> None:
    assert guarded_run[name].status == "passed", guarded_run[name]


def test_a_guard_that_watched_nothing_fails(guarded_run: dict[str, Outcome]) -> None:
    outcome = guarded_run["test_guard_that_watched_nothing_fails"]
    assert outcome.status == "failed"
    assert "watched no actor" in outcome.message
    assert "LoopLagMixin" in outcome.message


def test_a_failing_body_keeps_its_own_error(guarded_run: dict[str, Outcome]) -> None:
    outcome = guarded_run["test_a_failing_body_reports_its_own_error"]
    assert outcome.status == "failed"
    assert "the body's own failure" in outcome.message
    assert "event loop blocked for" not in outcome.message


def test_one_ray_per_process(guarded_run: dict[str, Outcome]) -> None:
    # ray_cluster next to ray_local fails with a usage error before starting anything.
    outcome = guarded_run["test_ray_cluster_is_refused_next_to_ray_local"]
    assert outcome.status == "passed", outcome


def test_gpu_marker_skips_without_cuda(guarded_run: dict[str, Outcome]) -> None:
    import torch

    outcome = guarded_run["test_gpu_only"]
    if torch.cuda.is_available():
        assert outcome.status == "passed"
    else:
        assert outcome.status == "skipped"
        assert "CUDA" in outcome.message


# ----------------------------------------------------------------------- no Ray needed


def test_max_loop_lag_needs_one_positive_number(pytester: pytest.Pytester) -> None:
    pytester.makeini(INI)
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.max_loop_lag("fast")
        def test_bad():
            pass
        """
    )
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*max_loop_lag(ms) with one number of milliseconds*"])


def test_anyio_tests_run_on_their_backend_in_asyncio_auto_mode(pytester: pytest.Pytester) -> None:
    pytester.makeini(INI)
    pytester.makepyfile(
        """
        import asyncio

        import pytest

        @pytest.fixture(params=["asyncio", "trio"])
        def anyio_backend(request):
            return request.param

        @pytest.fixture
        async def fixture_backend():
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                return "trio"
            return "asyncio"

        @pytest.mark.anyio
        async def test_backend(anyio_backend, fixture_backend):
            assert fixture_backend == anyio_backend
            if anyio_backend == "trio":
                import trio
                trio.lowlevel.current_trio_token()
            else:
                asyncio.get_running_loop()

        @pytest.mark.anyio
        @pytest.mark.asyncio
        async def test_explicit_asyncio_marker_stays_with_pytest_asyncio(anyio_backend):
            asyncio.get_running_loop()

        async def test_unmarked_async_test_stays_with_pytest_asyncio():
            asyncio.get_running_loop()
        """
    )
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-v")
    result.assert_outcomes(passed=5)
    result.stdout.fnmatch_lines(["*test_backend?trio? PASSED*"])


def test_marker_adds_the_guard_fixture(pytester: pytest.Pytester) -> None:
    pytester.makeini(INI)
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.max_loop_lag(50)
        def test_uses_guard(request):
            assert "loop_lag_guard" in request.fixturenames
        """
    )
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "--setup-plan")
    result.stdout.fnmatch_lines(["*SETUP    F loop_lag_guard*"])


# ----------------------------------------------------------------------- the probe itself


def test_probe_sees_a_block_on_its_own_loop() -> None:
    import asyncio
    import time

    async def main() -> Any:
        probe = LoopLagProbe(interval_s=0.005)
        probe.start()
        await asyncio.sleep(0.05)
        quiet = probe.report(reset=True)
        time.sleep(0.3)  # noqa: ASYNC251 - blocks this loop on purpose
        # Read before the probe task ran again: the lateness pending now counts.
        pending = probe.report()
        await asyncio.sleep(0.02)
        final = await probe.stop()
        return quiet, pending, final

    quiet, pending, final = asyncio.run(main())
    assert quiet.max_lag_s < 0.25
    assert quiet.samples > 0
    assert pending.max_lag_s >= 0.29
    assert final.max_lag_s >= 0.29
    assert not final.running


def test_probe_refuses_a_second_loop() -> None:
    import asyncio

    probe = LoopLagProbe()

    async def start() -> None:
        probe.start()

    asyncio.run(start())
    with pytest.raises(RuntimeError, match="another event loop"):
        asyncio.run(start())

"""asyncsync.aio on both anyio backends, against a real async actor on the shared local Ray."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import anyio
import psutil
import pytest
import ray

from asyncsync import aio

# anyio's plugin runs these tests; asyncsync's plugin keeps pytest-asyncio's auto
# mode from claiming them, so the trio variants really run on trio.
pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class Worker:
    """An async actor whose calls can be held open and cancelled."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.waiting = 0
        self.cancelled = 0
        self.finished = 0

    async def reset(self) -> None:
        if self.waiting:
            raise AssertionError(f"{self.waiting} calls of an earlier test still wait")
        self.release = asyncio.Event()
        self.waiting = self.cancelled = self.finished = 0

    async def echo(self, value: Any, delay_s: float = 0.0) -> Any:
        await asyncio.sleep(delay_s)
        return value

    async def fail(self, message: str) -> None:
        raise ValueError(message)

    async def hold(self) -> str:
        """Wait until ``open_gate``; count how the wait ended."""
        self.waiting += 1
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.waiting -= 1
        self.finished += 1
        return "released"

    async def open_gate(self) -> None:
        self.release.set()

    async def counters(self) -> dict[str, int]:
        return {"waiting": self.waiting, "cancelled": self.cancelled, "finished": self.finished}


@pytest.fixture(scope="module")
def shared_worker(ray_local: Any) -> Iterator[Any]:
    # One actor for the module: starting an actor's worker process costs seconds.
    handle = ray.remote(Worker).options(num_cpus=0, max_concurrency=512).remote()
    yield handle
    ray.kill(handle, no_restart=True)


@pytest.fixture
def worker(shared_worker: Any) -> Any:
    ray.get(shared_worker.reset.remote(), timeout=60)  # a sync fixture: no loop to block
    return shared_worker


async def wait_until(worker: Any, key: str, value: int, timeout_s: float = 30.0) -> None:
    """Poll the actor until ``counters()[key] == value`` (a generous bound, not a timing assert)."""
    with anyio.fail_after(timeout_s):
        while (await aio.get(worker.counters.remote()))[key] != value:
            await anyio.sleep(0.01)


async def test_runs_on_the_backend_it_names(anyio_backend: str) -> None:
    if anyio_backend == "trio":
        import trio

        trio.lowlevel.current_trio_token()  # raises unless trio runs this test
        with pytest.raises(RuntimeError):
            asyncio.get_running_loop()
    else:
        asyncio.get_running_loop()


async def test_get_returns_the_value(worker: Any) -> None:
    assert await aio.get(worker.echo.remote({"step": 3})) == {"step": 3}
    # A ref whose value is already there is still awaited through a checkpoint.
    ref = worker.echo.remote(7)
    assert await aio.get(ref) == 7
    assert await aio.get(ref) == 7


async def test_get_reraises_the_remote_error_as_its_own_class(worker: Any) -> None:
    with pytest.raises(ValueError, match="bad bucket 3") as info:
        await aio.get(worker.fail.remote("bad bucket 3"))
    assert isinstance(info.value, ray.exceptions.RayTaskError)


async def test_get_refuses_non_refs() -> None:
    with pytest.raises(TypeError, match=r"ray\.ObjectRef"):
        await aio.get(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"ray\.ObjectRef"):
        await aio.gather(3)  # type: ignore[arg-type]


async def test_gather_keeps_argument_order(worker: Any) -> None:
    # Later arguments finish first; results still come back in argument order.
    refs = [worker.echo.remote(i, 0.05 * (5 - i)) for i in range(6)]
    assert await aio.gather(*refs) == list(range(6))
    assert await aio.gather() == []


async def test_gather_raises_the_first_failure_and_cancels_the_rest(worker: Any) -> None:
    held = [worker.hold.remote() for _ in range(3)]
    await wait_until(worker, "waiting", 3)
    with pytest.raises(ValueError, match="engine 2 refused"):
        await aio.gather(*held, worker.fail.remote("engine 2 refused"))
    await wait_until(worker, "cancelled", 3)
    assert (await aio.get(worker.counters.remote()))["finished"] == 0


async def test_cancelled_wait_cancels_the_running_remote_call(worker: Any) -> None:
    ref = worker.hold.remote()
    await wait_until(worker, "waiting", 1)
    with anyio.move_on_after(0.1) as scope:
        await aio.get(ref)
    assert scope.cancelled_caught
    await wait_until(worker, "cancelled", 1)
    await wait_until(worker, "waiting", 0)
    with pytest.raises(ray.exceptions.TaskCancelledError):
        await aio.get(ref)


async def test_cancel_wait_returns_after_the_remote_call_ended(worker: Any) -> None:
    ref = worker.hold.remote()
    await wait_until(worker, "waiting", 1)
    with anyio.move_on_after(0.1):
        await aio.get(ref, cancel_wait_s=30)
    # No polling: the remote method has already run its cancellation handling.
    counters = await aio.get(worker.counters.remote())
    assert counters == {"waiting": 0, "cancelled": 1, "finished": 0}


async def test_cancelled_wait_cancels_a_queued_remote_call(actor_factory: Any) -> None:
    # max_concurrency=1: the second call queues behind the first and never starts.
    worker = actor_factory(ray.remote(Worker).options(num_cpus=0, max_concurrency=1))
    # The actor must be up before the 0.2 s below start: a cancel that Ray gets before
    # the actor exists does not reach the queued call (seen under load, and once on a
    # quiet machine whose worker took longer than 0.2 s to start).
    assert await aio.get(worker.echo.remote("up")) == "up"
    first = worker.hold.remote()
    queued = worker.echo.remote("never")
    with anyio.move_on_after(0.2):
        await aio.get(queued)
    ray.cancel(first)
    with pytest.raises(ray.exceptions.TaskCancelledError):
        await aio.get(queued)


async def test_deadline_raises_timeout_and_cancels(worker: Any) -> None:
    ref = worker.hold.remote()
    await wait_until(worker, "waiting", 1)
    with pytest.raises(TimeoutError):
        with anyio.fail_after(0.1):
            await aio.get(ref)
    await wait_until(worker, "cancelled", 1)


async def test_cancel_false_only_stops_waiting(worker: Any) -> None:
    ref = worker.hold.remote()
    await wait_until(worker, "waiting", 1)
    with anyio.move_on_after(0.1):
        await aio.get(ref, cancel=False)
    await anyio.sleep(0.2)  # would a cancel request arrive, it would have by now
    assert (await aio.get(worker.counters.remote()))["waiting"] == 1
    await aio.get(worker.open_gate.remote())
    assert await aio.get(ref) == "released"
    counters = await aio.get(worker.counters.remote())
    assert counters == {"waiting": 0, "cancelled": 0, "finished": 1}


async def test_no_thread_per_waiting_call(worker: Any) -> None:
    await aio.get(worker.echo.remote(0))  # Ray's client threads exist from here on
    process = psutil.Process()
    before = process.num_threads()
    calls = 200
    results: list[Any] = []

    async def wait_all() -> None:
        results.extend(await aio.gather(*[worker.hold.remote() for _ in range(calls)]))

    async with anyio.create_task_group() as group:
        group.start_soon(wait_all)
        await wait_until(worker, "waiting", calls)
        during = process.num_threads()
        await aio.get(worker.open_gate.remote())
    assert results == ["released"] * calls
    # A thread per call would add ~200 (or anyio's 40-thread limiter's worth).
    assert during - before < 10, (before, during)


async def test_many_calls_overlap(worker: Any) -> None:
    # 100 calls of 0.2 s each: sequential waiting would take 20 s.
    start = time.monotonic()
    assert await aio.gather(*[worker.echo.remote(i, 0.2) for i in range(100)]) == list(range(100))
    assert time.monotonic() - start < 10


async def test_outside_an_event_loop_is_an_error(worker: Any) -> None:
    ref = worker.echo.remote(1)

    def no_loop() -> None:
        coro = aio.get(ref)
        try:
            coro.send(None)
        finally:
            coro.close()

    with pytest.raises(RuntimeError, match="asyncio or trio"):
        await anyio.to_thread.run_sync(no_loop)
    assert await aio.get(ref) == 1

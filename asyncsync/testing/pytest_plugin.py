"""pytest plugin for async Ray suites: a shared local Ray, actors, a loop-lag guard, markers.

Registered through the ``pytest11`` entry point, so ``pip install asyncsync`` makes
everything here available to any pytest suite; nothing needs importing.

## Fixtures

- ``ray_local``: one local Ray for the whole session (see
  :func:`~asyncsync.testing.local_ray`); synchronous, session-scoped.
- ``ray_cluster``: a multi-node Ray on this machine for the whole session (a
  :class:`~asyncsync.testing.LocalCluster`); it cannot share a pytest process with
  ``ray_local``.
- ``actor_factory``: ``make(actor_class, *args, **kwargs)`` -> handle; every actor
  it made is killed at teardown (an :class:`ActorFactory`); on ``ray_cluster`` when
  the test uses it, else on ``ray_local``.
- ``loop_lag_guard``: fails the test if the event loop of a watched actor was
  blocked longer than allowed (a :class:`LoopLagGuard`).

## Markers

- ``gpu``: needs a CUDA device; skipped cleanly without one.
- ``max_loop_lag(ms)``: use ``loop_lag_guard`` with this threshold (milliseconds).

## ini options

- ``asyncsync_ray_num_cpus``, ``asyncsync_object_store_bytes``: size of ``ray_local``.
- ``asyncsync_cluster_workers`` (3), ``asyncsync_cluster_object_store_bytes`` (per
  node), ``asyncsync_cluster_cpus_per_node`` (1): shape of ``ray_cluster``.
- ``asyncsync_max_loop_lag_ms``: default threshold of ``loop_lag_guard`` (100).

## The loop-lag guard

The guard measures the loop *inside* each watched actor with a
:class:`~asyncsync.testing.LoopLagProbe`; the actor class inherits
:class:`~asyncsync.testing.LoopLagMixin`. Actors that ``actor_factory`` makes
while the guard is active are watched from their first call on; watch others
with ``await loop_lag_guard.watch(handle)``. Right after the test body returns
(still in the test's *call* phase, so the test is reported as FAILED), the
guard reads every probe and fails the test naming each actor whose loop lag
exceeded the threshold, or that did not answer within
``LoopLagGuard.report_timeout_s``. A guard that watched no actor fails too: it
would otherwise pass while checking nothing. Actors that died are skipped.
Keep thresholds wide (a 100 ms threshold against blocks of 300 ms or more):
scheduling noise on a loaded machine reaches tens of milliseconds.

## Event-loop scopes with pytest-asyncio 1.x

``ray_local`` is a *synchronous* session fixture, so it works with every loop
scope, and actor handles are not bound to any event loop: an actor created
in one test can be awaited from a test running on another loop. What is
bound to a loop is asyncio state: ``asyncio.Event``, ``Lock``, ``Queue``,
tasks. An async fixture that creates such objects must run on the same loop
as the tests using them, so give it a ``loop_scope`` at least as wide as
its ``scope``, and the tests the same ``loop_scope``:

```toml
[tool.pytest.ini_options]
asyncio_mode = "auto"
asyncio_default_fixture_loop_scope = "session"   # async fixtures
asyncio_default_test_loop_scope = "session"      # async tests
```

or per item: ``@pytest_asyncio.fixture(scope="module", loop_scope="module")``
and ``pytestmark = pytest.mark.asyncio(loop_scope="module")``. pytest-asyncio
1.x removed the ``event_loop`` fixture; set loop scopes instead of overriding it.
A session loop scope is the cheapest choice for Ray suites (one loop, shared
async fixtures); function scope isolates tests best.

## anyio and trio tests under pytest-asyncio's auto mode

In auto mode pytest-asyncio claims *every* ``async def`` test, including
``@pytest.mark.anyio`` ones, and runs them on its asyncio loop: a test
parametrized with ``anyio_backend = "trio"`` would silently run on asyncio.
This plugin hands such tests back to anyio's plugin at collection time
(unless they also carry an explicit ``asyncio`` marker), so each runs on the
backend it names; the function-scoped async fixtures they request run on that
backend too. Tests without the ``anyio`` marker stay with pytest-asyncio.
"""

from __future__ import annotations

import sys
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from .cluster import DEFAULT_NODE_OBJECT_STORE_BYTES, LocalCluster, local_cluster
from .ray_cluster import local_ray

__all__ = ["ActorFactory", "LoopLagGuard"]

DEFAULT_MAX_LOOP_LAG_MS = 100.0


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        "asyncsync_ray_num_cpus",
        "CPUs the session-scoped local Ray advertises (default: the machine's cores)",
        default="",
    )
    parser.addini(
        "asyncsync_object_store_bytes",
        "object store size of the session-scoped local Ray (default: Ray's)",
        default="",
    )
    parser.addini(
        "asyncsync_cluster_workers",
        "worker nodes of the session-scoped ray_cluster, besides the head",
        default="3",
    )
    parser.addini(
        "asyncsync_cluster_object_store_bytes",
        "object store size of each ray_cluster node",
        default=str(DEFAULT_NODE_OBJECT_STORE_BYTES),
    )
    parser.addini(
        "asyncsync_cluster_cpus_per_node",
        "CPUs each ray_cluster node advertises",
        default="1",
    )
    parser.addini(
        "asyncsync_max_loop_lag_ms",
        "loop_lag_guard's threshold in milliseconds when no max_loop_lag marker sets one",
        default=str(DEFAULT_MAX_LOOP_LAG_MS),
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped cleanly without one")
    config.addinivalue_line(
        "markers",
        "max_loop_lag(ms): fail the test if a watched actor's event loop was blocked "
        "longer than ms milliseconds (uses the loop_lag_guard fixture)",
    )


def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    _give_anyio_tests_back(items)
    for item in items:
        marker = item.get_closest_marker("max_loop_lag")
        if marker is not None:
            _max_lag_ms(marker, item.nodeid)  # a bad argument fails collection, not the run
            if isinstance(item, pytest.Function) and "loop_lag_guard" not in item.fixturenames:
                # The marker implies the fixture; pytest resolves appended names at setup.
                item.fixturenames.append("loop_lag_guard")
    _skip_gpu_tests_without_cuda(items)


def _skip_gpu_tests_without_cuda(items: list[pytest.Item]) -> None:
    if not any(item.get_closest_marker("gpu") for item in items):
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none is available")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


def _give_anyio_tests_back(items: list[pytest.Item]) -> None:
    """Turn anyio-marked tests that pytest-asyncio's auto mode claimed back into plain tests.

    pytest-asyncio replaces the collected item with its own class and adds an
    ``asyncio`` marker; anyio's plugin then never sees a coroutine to run. The
    rebuilt item is what pytest would have collected without pytest-asyncio.
    """
    try:
        from pytest_asyncio.plugin import PytestAsyncioFunction
    except ImportError:
        return
    for i, item in enumerate(items):
        if not isinstance(item, PytestAsyncioFunction) or item.get_closest_marker("anyio") is None:
            continue
        if _has_explicit_asyncio_marker(item):
            continue
        plain = pytest.Function.from_parent(
            item.parent,
            name=item.name,
            callspec=getattr(item, "callspec", None),
            callobj=item.obj,
            # The fixture closure, including anyio_backend, is the one already resolved.
            fixtureinfo=item._fixtureinfo,
            keywords={key: item.keywords[key] for key in item.keywords if key != "asyncio"},
            originalname=item.originalname,
        )
        plain.own_markers = [m for m in item.own_markers if m.name != "asyncio"]
        items[i] = plain


def _has_explicit_asyncio_marker(item: pytest.Function) -> bool:
    own = getattr(item.function, "pytestmark", [])
    if any(m.name == "asyncio" for m in own):
        return True
    return any(m.name == "asyncio" for node in item.listchain()[:-1] for m in node.own_markers)


# --------------------------------------------------------------------- Ray


_SESSION_RAY = pytest.StashKey[str]()


def _one_ray_per_process(config: pytest.Config, fixture: str) -> None:
    # Ray connects a process to one cluster: a session cannot hold both fixtures.
    other = config.stash.get(_SESSION_RAY, fixture)
    if other != fixture:
        raise pytest.UsageError(
            f"{fixture} and {other} cannot be used in one pytest process (one Ray per "
            "process): run the multi-node tests in a pytest run of their own "
            "(asyncsync's own suite: pytest tests/multinode)"
        )
    config.stash[_SESSION_RAY] = fixture


def _test_dirs(config: pytest.Config) -> list[str]:
    # Actor classes defined in test modules are pickled by reference: give the
    # workers the test directories pytest put on sys.path.
    root = config.rootpath.resolve()
    return [p for p in sys.path if p and Path(p).resolve().is_relative_to(root)]


@pytest.fixture(scope="session")
def ray_local(pytestconfig: pytest.Config) -> Iterator[dict[str, Any]]:
    """One local Ray for the whole test session (a start/stop costs seconds).

    Yields ``{"address": ..., "temp_dir": ...}``. Actor classes defined in test
    modules are importable by the workers (the test directories are put on their
    ``PYTHONPATH``).
    """
    _one_ray_per_process(pytestconfig, "ray_local")
    cpus = str(pytestconfig.getini("asyncsync_ray_num_cpus") or "")
    store = str(pytestconfig.getini("asyncsync_object_store_bytes") or "")
    with local_ray(
        num_cpus=int(cpus) if cpus else None,
        object_store_memory=int(store) if store else None,
        pythonpath=_test_dirs(pytestconfig),
    ) as info:
        yield info


@pytest.fixture(scope="session")
def ray_cluster(pytestconfig: pytest.Config) -> Iterator[LocalCluster]:
    """A multi-node Ray on this machine for the whole session (see :func:`local_cluster`).

    A head and ``asyncsync_cluster_workers`` worker nodes (default 3), each with its
    own raylet and object store; the driver runs on the head. Place actors with
    ``.options(**ray_cluster.placement(i))``. Cannot share a pytest process with
    ``ray_local``. Tests that change the cluster's shape (``add_node``,
    ``remove_node``) restore it before they end.
    """
    _one_ray_per_process(pytestconfig, "ray_cluster")
    workers = int(str(pytestconfig.getini("asyncsync_cluster_workers")))
    store = int(str(pytestconfig.getini("asyncsync_cluster_object_store_bytes")))
    cpus = int(str(pytestconfig.getini("asyncsync_cluster_cpus_per_node")))
    with local_cluster(
        workers,
        object_store_memory=store,
        num_cpus_per_node=cpus,
        pythonpath=_test_dirs(pytestconfig),
    ) as cluster:
        yield cluster


class ActorFactory:
    """``make(actor_class, *args, **kwargs)`` creates an actor; all are killed at teardown.

    ``actor_class`` is a Ray actor class (``ray.remote(...)`` applied, options
    set). While a :class:`LoopLagGuard` is active for the test, actors whose
    class has the :class:`~asyncsync.testing.LoopLagMixin` methods are watched
    from their first call on.
    """

    def __init__(self) -> None:
        self.made: list[Any] = []
        self.guard: LoopLagGuard | None = None

    def __call__(self, actor_class: Any, *args: Any, **kwargs: Any) -> Any:
        handle = actor_class.remote(*args, **kwargs)
        self.made.append(handle)
        if self.guard is not None and _has_probe(handle):
            self.guard.watch_nowait(handle)
        return handle

    def kill_all(self) -> None:
        import ray

        for handle in self.made:
            ray.kill(handle, no_restart=True)
        self.made.clear()


@pytest.fixture
def actor_factory(request: pytest.FixtureRequest) -> Iterator[ActorFactory]:
    """``make(actor_class, *args, **kwargs)`` creates an actor that is killed at teardown.

    On the session's Ray: ``ray_cluster`` if the test uses it, else ``ray_local``.
    """
    request.getfixturevalue("ray_cluster" if "ray_cluster" in request.fixturenames else "ray_local")
    factory = ActorFactory()
    yield factory
    factory.kill_all()


# --------------------------------------------------------------------- loop-lag guard


def _has_probe(handle: Any) -> bool:
    # An actor handle exposes exactly the remote methods of its class: asking for
    # one is how to learn whether the class has it, without touching Ray internals.
    return hasattr(handle, "loop_lag_start") and hasattr(handle, "loop_lag_report")


def _max_lag_ms(marker: pytest.Mark, where: str) -> float:
    args = list(marker.args) + ([marker.kwargs["ms"]] if "ms" in marker.kwargs else [])
    if len(args) != 1 or isinstance(args[0], bool) or not isinstance(args[0], int | float):
        raise pytest.UsageError(
            f"{where}: use @pytest.mark.max_loop_lag(ms) with one number of milliseconds, "
            f"got args={marker.args!r} kwargs={marker.kwargs!r}"
        )
    ms = float(args[0])
    if not ms > 0:
        raise pytest.UsageError(f"{where}: max_loop_lag must be positive, got {ms}")
    return ms


class LoopLagGuard:
    """Watches actors' loop-lag probes during one test; :meth:`check` judges them.

    Args:
        max_lag_ms: the longest loop block (milliseconds) a watched actor may show.
        source: where the threshold came from, for the failure message.
    """

    report_timeout_s = 30.0
    """How long :meth:`check` waits for an actor to answer before calling its loop blocked."""

    def __init__(self, max_lag_ms: float, source: str) -> None:
        self.max_lag_ms = max_lag_ms
        self.source = source
        # (repr of the handle, which names the actor; handle; ref of its loop_lag_start call)
        self._watched: list[tuple[str, Any, Any]] = []

    @property
    def watched(self) -> list[str]:
        """The actors watched so far, as ``repr(handle)``."""
        return [key for key, _, _ in self._watched]

    def watch_nowait(self, handle: Any) -> None:
        """Start the actor's probe (a new measurement window) without waiting for it.

        Use it where awaiting is impossible. Ray starts calls without pending
        arguments from one caller in the order they were made, in practice, but
        does not promise that for async actors: a call made right after this one
        might run before the probe starts. :meth:`watch` is certain. Watching an
        actor twice is a no-op. Raises ``TypeError`` if the actor has no probe.
        """
        self._start(handle)

    async def watch(self, handle: Any) -> None:
        """Start the actor's probe and wait until it runs (asyncio or trio).

        Everything the actor's loop does after this returns is measured.
        """
        from .. import aio

        await aio.get(self._start(handle))

    def _start(self, handle: Any) -> Any:
        if not _has_probe(handle):
            raise TypeError(
                f"{handle!r} has no loop_lag_start/loop_lag_report methods: make its class "
                "inherit asyncsync.testing.LoopLagMixin"
            )
        key = repr(handle)  # names the actor id: equal for every handle of one actor
        for known, _, started in self._watched:
            if known == key:
                return started
        # reset=True: an actor shared with earlier tests starts this test clean.
        started = handle.loop_lag_start.remote(reset=True)
        self._watched.append((key, handle, started))
        return started

    def check(self) -> list[str]:
        """Read every watched probe (blocking; call it outside the event loop).

        Returns one message per violation (empty: all fine).
        """
        import ray

        if not self._watched:
            return [
                "loop_lag_guard watched no actor, so it checked nothing. Create actors "
                "with actor_factory from a class that inherits asyncsync.testing."
                "LoopLagMixin, or call `await loop_lag_guard.watch(handle)`."
            ]
        reports = [(label, handle.loop_lag_report.remote()) for label, handle, _ in self._watched]
        refs = [ref for _, ref in reports]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=self.report_timeout_s)
        ready_ids = {r.hex() for r in ready}
        problems: list[str] = []
        for label, ref in reports:
            if ref.hex() not in ready_ids:
                problems.append(
                    f"{label}: did not answer loop_lag_report within "
                    f"{self.report_timeout_s:.0f} s; "
                    "its event loop is blocked"
                )
                continue
            try:
                report = ray.get(ref)
            except ray.exceptions.RayActorError:
                continue  # the test killed it or it crashed; nothing left to measure
            if report.max_lag_ms > self.max_lag_ms:
                problems.append(
                    f"{label}: event loop blocked for {report.max_lag_ms:.1f} ms, over the "
                    f"{self.max_lag_ms:g} ms allowed ({self.source})"
                )
        return problems


_BLOCKED_HINT = (
    "A blocking call ran on an actor's event loop (time.sleep, ray.get, a large copy "
    "or checksum inside an async method) and stalled every other call to that actor. "
    "Run it in a worker thread (asyncio.to_thread / anyio.to_thread.run_sync)."
)


@pytest.fixture
def loop_lag_guard(request: pytest.FixtureRequest, actor_factory: ActorFactory) -> LoopLagGuard:
    """A :class:`LoopLagGuard` checked right after the test body returns.

    The threshold is the ``max_loop_lag(ms)`` marker's, else the
    ``asyncsync_max_loop_lag_ms`` ini value. Actors that ``actor_factory`` makes
    during the test are watched automatically.
    """
    marker = request.node.get_closest_marker("max_loop_lag")
    if marker is not None:
        ms = _max_lag_ms(marker, request.node.nodeid)
        source = f"@pytest.mark.max_loop_lag({ms:g})"
    else:
        ms = float(str(request.config.getini("asyncsync_max_loop_lag_ms")))
        source = f"asyncsync_max_loop_lag_ms = {ms:g}"
    guard = LoopLagGuard(ms, source)
    actor_factory.guard = guard
    return guard


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    # Runs after the test body, still in the call phase, so a violation fails the
    # test itself. A body that raised never gets here: its own error is reported.
    result = yield
    guard = item.funcargs.get("loop_lag_guard") if isinstance(item, pytest.Function) else None
    if isinstance(guard, LoopLagGuard):
        problems = guard.check()
        if problems:
            hint = [_BLOCKED_HINT] if guard.watched else []
            pytest.fail(
                "\n".join(["loop_lag_guard:", *(f"  {p}" for p in problems), *hint]), pytrace=False
            )
    return result

"""A multi-node Ray cluster on one machine, for tests of what crosses nodes.

:func:`local_cluster` starts a head node and worker nodes with
``ray.cluster_utils.Cluster``. Each node is a real Ray node: its own raylet, its
own object store (bounded in size), its own node id. The driver connects
explicitly to this cluster's GCS and runs on the head node, so ``ray.put`` in the
test lands in the head's object store and an actor placed on a worker node reads
it through Ray's object manager, as it would on another machine.

```python
from asyncsync.testing import local_cluster

with local_cluster(num_workers=3) as cluster:
    reader = Reader.options(**cluster.placement(2)).remote()   # on worker node 2
    with cluster.watch_store() as store:
        ...
    print(store.grown)   # object-store bytes each node gained, head first
```

What is shared between the simulated nodes, because they share one machine:
``/dev/shm`` (decide "same node" by Ray node id, never by a file being visible),
the CPUs and the page cache. What is not: object stores, raylets, worker
processes, node ids.

Addresses. Every node listens on ``node_ip_address``. Loopback (``127.0.0.1``)
keeps the cluster unreachable from the network, but Ray 2.60 rewrites a loopback
address to the machine's routable address when a driver connects, unless the
process was started with ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (read once, when
``ray`` is first imported): then every Ray address in the process is loopback.
``make test`` runs the multi-node suite that way; without it the cluster binds
to the address Ray picks for this machine (``ray.util.get_node_ip_address()``).

``ray.cluster_utils.Cluster`` records the head's address in
``<RAY_TMPDIR or /tmp>/ray/ray_current_cluster``, where any later bare
``ray.init()`` on the machine would find it and connect to this cluster. Here
that record is written to the cluster's private temp dir instead (``RAY_TMPDIR``
points there while the head starts and while the cluster shuts down), and on exit
the machine-wide record is removed too if it names this cluster.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DEFAULT_NODE_OBJECT_STORE_BYTES",
    "LocalCluster",
    "StoreWatch",
    "local_cluster",
]

DEFAULT_NODE_OBJECT_STORE_BYTES = 128 << 20
"""Object store of each node: 4 nodes use at most 512 MiB of ``/dev/shm``."""

# The raylet reports its object store usage to the GCS at most every 100 ms
# (raylet_report_resources_period_milliseconds): a reading is settled once it has
# not changed for several report periods.
_SETTLE_QUIET_S = 0.5
_SETTLE_TIMEOUT_S = 10.0
_POLL_S = 0.05


@dataclass
class StoreWatch:
    """Object-store bytes resident on each node before, during and after a block.

    All tuples follow ``nodes`` (the cluster's node ids when the watch started,
    head first). ``baseline`` and ``final`` are settled readings; ``peak`` is the
    largest reading seen while the block ran (sampled every ``interval_s``, and
    never below ``baseline`` or ``final``). A node removed during the block reads 0.

    Precision: each reading is exact to the byte (an object counts its data plus
    its metadata, e.g. 8 MiB of numpy reads 8 MiB + 254 B), but it is a snapshot of
    what is resident, taken from the raylets' resource reports (every ~100 ms).
    An object that is created and freed within one report period can be missed by
    ``peak``; and ``peak`` counts objects resident *at the same time*, not the
    total that crossed: to count copies, keep the references alive until the
    block ends and read ``grown``, or read ``risen``.

    ``risen`` adds up every rise between two consecutive readings of a node: the
    bytes that arrived there during the block, counted again each time an object
    arrives (sessions that each pull a model's buckets and free them add one
    model each). A lower bound: what arrives and is freed between two reports,
    or while something else is freed, is missed.
    """

    nodes: tuple[str, ...]
    interval_s: float
    baseline: tuple[int, ...] = ()
    peak: tuple[int, ...] = ()
    final: tuple[int, ...] = ()
    risen: tuple[int, ...] = ()
    samples: int = 0

    @property
    def grown(self) -> tuple[int, ...]:
        """``peak - baseline`` per node: the most bytes a node gained during the block."""
        return tuple(p - b for p, b in zip(self.peak, self.baseline, strict=True))

    @property
    def delta(self) -> tuple[int, ...]:
        """``final - baseline`` per node: what the block left resident."""
        return tuple(f - b for f, b in zip(self.final, self.baseline, strict=True))


class LocalCluster:
    """A running :func:`local_cluster`: its nodes, actor placement, object-store readings.

    Node indexes follow ``nodes``: 0 is the head, then the worker nodes in the
    order they were added. :meth:`remove_node` shifts the indexes after the one
    removed; :meth:`add_node` appends.
    """

    def __init__(
        self,
        cluster: Any,
        workers: Sequence[Any],
        *,
        node_args: Mapping[str, Any],
        node_ip_address: str,
        temp_dir: str,
    ) -> None:
        self._cluster = cluster
        self._node_args = dict(node_args)
        self.node_ip_address = node_ip_address
        """The address every node listens on."""
        self.temp_dir = temp_dir
        """The cluster's private temp dir (sessions, sockets, logs); removed on exit."""
        self._nodes: list[Any] = [cluster.head_node, *workers]  # ray._private.node.Node
        # cluster.global_state is a GCS client of this cluster, independent of the
        # driver's connection; the lock serializes it between a watch's sampling
        # thread and the caller.
        self._state_lock = threading.Lock()

    @property
    def address(self) -> str:
        """The GCS address (``host:port``) that the driver connected to."""
        return str(self._cluster.address)

    @property
    def nodes(self) -> tuple[str, ...]:
        """Node ids (hex) of the live nodes, head first, then in the order added."""
        return tuple(node.node_id for node in self._nodes)

    def node_index(self, node_id: str) -> int:
        """The index of ``node_id`` in :attr:`nodes`; ``ValueError`` if it is not live here."""
        try:
            return self.nodes.index(node_id)
        except ValueError:
            raise ValueError(f"node {node_id} is not a live node of this cluster") from None

    def placement(self, index: int) -> dict[str, Any]:
        """``.options(**cluster.placement(i))`` runs an actor or task on node ``i``, only there.

        A hard node affinity: if node ``i`` dies, the actor is not moved elsewhere.
        """
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        node_id = self.nodes[index]
        return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id, soft=False)}

    def node_of(self, actor: Any) -> int:
        """The index of the node that ``actor`` (a handle) runs on, as the GCS records it.

        Raises ``LookupError`` while the actor is not placed yet (await one of its
        calls first) or once its node is gone.
        """
        # Ray's public state API needs the dashboard, which these nodes do not run;
        # the GCS actor table has the same record.
        with self._state_lock:
            info = self._cluster.global_state.actor_table(actor._actor_id.hex())
        node_id = info.get("Address", {}).get("NodeID", "") if info else ""
        if node_id not in self.nodes:
            raise LookupError(f"{actor!r} runs on no live node of this cluster ({node_id!r})")
        return self.nodes.index(node_id)

    def add_node(
        self, *, object_store_memory: int | None = None, num_cpus: int | None = None
    ) -> int:
        """Start one more worker node and wait until it is registered; returns its index."""
        args = dict(self._node_args)
        if object_store_memory is not None:
            args["object_store_memory"] = object_store_memory
        if num_cpus is not None:
            args["num_cpus"] = num_cpus
        node = self._cluster.add_node(wait=True, **args)
        self._nodes.append(node)
        with self._state_lock:
            self._cluster.wait_for_nodes()
        return len(self._nodes) - 1

    def remove_node(self, index: int, *, graceful: bool = True) -> None:
        """Stop worker node ``index`` (its raylet, object store and workers).

        Returns once the GCS counts the node as dead; calls to the actors that ran
        there raise ``ray.exceptions.RayActorError`` (``ActorDiedError``). The head
        (index 0) cannot be removed: it holds the GCS and the driver.
        """
        node = self._nodes[index]
        if node is self._nodes[0]:
            raise ValueError("the head node (index 0) holds the GCS and the driver")
        self._cluster.remove_node(node, allow_graceful=graceful)
        self._nodes.remove(node)
        with self._state_lock:
            self._cluster.wait_for_nodes()

    # ------------------------------------------------------------ object store usage

    def store_bytes(self) -> tuple[int, ...]:
        """Object-store bytes resident on each node now, in :attr:`nodes` order (settled).

        Waits until the raylets' reports stop changing (at least 0.5 s). See
        :class:`StoreWatch` for what the numbers count and their precision.
        """
        return self._settled(self.nodes)

    @contextmanager
    def watch_store(self, interval_s: float = _POLL_S) -> Iterator[StoreWatch]:
        """Measure object-store bytes per node around a block (a :class:`StoreWatch`).

        Takes a settled baseline, samples every ``interval_s`` in a thread while the
        block runs, and a settled final reading after it. Blocking (about a second
        in all): fine in a test, also around ``await``s.
        """
        watch = StoreWatch(nodes=self.nodes, interval_s=interval_s)
        watch.baseline = self._settled(watch.nodes)
        peak = list(watch.baseline)
        last = list(watch.baseline)
        risen = [0] * len(last)

        done = threading.Event()

        def sample() -> None:
            while not done.wait(interval_s):
                for i, used in enumerate(self._used(watch.nodes)):
                    peak[i] = max(peak[i], used)
                    risen[i] += max(0, used - last[i])
                    last[i] = used
                watch.samples += 1

        sampler = threading.Thread(target=sample, name="asyncsync-store-watch", daemon=True)
        sampler.start()
        try:
            yield watch
        finally:
            done.set()
            sampler.join()
        watch.final = self._settled(watch.nodes)
        watch.peak = tuple(max(p, f) for p, f in zip(peak, watch.final, strict=True))
        watch.risen = tuple(
            r + max(0, f - u) for r, f, u in zip(risen, watch.final, last, strict=True)
        )

    def _used(self, nodes: Sequence[str]) -> tuple[int, ...]:
        # A raylet reports its object store as the resource "object_store_memory":
        # available = total - bytes in its plasma store (primary and secondary
        # copies, because local_cluster sets scheduler_report_pinned_bytes_only=False).
        with self._state_lock:
            total = self._cluster.global_state.total_resources_per_node()
            avail = self._cluster.global_state.available_resources_per_node()
        out = []
        for node_id in nodes:
            if node_id not in total:
                out.append(0)  # removed
                continue
            cap = total[node_id].get("object_store_memory", 0)
            free = avail.get(node_id, {}).get("object_store_memory", 0)
            out.append(round(cap - free))
        return tuple(out)

    def _settled(self, nodes: Sequence[str]) -> tuple[int, ...]:
        deadline = time.monotonic() + _SETTLE_TIMEOUT_S
        last = self._used(nodes)
        since = time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(_POLL_S)
            now = self._used(nodes)
            if now != last:
                last, since = now, time.monotonic()
            elif time.monotonic() - since >= _SETTLE_QUIET_S:
                return now
        raise TimeoutError(
            f"object store usage kept changing for {_SETTLE_TIMEOUT_S:.0f} s (last {last}); "
            "something is still putting or freeing objects"
        )

    def __repr__(self) -> str:
        nodes = ", ".join(n[:8] for n in self.nodes)
        return f"<LocalCluster {self.address} nodes=[{nodes}]>"


@contextmanager
def _environ(**values: str | None) -> Iterator[None]:
    """Set (or, with ``None``, unset) environment variables for the block."""
    old = {key: os.environ.get(key) for key in values}
    try:
        for key, value in values.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address == "localhost"


@contextmanager
def local_cluster(
    num_workers: int = 3,
    *,
    object_store_memory: int = DEFAULT_NODE_OBJECT_STORE_BYTES,
    num_cpus_per_node: int = 1,
    node_ip_address: str | None = None,
    pythonpath: Sequence[str] | None = None,
    system_config: Mapping[str, Any] | None = None,
) -> Iterator[LocalCluster]:
    """Run a head and ``num_workers`` worker nodes on this machine; connect the driver to it.

    Args:
        num_workers: worker nodes besides the head (more with
            :meth:`LocalCluster.add_node`).
        object_store_memory: bytes of each node's object store (Ray's minimum is
            75 MiB).
        num_cpus_per_node: CPUs each node advertises. Test actors should ask for
            ``num_cpus=0``, so that any number of them fit.
        node_ip_address: the address every node listens on. ``None``: the one Ray
            picks for this machine, which is ``127.0.0.1`` when the process runs
            with ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (see the module doc).
        pythonpath: prepended to ``PYTHONPATH`` for the nodes' workers (so actor
            classes defined in test modules import there).
        system_config: Ray system config for the whole cluster, on top of
            ``scheduler_report_pinned_bytes_only=False`` (each node reports all
            bytes in its object store, which :meth:`LocalCluster.watch_store` reads)
            and ``free_objects_period_milliseconds=100`` (frees show within 0.1 s
            rather than 1 s).

    Yields a :class:`LocalCluster`. On exit: the driver disconnects, every node is
    stopped, the private temp dir is removed, and
    ``/tmp/ray/ray_current_cluster`` is removed if it names this cluster.

    Raises ``RuntimeError`` if Ray is already initialized in this process (one Ray
    per process), ``ValueError`` for a loopback ``node_ip_address`` that Ray would
    rewrite to a routable one.
    """
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    import ray
    from ray._common.utils import get_ray_address_file
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        raise RuntimeError(
            "Ray is already initialized in this process; a local_cluster needs a process "
            "of its own (one Ray per process): run multi-node tests in a separate pytest run"
        )
    here: str = ray.util.get_node_ip_address()  # type: ignore[no-untyped-call]
    ip = node_ip_address or here
    if _is_loopback(ip) and not _is_loopback(here):
        raise ValueError(
            f"node_ip_address={ip!r}: Ray rewrites loopback addresses to {here} in this "
            "process, so the driver could not reach the nodes; start the process with "
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (before ray is imported) or pass a "
            "routable address"
        )
    old_pythonpath = os.environ.get("PYTHONPATH")
    new_pythonpath = old_pythonpath
    if pythonpath:
        new_pythonpath = os.pathsep.join(
            [*pythonpath, *([old_pythonpath] if old_pythonpath else [])]
        )
    machine_record = get_ray_address_file(None)
    node_args: dict[str, Any] = {
        "num_cpus": num_cpus_per_node,
        "object_store_memory": object_store_memory,
        "node_ip_address": ip,
    }
    config = {
        # Each raylet reports all bytes in its object store, not only primary copies.
        "scheduler_report_pinned_bytes_only": False,
        # Frees reach the object stores within 0.1 s instead of 1 s, so that a
        # reading after a free settles quickly.
        "free_objects_period_milliseconds": 100,
        **(system_config or {}),
    }
    # Short: Ray's socket paths under it must stay within 107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="asc", dir="/tmp")
    node_args["temp_dir"] = temp_dir
    cluster: Any = None
    address: str | None = None
    try:
        # Where Cluster records the head's address while RAY_TMPDIR points at temp_dir.
        os.makedirs(os.path.join(temp_dir, "ray"))
        # The nodes' processes inherit this environment (PYTHONPATH reaches their workers).
        with _environ(PYTHONPATH=new_pythonpath):
            with _environ(RAY_TMPDIR=temp_dir):
                cluster = Cluster(
                    initialize_head=True,
                    head_node_args={
                        **node_args,
                        "include_dashboard": False,
                        "_system_config": config,
                    },
                )
            address = str(cluster.address)
            # Started together, registered together: Cluster.worker_nodes is a set,
            # so the order is kept here.
            workers = [cluster.add_node(wait=False, **node_args) for _ in range(num_workers)]
            cluster.wait_for_nodes()
            # An explicit address: never whatever a ray_current_cluster file names.
            ray.init(address=address)
            if ray.get_runtime_context().get_node_id() != cluster.head_node.node_id:
                raise RuntimeError("the driver did not connect to the head node")
            yield LocalCluster(
                cluster,
                workers,
                node_args=node_args,
                node_ip_address=ip,
                temp_dir=temp_dir,
            )
    finally:
        try:
            ray.shutdown()
        finally:
            if cluster is not None:
                with _environ(RAY_TMPDIR=temp_dir):
                    cluster.shutdown()
            if address is not None and _read(machine_record) == address:
                _remove(machine_record)
            shutil.rmtree(temp_dir, ignore_errors=True)


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass

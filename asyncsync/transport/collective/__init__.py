"""Collective transport: the cache owner broadcasts each bucket to the engines.

The train actor (the cache owner, rank 0) and the session's engines (ranks 1..n,
in the order of ``SyncPlan.engines``) form a private torch.distributed process
group: gloo on CPU, NCCL where the owner and every engine have CUDA
(``backend="auto"``). The owner starts a :class:`~torch.distributed.TCPStore` on
a free port of ``host`` and asks each engine to join through the receiver's
``transport_setup("collective", ...)`` hook (see
:meth:`~asyncsync.receiver.StagingReceiver.transport_setup`), which runs
:func:`engine_setup` in an engine worker thread. Engines on other nodes reach
``host``: by default the owner's Ray node address.

Per session: :meth:`~CollectiveTransport.start` announces the bucket sizes to
every engine, whose pump thread then receives the buckets in index order;
:meth:`~CollectiveTransport.put` submits the broadcast of one bucket to the
owner's broadcast thread and returns at once with a :class:`CollectivePayload`;
the engine's ``receive`` takes the bucket from the pump in
:meth:`CollectivePayload.load` and verifies it against the manifest before it
is staged. ``release`` forgets the bucket's broadcast once it ended; ``finish``
waits for any still running.

Failures: on the train side every error is a :class:`~asyncsync.SessionError`
naming the session, the transport and the bucket or engine at fault (options:
:class:`~asyncsync.ConfigError`); on the engine side a
:class:`~asyncsync.TransportError` naming the group, session and bucket, which
the session reports as that engine's failure. Engines keep their version after
any failure, as with every transport.

One module per side, and one for what travels between them:

* ``owner``: the train side, :class:`CollectiveTransport` and rank 0's group;
* ``engine``: the engine side, :func:`engine_setup`, the engine's groups and their
  pump threads, :class:`CollectivePayload`;
* ``wire``: the messages, process-group creation, the channel that moves a
  bucket's bytes, the rendezvous store's keys.
"""

from __future__ import annotations

from .engine import CollectivePayload, engine_setup
from .owner import CollectiveStats, CollectiveTransport

__all__ = ["CollectivePayload", "CollectiveStats", "CollectiveTransport", "engine_setup"]

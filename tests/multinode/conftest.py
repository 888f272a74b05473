"""The multi-node suite: one ``ray_cluster`` (a head and 3 worker nodes) for all of it.

It runs in a pytest process of its own (``pytest tests/multinode``; ``make test``
runs it after the main suite), because a process holds one Ray and the main
suite's is the one-node ``ray_local``. Every test requests ``ray_cluster``, so
``actor_factory`` creates its actors there; a test that adds or removes nodes
leaves the cluster as it found it.
"""

"""Creating train actors: the one-loop contract is checked at creation and at run time."""

from __future__ import annotations

from typing import Any

import pytest
import ray
import torch

from asyncsync import ActorDefinitionError, WrongLoopError
from asyncsync.actor import WeightSyncActor, cache_method, train_actor


class Plain(WeightSyncActor):
    def named_weights(self, step: int) -> Any:
        return [("w", torch.full((4,), float(step)))]


def test_plain_subclass_becomes_an_actor_class_with_explicit_concurrency() -> None:
    actor_class = train_actor(Plain, max_concurrency=4, num_cpus=0)
    assert hasattr(actor_class, "remote")


@pytest.mark.parametrize("value", [1, 0, "8"])
def test_max_concurrency_below_two_is_refused(value: Any) -> None:
    with pytest.raises(ActorDefinitionError, match="max_concurrency"):
        train_actor(Plain, max_concurrency=value)


def test_non_subclass_is_refused() -> None:
    class NotOne:
        async def build_cpu_bucket_cache(self, step: int) -> int:
            return step

    with pytest.raises(ActorDefinitionError, match="not a subclass of WeightSyncActor"):
        train_actor(NotOne)  # type: ignore[arg-type]


def test_sync_override_of_a_cache_method_is_refused() -> None:
    class SyncReady(Plain):
        def cache_ready_step(self) -> int | None:  # type: ignore[override]
            return self.weight_cache.ready_step

    with pytest.raises(
        ActorDefinitionError, match=r"SyncReady.cache_ready_step .* must be `async def`"
    ):
        train_actor(SyncReady)


def test_cache_method_in_a_concurrency_group_is_refused() -> None:
    class Grouped(Plain):
        @ray.method(concurrency_group="io")  # type: ignore[misc]
        async def run_sync_session(self, plan: Any) -> Any:
            return await super().run_sync_session(plan)

    with pytest.raises(
        ActorDefinitionError, match=r"Grouped.run_sync_session is in concurrency group 'io'"
    ):
        train_actor(Grouped, concurrency_groups={"io": 2})


def test_marked_user_method_is_checked_too() -> None:
    class Marked(Plain):
        @cache_method
        def peek(self) -> int | None:
            return self.weight_cache.ready_step

    with pytest.raises(ActorDefinitionError, match=r"Marked.peek touches the weight cache"):
        train_actor(Marked)


class Sneaky(Plain):
    """An unmarked method in another group: creation cannot see it, the cache can."""

    @ray.method(concurrency_group="io")  # type: ignore[misc]
    async def peek_from_other_loop(self) -> int | None:
        return self.weight_cache.ready_step

    async def build_here(self, step: int) -> int:
        return await self.build_cpu_bucket_cache(step)


async def test_cache_refuses_calls_from_another_concurrency_group(actor_factory: Any) -> None:
    actor = actor_factory(train_actor(Sneaky, num_cpus=0, concurrency_groups={"io": 1}))
    assert await actor.build_here.remote(0) == 0
    with pytest.raises(WrongLoopError, match="concurrency group"):
        await actor.peek_from_other_loop.remote()
    # The refused call changed nothing.
    assert await actor.cache_ready_step.remote() == 0
    stats = await actor.cache_stats.remote()
    assert (stats.pins, stats.building_step) == ({}, None)

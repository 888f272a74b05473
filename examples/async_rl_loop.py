"""An asyncio RL loop: rollouts routed by version, training, and weight sync with a staleness bound.

Rollouts run in a task alongside training: a :class:`~asyncsync.FleetRouter` sends
each ``generate`` to a serving engine at most ``--staleness`` steps behind the
trainer (balanced by load, retried elsewhere if an engine dies), and every
rollout comes back stamped with the version and identity of the weights it ran
on. The training loop takes rollouts from a queue, refuses (and counts) those
beyond the bound with a :class:`~asyncsync.StalenessFilter`, trains one step,
builds the step's snapshot and hands it to a :class:`~asyncsync.SyncCoordinator`,
which syncs in the background (one session at a time, always the newest built
step). The loop waits only when the engines would fall more than ``--staleness``
steps behind the trainer. At the end the engines must hold bit for bit the
trainer's last step.

The policy is a tiny Hugging Face Llama built from a config (nothing is
downloaded), and the "policy update" is a cross-entropy step on the model's own
samples: a stand-in for a real RL objective with the same data flow.

Run: ``python examples/async_rl_loop.py [--steps N] [--staleness K] [--address A]``.
It starts a private local Ray for the run (another cluster on the machine is left
alone) unless ``--address`` or ``RAY_ADDRESS`` names one to join.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

import torch

from asyncsync import (
    FleetRouter,
    Rule,
    StalenessFilter,
    SyncCoordinator,
    WeightSyncActor,
    train_actor,
)
from asyncsync.engines import engine_actor
from asyncsync.testing import connect_or_start_ray

ADDRESS_HELP = (
    "join the Ray cluster at this address (default: $RAY_ADDRESS if set, else a private "
    "local Ray started for this run and stopped at its end)"
)

TINY_LLAMA: dict[str, Any] = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


class PolicyTrainer(WeightSyncActor):
    """A train actor holding the policy and its optimizer."""

    def __init__(self) -> None:
        super().__init__(bucket_bytes=256 << 10)
        from transformers import AutoConfig, AutoModelForCausalLM

        torch.set_num_threads(1)
        torch.manual_seed(0)
        self.model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **TINY_LLAMA))
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.05)

    def named_weights(self, step: int) -> Any:
        # Iterated in a worker thread by the build; the loop below never trains
        # while a build copies.
        return self.model.state_dict().items()

    async def train_step(self, rollouts: list[list[int]]) -> float:
        return await asyncio.to_thread(self._update, rollouts)  # compute off the loop

    def _update(self, rollouts: list[list[int]]) -> float:
        ids = torch.tensor(rollouts)
        loss = self.model(input_ids=ids, labels=ids).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        return loss.item()


async def rollouts(router: FleetRouter, queue: asyncio.Queue[Any]) -> None:
    """Generate forever (until cancelled), each rollout routed by version and stamped."""
    prompts = [[1, 2, 3, 4], [5, 6, 7, 8]]
    while True:
        routed = await router.call("generate", prompts, max_new_tokens=12)
        generation = routed.value
        for prompt, tokens in zip(prompts, generation.tokens, strict=True):
            await queue.put((routed.stamp, routed.engine, prompt + tokens))


async def rl_loop(steps: int, staleness: int) -> int:
    trainer: Any = train_actor(PolicyTrainer, num_cpus=0).remote()
    engines: dict[str, Any] = {
        f"engine{i}": engine_actor(num_cpus=0).remote("llama", TINY_LLAMA, num_threads=1)
        for i in range(2)
    }
    # The base weights (step -1) go to the engines first, so every rollout comes
    # from a version of the trainer's policy.
    await trainer.build_cpu_bucket_cache.remote(-1)
    coordinator = SyncCoordinator(trainer, engines, staleness=staleness)
    # Before training step s the newest built step is s - 1; the engines serve at
    # most `staleness` steps older than that.
    keep = StalenessFilter(max_steps=staleness + 1)
    queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=8)
    try:
        await coordinator.sync()
        async with FleetRouter(trainer, rule=Rule.within(staleness)) as router:
            producer = asyncio.create_task(rollouts(router, queue))
            try:
                for step in range(steps):
                    batch: list[list[int]] = []
                    while len(batch) < 4:
                        stamp, engine, rollout = await queue.get()
                        ok = keep.admit(stamp, step)
                        print(
                            f"  rollout from {engine} on version {stamp.version} "
                            f"(weights {stamp.weights}): {'kept' if ok else 'refused: too old'}"
                        )
                        if ok:
                            batch.append(rollout)
                    loss = await trainer.train_step.remote(batch)
                    # The build copies the weights before the next step changes them.
                    await trainer.build_cpu_bucket_cache.remote(step)
                    waited = await coordinator.after_build(step)
                    print(
                        f"step {step}: loss {loss:.3f}, engines at {coordinator.engine_version}, "
                        f"waited {waited * 1e3:.0f} ms for the bound"
                    )
            finally:
                producer.cancel()
                await asyncio.gather(producer, return_exceptions=True)
            stats = router.stats
        start = time.monotonic()
        await coordinator.drain()
        print(f"drained in {(time.monotonic() - start) * 1e3:.0f} ms")
    finally:
        await coordinator.close()

    print(
        f"requests per version: {dict(sorted(stats.by_version.items()))}; rollouts kept "
        f"{keep.admitted}, refused by the bound {keep.refused}"
    )
    step, digests = await trainer.ready_snapshot_digests.remote()
    served = await asyncio.gather(*[e.state_digests.remote() for e in engines.values()])
    same = all(version == step and d == digests for version, d in served)
    print(f"engines serve step {[v for v, _ in served]}; identical to the trainer's: {same}")
    print(
        f"{len(coordinator.reports)} sessions, steps sent: {[r.step for r in coordinator.reports]}"
    )
    return 0 if same and step == steps - 1 else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="training steps (default: 6)")
    parser.add_argument(
        "--staleness",
        type=int,
        default=1,
        help="how many steps the engines may lag behind the trainer (default: 1)",
    )
    parser.add_argument("--address", default=None, help=ADDRESS_HELP)
    args = parser.parse_args(argv)
    # A private local Ray unless the user named a cluster (--address or RAY_ADDRESS).
    with connect_or_start_ray(args.address, num_cpus=2):
        return asyncio.run(rl_loop(args.steps, args.staleness))


if __name__ == "__main__":
    sys.exit(main())

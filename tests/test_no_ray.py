"""The buckets, the cache, shared memory and the errors work without Ray.

(So does tests/gpu_check.py: tests/test_gpu_check.py runs it the same way.)

Each test runs a fresh interpreter whose import system refuses ``ray`` (a
``sys.meta_path`` finder that raises ``ModuleNotFoundError``), as on a bare GPU
machine or in an engine process that never installed it.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

BLOCK_RAY = textwrap.dedent(
    """
    import sys

    class NoRay:
        def find_spec(self, name, path=None, target=None):
            if name == "ray" or name.startswith("ray."):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
            return None

    sys.meta_path.insert(0, NoRay())
    """
)


def run_without_ray(code: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", BLOCK_RAY + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_core_modules_import_and_build_a_snapshot_without_ray() -> None:
    result = run_without_ray(
        """
        import asyncio

        import torch

        import asyncsync
        import asyncsync.buckets, asyncsync.cache, asyncsync.errors, asyncsync.sharedmem
        from asyncsync import BucketCache, TornSnapshotError, pack
        from asyncsync.sharedmem import map_region

        assert "ray" not in sys.modules

        async def main():
            cache = BucketCache(bucket_bytes=4096)
            async with cache.build(0) as build:
                await build.add((f"w{i}", torch.full((512,), float(i))) for i in range(4))
            async with cache.read() as snap:
                assert [float(t[0]) for _, t in snap.named_tensors()] == [0.0, 1.0, 2.0, 3.0]
                for bucket in snap.buckets:
                    assert bytes(map_region(bucket.region)) == bytes(bucket.buffer)
            await cache.close()

        asyncio.run(main())
        assert pack([("x", torch.ones(3))])[0].nbytes == 12
        # The names that need Ray resolve on first use, and only then fail.
        try:
            asyncsync.SyncCoordinator
        except ModuleNotFoundError as exc:
            assert "ray" in str(exc)
        else:
            raise AssertionError("SyncCoordinator imported without Ray")
        assert "SyncCoordinator" in asyncsync.__all__ and "SyncCoordinator" in dir(asyncsync)
        print("built without ray")
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "built without ray"

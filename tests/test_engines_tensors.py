"""TensorEngine and its helpers, outside Ray: the smallest real receiver, and the timings
every receiver reports (load, verify, apply) in its stats."""

from __future__ import annotations

import pytest
import torch

from asyncsync.buckets import pack
from asyncsync.engines import TensorEngine, check_fits, copy_into, copy_named
from asyncsync.errors import ProtocolError


def weights(fill: float) -> dict[str, torch.Tensor]:
    return {
        "a.weight": torch.full((64, 32), fill, dtype=torch.bfloat16),
        "b.weight": torch.full((16,), fill, dtype=torch.float32),
    }


async def test_a_session_updates_the_tensors_in_place_and_reports_where_time_went() -> None:
    engine = TensorEngine(weights(0.0))
    held = engine.params["a.weight"]
    buckets = pack(weights(1.5).items(), bucket_bytes=1024)
    assert len(buckets) == 2

    await engine.begin("s1", 3, [b.manifest for b in buckets])
    for i, bucket in enumerate(buckets):
        await engine.receive("s1", i, bucket)
    assert await engine.commit("s1") == 3

    assert engine.params["a.weight"] is held  # updated in place
    assert all(torch.equal(t, weights(1.5)[n]) for n, t in engine.params.items())
    stats = await engine.receiver_stats()
    nbytes = sum(b.nbytes for b in buckets)
    assert stats.received_bytes == nbytes and stats.applied_bytes == nbytes
    assert stats.load_s >= 0 and stats.verify_s > 0 and stats.apply_s > 0


def test_check_fits_names_what_does_not_fit() -> None:
    params = weights(0.0)
    manifest = [b.manifest for b in pack(weights(1.0).items())]
    check_fits(params, manifest, complete=[(n,) for n in params])

    other = {"a.weight": torch.zeros(64, 32, dtype=torch.float16)}
    wrong = [b.manifest for b in pack(other.items())]
    with pytest.raises(ProtocolError, match=r"'a.weight': float16\[64, 32\] does not fit"):
        check_fits(params, wrong)
    unknown = [b.manifest for b in pack({"c.weight": torch.zeros(2)}.items())]
    with pytest.raises(ProtocolError, match=r"'c\.weight' is not a parameter of my model"):
        check_fits(params, unknown, owner="my model")
    partial = [b.manifest for b in pack({"b.weight": params["b.weight"]}.items())]
    check_fits(params, partial)  # partial updates pass unless asked otherwise
    with pytest.raises(ProtocolError, match=r"leaves 1 of 2 parameters .*'a.weight'"):
        check_fits(params, partial, complete=[(n,) for n in params])


async def test_tensor_engine_refuses_a_partial_update_at_begin() -> None:
    engine = TensorEngine(weights(0.0))
    partial = pack({"b.weight": torch.ones(16)}.items())
    with pytest.raises(ProtocolError, match="unwritten"):
        await engine.begin("s1", 0, [b.manifest for b in partial])
    assert (await engine.receiver_stats()).open_sessions == ()


def test_copy_into_copies_every_tensor_and_counts_bytes() -> None:
    params = weights(0.0)
    buckets = pack(weights(2.0).items(), bucket_bytes=1024)
    assert copy_into(params, buckets) == sum(t.numel() * t.element_size() for t in params.values())
    assert all(torch.equal(t, weights(2.0)[n]) for n, t in params.items())
    with pytest.raises(ProtocolError, match=r"no parameter named 'c\.weight'"):
        copy_into(params, pack({"c.weight": torch.zeros(2)}.items()))


@pytest.mark.parametrize("threads", [2, 3, 4])
def test_copy_in_threads_writes_the_same_bytes_as_one_thread(threads: int) -> None:
    """Shares cut tensors between rows; a non-contiguous parameter is copied whole."""
    gen = torch.Generator().manual_seed(threads)
    shapes = {"emb": (3001, 1024), "t": (700, 900), "w": (64, 64), "b": (7,), "bf": (2048, 1030)}
    dtypes = {"bf": torch.bfloat16}
    params = {n: torch.zeros(s, dtype=dtypes.get(n, torch.float32)) for n, s in shapes.items()}
    params["t"] = torch.zeros(900, 700).t()  # a transposed parameter: not cut
    new = {n: torch.randn(s, generator=gen).to(params[n].dtype) for n, s in shapes.items()}
    buckets = pack(new.items(), bucket_bytes=4 << 20)
    nbytes = copy_into(params, buckets, threads=threads)
    assert nbytes == sum(t.numel() * t.element_size() for t in new.values()) > 8 << 20
    assert all(torch.equal(params[n], new[n]) for n in shapes)


def test_copy_names_every_tensor_before_writing_any() -> None:
    params = weights(0.0)
    named = [("a.weight", torch.ones(64, 32, dtype=torch.bfloat16)), ("c.weight", torch.ones(2))]
    with pytest.raises(ProtocolError, match=r"c\.weight"):
        copy_named(params, named, threads=2)
    assert not params["a.weight"].any()  # nothing written

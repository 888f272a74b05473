from __future__ import annotations

import numpy as np
import pytest
import ray
import torch

from asyncsync.buckets import ALIGN, Bucket, BucketManifest, pack
from asyncsync.errors import BucketError, ChecksumMismatchError, ManifestMismatchError

ALL_DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int8,
    torch.uint8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.bool,
    torch.complex64,
    torch.float8_e4m3fn,
]


def _sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point or dtype.is_complex:
        return torch.randn(shape, generator=g).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -1000), min(info.max, 1000), shape, generator=g, dtype=dtype)


def _raw(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def test_roundtrip_every_dtype_bit_for_bit() -> None:
    shapes = [(3, 5), (7,), (), (0, 4), (2, 3, 4)]
    named = [
        (f"{d!s}.{i}", _sample(d, shapes[i % len(shapes)], i)) for i, d in enumerate(ALL_DTYPES)
    ]
    (bucket,) = pack(named, bucket_bytes=1 << 20)
    out = bucket.named_tensors()
    assert [n for n, _ in out] == [n for n, _ in named]
    for (_, want), (name, got) in zip(named, out, strict=True):
        assert got.dtype == want.dtype, name
        assert got.shape == want.shape, name
        # Bitwise: compare the raw bytes, so NaN payloads and -0.0 count too.
        assert _raw(got).equal(_raw(want)), name
    for meta in bucket.index:
        assert meta.offset % ALIGN == 0


def test_views_are_zero_copy() -> None:
    (bucket,) = pack([("a", torch.arange(16, dtype=torch.float32))])
    ((_, view),) = bucket.named_tensors()
    view[0] = 42.0
    assert bucket.buffer[:4].view(np.float32)[0] == 42.0


def test_non_contiguous_input_is_packed_by_value() -> None:
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()
    (bucket,) = pack([("t", t)])
    assert bucket.named_tensors()[0][1].equal(t)


def test_budget_splits_and_oversize_tensor_gets_own_bucket() -> None:
    small = [(f"s{i}", torch.zeros(256, dtype=torch.float32)) for i in range(8)]  # 1 KiB each
    big = ("big", torch.zeros(4096, dtype=torch.float32))  # 16 KiB > budget
    buckets = pack([*small[:4], big, *small[4:]], bucket_bytes=2048)
    names = [[m.name for m in b.index] for b in buckets]
    assert names == [["s0", "s1"], ["s2", "s3"], ["big"], ["s4", "s5"], ["s6", "s7"]]
    assert all(b.nbytes <= 2048 for b in buckets if b.index[0].name != "big")


def test_checksum_detects_one_flipped_bit() -> None:
    (bucket,) = pack([("w", torch.ones(100))])
    bucket.verify()
    corrupted = bucket.buffer.copy()
    corrupted[17] ^= 0x01
    with pytest.raises(ChecksumMismatchError, match="'w'"):
        Bucket(corrupted, bucket.index, bucket.checksum).verify()


def test_equal_tensors_give_equal_checksums_despite_padding() -> None:
    named = [("a", torch.ones(3)), ("b", torch.ones(5))]
    first = pack(named)[0]
    second = pack(named)[0]
    assert first.checksum == second.checksum


def test_manifest_json_roundtrip_and_mismatch_names_the_tensor() -> None:
    (bucket,) = pack([("a", torch.ones(2, 3)), ("b", torch.zeros(4, dtype=torch.int64))])
    manifest = bucket.manifest
    assert BucketManifest.from_json(manifest.to_json()) == manifest
    (other,) = pack([("a", torch.ones(3, 2)), ("b", torch.zeros(4, dtype=torch.int64))])
    with pytest.raises(ManifestMismatchError, match=r"'a': shape"):
        other.verify(manifest)


@pytest.mark.parametrize(
    ("item", "message"),
    [
        (("x", [1.0, 2.0]), "'x' is a list"),
        (("sp", torch.eye(3).to_sparse()), "'sp' has layout"),
        (("m", torch.empty(3, device="meta")), "'m' is a meta tensor"),
        (("", torch.ones(1)), "non-empty strings"),
        ((3, torch.ones(1)), "non-empty strings"),
    ],
)
def test_bad_input_is_a_typed_error_naming_the_item(item: object, message: str) -> None:
    with pytest.raises(BucketError, match=message):
        pack([("ok", torch.ones(1)), item])  # type: ignore[list-item]


def test_duplicate_names_are_refused() -> None:
    with pytest.raises(BucketError, match="duplicate tensor name 'w'"):
        pack([("w", torch.ones(1)), ("v", torch.ones(1)), ("w", torch.ones(1))])


def test_buffer_roundtrips_through_object_store_zero_copy(ray_local: object) -> None:
    named = [("w", torch.randn(64, 64)), ("b", torch.randn(64).bfloat16())]
    (bucket,) = pack(named)
    ref = ray.put(bucket)
    got = ray.get(ref)
    # A zero-copy read maps the object store's memory: read-only, not owned by numpy.
    assert not got.buffer.flags.writeable
    assert not got.buffer.flags.owndata
    got.verify(bucket.manifest)
    for (_, want), (_, have) in zip(named, got.named_tensors(), strict=True):
        assert have.equal(want)

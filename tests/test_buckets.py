from __future__ import annotations

import pickle
import warnings

import numpy as np
import pytest
import ray
import torch

from asyncsync.buckets import (
    ALIGN,
    HASH_CHUNK,
    Bucket,
    BucketManifest,
    TensorMeta,
    checksum,
    fill_and_hash,
    fill_buffer,
    layout,
    pack,
)
from asyncsync.errors import BucketError, ChecksumMismatchError, ProtocolError

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
    with pytest.raises(ProtocolError, match=r"'a': shape"):
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


# --------------------------------------------------------------------- one pass: copy and hash


def _random_group(rng: np.random.Generator, n: int) -> list[tuple[str, torch.Tensor]]:
    """Tensors of mixed dtypes, sizes around HASH_CHUNK, and every layout fill_and_hash handles."""
    sizes = [0, 1, 3, 63, 65, 1000, HASH_CHUNK // 4 - 1, HASH_CHUNK + 5, 2 * HASH_CHUNK + 17]
    out: list[tuple[str, torch.Tensor]] = []
    for i in range(n):
        dtype = [torch.float32, torch.bfloat16, torch.int8, torch.float64, torch.complex64][
            int(rng.integers(5))
        ]
        numel = int(rng.choice(sizes)) // dtype.itemsize
        t = _sample(dtype, (2 * numel + 2,), int(rng.integers(1 << 30)))
        layout_kind = int(rng.integers(4))
        if layout_kind == 0:
            t = t[:numel]  # contiguous: memmove
        elif layout_kind == 1:
            t = t[: 2 * numel : 2]  # strided
        elif layout_kind == 2 and numel >= 2:
            t = t[: numel // 2 * 2].view(-1, 2).t()  # transposed
        else:
            t = t[:numel].conj() if dtype.is_complex else t[1 : numel + 1]
        out.append((f"t{i}", t))
    return out


@pytest.mark.parametrize("seed", range(40))
def test_fill_and_hash_equals_checksum_of_the_payload_bit_for_bit(seed: int) -> None:
    rng = np.random.default_rng(seed)
    group = _random_group(rng, int(rng.integers(0, 9)))
    index, total = layout(group)
    tensors = [t for _, t in group]
    # A reused buffer holds garbage: the padding must be zeroed, not left as found.
    payload = rng.integers(0, 256, total + int(rng.integers(0, 100)), dtype=np.uint8)
    digest = fill_and_hash(payload, index, tensors)
    assert digest == checksum(payload)
    copied = np.full_like(payload, 0xCD)
    fill_buffer(copied, index, tensors)
    assert np.array_equal(copied, payload)
    end = 0
    for meta in index:
        assert not payload[end : meta.offset].any(), "padding is not zero"
        end = meta.offset + meta.nbytes
    assert not payload[end:].any()
    got = Bucket(payload[:total], index, digest).named_tensors()
    for (name, want), (_, have) in zip(group, got, strict=True):
        assert have.shape == want.shape, name
        if want.numel():
            assert _raw(have).equal(_raw(want.resolve_conj())), name
    # pack() hashes the same way.
    assert [b.checksum for b in pack(group, bucket_bytes=1 << 30)] == (
        [checksum(payload[:total])] if group else []
    )


def test_fill_and_hash_refuses_arguments_that_do_not_fit_before_writing() -> None:
    group = [("a", torch.ones(4)), ("b", torch.ones(2, 3))]
    index, total = layout(group)
    payload = np.full(total, 7, dtype=np.uint8)
    tensors = [t for _, t in group]
    cases: list[tuple[np.ndarray, tuple[TensorMeta, ...], list[torch.Tensor], str]] = [
        (payload[:-1], index, tensors, r"'b': bytes \[64, 88\) .* outside the 87-byte payload"),
        (payload, index, [tensors[0], torch.ones(3, 2)], r"'b': index says float32\[2, 3\]"),
        (payload, index, [tensors[0], torch.ones(7)], r"'b': index says .* 24 bytes"),
        (payload, index, tensors[:1], "2 index entries for 1 tensors"),
        (payload, (index[1], index[0]), tensors[::-1], "'a'.* overlap the tensor before it"),
        (payload.astype(np.int16), index, tensors, "writable, contiguous 1-D uint8"),
        (payload[::2], index, tensors, "writable, contiguous 1-D uint8"),
    ]
    readonly = payload.copy()
    readonly.flags.writeable = False
    cases.append((readonly, index, tensors, "writable"))
    for buf, idx, ts, message in cases:
        with pytest.raises(BucketError, match=message):
            fill_and_hash(buf, idx, ts)
    assert (payload == 7).all()  # nothing was written


class _CopyFails(torch.Tensor):
    """A tensor subclass whose copy into a bucket fails inside torch."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func is torch.Tensor.copy_:
            raise RuntimeError("device lost\ndetails")
        return super().__torch_function__(func, types, args, kwargs or {})


def test_a_failing_copy_is_a_bucket_error_naming_the_tensor() -> None:
    broken = torch.ones(8).as_subclass(_CopyFails)
    with pytest.raises(
        BucketError, match=r"cannot copy tensor 'w' \(float32\[8\] on cpu\).*device lost$"
    ):
        pack([("ok", torch.ones(2)), ("w", broken)])


# ----------------------------------------------------------------- tensors the format cannot hold

SUB_BYTE = [getattr(torch, f"{kind}{bits}") for kind in ("uint", "int") for bits in range(1, 8)]


@pytest.mark.parametrize("dtype", SUB_BYTE, ids=str)
def test_sub_byte_dtypes_are_refused_naming_tensor_and_dtype(dtype: torch.dtype) -> None:
    t = torch.zeros(16, dtype=torch.uint8).view(dtype)
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(
        BucketError, match=rf"'packed' has dtype {name}, which a bucket cannot hold"
    ):
        pack([("fine", torch.ones(3)), ("packed", t)])
    # Refused by dtype, whatever the size: an empty one too.
    with pytest.raises(BucketError, match="'none'"):
        pack([("none", t[:0])])


def test_quantized_tensors_are_refused_with_what_to_send_instead() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized constructors are deprecated
        q = torch.quantize_per_tensor(torch.randn(8), 0.1, 0, torch.qint8)
    with pytest.raises(BucketError, match=r"'q' is a quantized qint8 tensor.*int_repr\(\)"):
        pack([("q", q)])
    with pytest.raises(BucketError, match="'raw' is a quantized quint8"):
        pack([("raw", torch.zeros(4, dtype=torch.uint8).view(torch.quint8))])


def test_nested_tensors_are_refused() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nested tensors are a prototype
        nested = torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])
    with pytest.raises(BucketError, match="'n' has layout nested"):
        pack([("n", nested)])


def test_every_dtype_that_packs_views_back_out() -> None:
    """Whatever dtype the probe accepts really round-trips; complex32 among them here."""
    accepted = []
    for value in vars(torch).values():
        if not isinstance(value, torch.dtype) or value in accepted:
            continue
        t = torch.arange(64, dtype=torch.uint8).view(value)
        try:
            (bucket,) = pack([("x", t)])
        except BucketError:
            continue
        accepted.append(value)
        ((_, back),) = bucket.named_tensors()
        assert back.dtype == value and _raw(back).equal(_raw(t))
    assert torch.complex32 in accepted and torch.float8_e4m3fn in accepted
    assert not set(accepted) & set(SUB_BYTE)


def test_bucket_pickles_payload_out_of_band_and_region_by_value() -> None:
    from asyncsync.sharedmem import SharedRegion

    (plain,) = pack([("w", torch.randn(256))])
    region = SharedRegion(pid=1, fd=5, offset=0, nbytes=plain.nbytes, token="ab" * 8)
    bucket = Bucket(plain.buffer, plain.index, plain.checksum, region)
    frames: list[pickle.PickleBuffer] = []
    data = pickle.dumps(bucket, protocol=5, buffer_callback=frames.append)
    assert len(frames) == 1 and len(data) < 1024  # the payload travels out of band
    back = pickle.loads(data, buffers=frames)
    assert back.region == region and plain.region is None
    back.verify(bucket.manifest)

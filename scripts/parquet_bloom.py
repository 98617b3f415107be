"""Probe a parquet split-block bloom filter: pyarrow can write one but has no API to read it.

fgm-viewer checks the `l_container_id` bloom filter of a row group before reading it, so the
reference reader in `bench_viewer.py` must do the same to follow its access path. This follows
the Parquet spec (BloomFilter.md) directly: at the column chunk's `bloom_filter_offset`, a
Thrift-compact `BloomFilterHeader` (field 1 = bitset length), then the bitset of 32-byte
blocks; a value is hashed with xxHash64 (seed 0) over its plain encoding, which for a string
is its UTF-8 bytes. The test suite checks the answers against DuckDB's `parquet_bloom_probe`.
"""

from __future__ import annotations

import os
import struct

_MASK = (1 << 64) - 1
_P1 = 11400714785074694791
_P2 = 14029467366897019727
_P3 = 1609587929392839161
_P4 = 9650029242287828579
_P5 = 2870177450012600261
# The eight odd constants of the split-block filter; one bit per 32-bit word of a block.
_SALT = (
    0x47B6137B,
    0x44974D91,
    0x8824AD5B,
    0xA2B7289D,
    0x705495C7,
    0x2DF1424B,
    0x9EFC4947,
    0x5C6BFB31,
)
_BLOCK_BYTES = 32
# A BloomFilterHeader is four small fields; this is enough to hold it whole.
_HEADER_READ = 64


def _rotl(value: int, bits: int) -> int:
    return ((value << bits) | (value >> (64 - bits))) & _MASK


def _round(acc: int, lane: int) -> int:
    return (_rotl((acc + lane * _P2) & _MASK, 31) * _P1) & _MASK


def _merge(acc: int, value: int) -> int:
    return ((acc ^ _round(0, value)) * _P1 + _P4) & _MASK


def xxh64(data: bytes, seed: int = 0) -> int:
    """xxHash64, as the Parquet spec requires; a few hundred ns per short id is plenty here."""
    size, pos = len(data), 0
    if size >= 32:
        v1, v2, v3, v4 = (
            (seed + _P1 + _P2) & _MASK,
            (seed + _P2) & _MASK,
            seed,
            (seed - _P1) & _MASK,
        )
        while pos + 32 <= size:
            l1, l2, l3, l4 = struct.unpack_from("<4Q", data, pos)
            v1, v2, v3, v4 = _round(v1, l1), _round(v2, l2), _round(v3, l3), _round(v4, l4)
            pos += 32
        acc = (_rotl(v1, 1) + _rotl(v2, 7) + _rotl(v3, 12) + _rotl(v4, 18)) & _MASK
        for lane in (v1, v2, v3, v4):
            acc = _merge(acc, lane)
    else:
        acc = (seed + _P5) & _MASK
    acc = (acc + size) & _MASK
    while pos + 8 <= size:
        (lane,) = struct.unpack_from("<Q", data, pos)
        acc = (_rotl(acc ^ _round(0, lane), 27) * _P1 + _P4) & _MASK
        pos += 8
    if pos + 4 <= size:
        (word,) = struct.unpack_from("<I", data, pos)
        acc = (_rotl(acc ^ ((word * _P1) & _MASK), 23) * _P2 + _P3) & _MASK
        pos += 4
    while pos < size:
        acc = (_rotl(acc ^ ((data[pos] * _P5) & _MASK), 11) * _P1) & _MASK
        pos += 1
    acc = ((acc ^ (acc >> 33)) * _P2) & _MASK
    acc = ((acc ^ (acc >> 29)) * _P3) & _MASK
    return acc ^ (acc >> 32)


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _zigzag(value: int) -> int:
    return (value >> 1) ^ -(value & 1)


def _struct_fields(buf: bytes, pos: int) -> tuple[dict[int, int], int]:
    """Integer fields of one Thrift-compact struct (nested structs skipped), and its end."""
    fields: dict[int, int] = {}
    last = 0
    while True:
        byte = buf[pos]
        pos += 1
        if byte == 0:
            return fields, pos
        kind, delta = byte & 0x0F, byte >> 4
        if delta:
            field = last + delta
        else:
            raw, pos = _varint(buf, pos)
            field = _zigzag(raw)
        last = field
        if kind in (1, 2):  # booleans live in the type nibble
            fields[field] = int(kind == 1)
        elif kind == 3:
            fields[field] = buf[pos]
            pos += 1
        elif kind in (4, 5, 6):
            raw, pos = _varint(buf, pos)
            fields[field] = _zigzag(raw)
        elif kind == 7:
            pos += 8
        elif kind == 8:
            length, pos = _varint(buf, pos)
            pos += length
        elif kind == 12:
            _, pos = _struct_fields(buf, pos)
        else:
            raise ValueError(f"unexpected Thrift type {kind} in a BloomFilterHeader")


def read_bitset(fd: int, offset: int, length: int | None) -> bytes:
    """The bitset of the filter at `offset`; `length` (header + bitset) when the footer has it."""
    head = os.pread(fd, length or _HEADER_READ, offset)
    fields, header_end = _struct_fields(head, 0)
    size = fields.get(1)
    if size is None or size <= 0 or size % _BLOCK_BYTES:
        raise ValueError(f"bloom filter at offset {offset}: bad bitset length {size}")
    bitset = head[header_end : header_end + size]
    if len(bitset) < size:
        bitset = os.pread(fd, size, offset + header_end)
    if len(bitset) != size:
        raise ValueError(f"bloom filter at offset {offset}: truncated bitset")
    return bitset


def might_contain(bitset: bytes, value: bytes) -> bool:
    """False only when `value` is certainly absent from the row group."""
    digest = xxh64(value)
    blocks = len(bitset) // _BLOCK_BYTES
    block = ((digest >> 32) * blocks) >> 32
    words = struct.unpack_from("<8I", bitset, block * _BLOCK_BYTES)
    key = digest & 0xFFFFFFFF
    return all(words[i] >> (((key * salt) & 0xFFFFFFFF) >> 27) & 1 for i, salt in enumerate(_SALT))

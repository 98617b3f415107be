"""Tests for the `.containers` companion codec.

The hand-built byte strings use ``struct.pack`` directly, independent of ``encode``, so they pin
the monitor's bincode wire format rather than only checking that encode and decode agree.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from fgm_consolidator.companions import (
    MAX_BYTES,
    Container,
    ContainerSidecar,
    decode,
    encode,
    read_companion,
    union,
)
from fgm_consolidator.errors import CompanionError, SourceReadError

PATH = "/data/metrics-0001.parquet.containers"


def s(value: str) -> bytes:
    raw = value.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def some(value: str) -> bytes:
    return b"\x01" + s(value)


NONE = b"\x00"


def container_v1_bytes() -> bytes:
    return (
        s("abcdef012345")
        + some("web-7f9c")
        + some("nginx")
        + some("default")
        + NONE
        + s("Burstable")
    )


V1_BYTES = b"\x01" + struct.pack("<Q", 1) + container_v1_bytes()

V1_SIDECAR = ContainerSidecar(
    version=1,
    containers=(
        Container(
            container_id="abcdef012345",
            pod_name="web-7f9c",
            container_name="nginx",
            namespace="default",
            pod_uid=None,
            qos_class="Burstable",
        ),
    ),
)

V2_BYTES = (
    b"\x02"
    + struct.pack("<Q", 2)
    # container 0: labels some, two entries, deliberately not sorted
    + s("111111111111")
    + some("db-0")
    + some("postgres")
    + some("prod")
    + some("uid-1")
    + s("Guaranteed")
    + b"\x01"
    + struct.pack("<Q", 2)
    + s("tier")
    + s("db")
    + s("app")
    + s("pg")
    # container 1: all options none, labels none
    + s("222222222222")
    + NONE
    + NONE
    + NONE
    + NONE
    + s("BestEffort")
    + NONE
)

V2_SIDECAR = ContainerSidecar(
    version=2,
    containers=(
        Container(
            container_id="111111111111",
            pod_name="db-0",
            container_name="postgres",
            namespace="prod",
            pod_uid="uid-1",
            qos_class="Guaranteed",
            labels=(("tier", "db"), ("app", "pg")),
        ),
        Container(
            container_id="222222222222",
            pod_name=None,
            container_name=None,
            namespace=None,
            pod_uid=None,
            qos_class="BestEffort",
            labels=None,
        ),
    ),
)


def c(cid: str, qos: str = "Burstable", labels: tuple[tuple[str, str], ...] | None = None):
    return Container(cid, None, None, None, None, qos, labels)


# --- wire format and round trips -------------------------------------------------------------


def test_decode_v1_hand_built_bytes() -> None:
    assert decode(V1_BYTES) == V1_SIDECAR


def test_encode_v1_matches_hand_built_bytes() -> None:
    assert encode(V1_SIDECAR) == V1_BYTES


def test_decode_v2_hand_built_bytes() -> None:
    assert decode(V2_BYTES) == V2_SIDECAR


def test_encode_v2_matches_hand_built_bytes() -> None:
    assert encode(V2_SIDECAR) == V2_BYTES


def test_v2_empty_labels_map_is_distinct_from_none() -> None:
    sidecar = ContainerSidecar(2, (c("aaaaaaaaaaaa", labels=()),))
    data = encode(sidecar)
    assert data.endswith(s("Burstable") + b"\x01" + struct.pack("<Q", 0))
    assert decode(data).containers[0].labels == ()


def test_empty_sidecar_round_trips() -> None:
    for version in (1, 2):
        data = encode(ContainerSidecar(version, ()))
        assert data == bytes([version]) + struct.pack("<Q", 0)
        assert decode(data) == ContainerSidecar(version, ())


def test_non_ascii_strings_round_trip() -> None:
    sidecar = ContainerSidecar(2, (c("ééé", qos="Bürst", labels=(("ключ", "値"),)),))
    data = encode(sidecar)
    assert s("ééé") in data  # length prefix counts UTF-8 bytes, not characters
    assert decode(data) == sidecar


def test_encode_v1_rejects_labels() -> None:
    with pytest.raises(ValueError, match="version 1"):
        encode(ContainerSidecar(1, (c("aaaaaaaaaaaa", labels=(("k", "v"),)),)))


def test_encode_rejects_unknown_version() -> None:
    with pytest.raises(ValueError, match="3"):
        encode(ContainerSidecar(3, ()))


def test_encode_v2_writes_none_for_unlabelled_container() -> None:
    data = encode(ContainerSidecar(2, (c("aaaaaaaaaaaa"),)))
    assert data == (
        b"\x02" + struct.pack("<Q", 1) + s("aaaaaaaaaaaa") + NONE * 4 + s("Burstable") + NONE
    )


# --- errors ----------------------------------------------------------------------------------


def decode_error(data: bytes) -> CompanionError:
    with pytest.raises(CompanionError) as info:
        decode(data, PATH)
    assert PATH in str(info.value)
    assert info.value.path == PATH
    return info.value


@pytest.mark.parametrize("version", [0, 3, 255])
def test_unsupported_version(version: int) -> None:
    err = decode_error(bytes([version]) + struct.pack("<Q", 0))
    assert f"unsupported companion version {version}" in str(err)


def test_empty_data_is_truncated_at_version() -> None:
    err = decode_error(b"")
    assert "truncated at byte 0 reading version" in str(err)


def test_truncated_container_count() -> None:
    err = decode_error(b"\x01\x00\x00")
    assert "truncated at byte 1 reading containers count" in str(err)


@pytest.mark.parametrize("cut", range(1, len(V1_BYTES)))
def test_every_truncation_of_v1_is_an_error(cut: int) -> None:
    err = decode_error(V1_BYTES[:cut])
    assert "truncated" in str(err) or "implausible" in str(err)


@pytest.mark.parametrize("cut", range(1, len(V2_BYTES)))
def test_every_truncation_of_v2_is_an_error(cut: int) -> None:
    err = decode_error(V2_BYTES[:cut])
    assert "truncated" in str(err) or "implausible" in str(err)


def test_truncation_reports_offset_and_field() -> None:
    # Cut inside the qos_class bytes of the v1 container.
    qos_start = len(V1_BYTES) - len("Burstable")
    err = decode_error(V1_BYTES[: qos_start + 3])
    assert str(err) == (
        f"{PATH}: truncated at byte {qos_start} reading container 0 qos_class: need 9 bytes, 3 left"
    )


def test_invalid_utf8() -> None:
    bad = b"\x01" + struct.pack("<Q", 1) + struct.pack("<Q", 2) + b"\xff\xfe"
    err = decode_error(bad + NONE * 4 + s("Burstable"))
    assert "invalid UTF-8 in container 0 container_id at byte 17" in str(err)


def test_bad_option_tag() -> None:
    data = b"\x01" + struct.pack("<Q", 1) + s("abcdef012345") + b"\x02"
    err = decode_error(data + NONE * 3 + s("Burstable"))
    assert "bad option tag 2 for container 0 pod_name at byte 29" in str(err)


def test_bad_labels_option_tag() -> None:
    data = encode(ContainerSidecar(2, (c("aaaaaaaaaaaa"),)))
    err = decode_error(data[:-1] + b"\x07")
    assert f"bad option tag 7 for container 0 labels at byte {len(data) - 1}" in str(err)


def test_trailing_bytes() -> None:
    err = decode_error(V1_BYTES + b"\x00\x00")
    assert f"2 trailing bytes after the companion ended at byte {len(V1_BYTES)}" in str(err)


def test_absurd_container_count() -> None:
    err = decode_error(b"\x01" + struct.pack("<Q", 2**64 - 1))
    assert f"implausible containers count {2**64 - 1} at byte 1" in str(err)


def test_container_count_one_too_many_is_truncation() -> None:
    # One real container but a count of two: plausible by size, so the decode runs out of bytes.
    data = b"\x01" + struct.pack("<Q", 2) + container_v1_bytes()
    err = decode_error(data)
    assert f"truncated at byte {len(data)} reading container 1 container_id length" in str(err)


def test_container_count_beyond_minimum_sizes() -> None:
    # 85 bytes left cannot hold 5 containers of at least 20 bytes each: rejected up front.
    body = container_v1_bytes()
    assert len(body) == 85
    err = decode_error(b"\x01" + struct.pack("<Q", 5) + body)
    assert str(err) == f"{PATH}: implausible containers count 5 at byte 1: only 85 bytes left"


def test_absurd_labels_count() -> None:
    data = b"\x02" + struct.pack("<Q", 1) + s("aaaaaaaaaaaa") + NONE * 4 + s("Burstable")
    err = decode_error(data + b"\x01" + struct.pack("<Q", 2**40))
    assert f"implausible container 0 labels count {2**40}" in str(err)


def test_absurd_string_length_is_truncation() -> None:
    err = decode_error(b"\x01" + struct.pack("<Q", 1) + struct.pack("<Q", 2**63) + b"x" * 20)
    assert "truncated at byte 17 reading container 0 container_id" in str(err)


def test_companion_error_is_a_source_read_error() -> None:
    assert isinstance(decode_error(b""), SourceReadError)


def test_default_path_in_message() -> None:
    with pytest.raises(CompanionError, match="<bytes>"):
        decode(b"")


# --- files -----------------------------------------------------------------------------------


def test_read_companion(tmp_path: Path) -> None:
    path = tmp_path / "a.parquet.containers"
    path.write_bytes(V2_BYTES)
    assert read_companion(path) == V2_SIDECAR


def test_read_companion_corrupt_names_file(tmp_path: Path) -> None:
    path = tmp_path / "a.parquet.containers"
    path.write_bytes(V1_BYTES[:-1])
    with pytest.raises(CompanionError) as info:
        read_companion(path)
    assert str(path) in str(info.value)
    assert "truncated" in str(info.value)


def test_read_companion_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.containers"
    with pytest.raises(CompanionError) as info:
        read_companion(path)
    assert str(path) in str(info.value)
    assert "cannot read companion" in str(info.value)
    assert isinstance(info.value.__cause__, FileNotFoundError)


def test_read_companion_directory(tmp_path: Path) -> None:
    with pytest.raises(CompanionError) as info:
        read_companion(tmp_path)
    assert str(tmp_path) in str(info.value)


# --- union -----------------------------------------------------------------------------------


def test_union_empty_is_none() -> None:
    assert union([]) is None
    assert union(iter(())) is None


def test_union_of_empty_sidecars_is_empty_not_none() -> None:
    assert union([ContainerSidecar(1, ()), ContainerSidecar(2, ())]) == ContainerSidecar(2, ())


def test_union_dedupes_first_wins_and_keeps_order() -> None:
    a = ContainerSidecar(1, (c("aaa", qos="first"), c("bbb")))
    b = ContainerSidecar(1, (c("ccc"), c("aaa", qos="second"), c("ddd")))
    assert union([a, b]) == ContainerSidecar(
        1, (c("aaa", qos="first"), c("bbb"), c("ccc"), c("ddd"))
    )


def test_union_version_is_max_and_encodes() -> None:
    v1 = ContainerSidecar(1, (c("aaa"), c("ccc")))
    v2 = ContainerSidecar(2, (c("bbb", labels=(("k", "v"),)),))
    result = union([v1, v2])
    assert result == ContainerSidecar(2, (c("aaa"), c("ccc"), c("bbb", labels=(("k", "v"),))))
    # The v1 containers carry no labels and encode as option-none in the v2 result.
    assert decode(encode(result)) == result
    assert encode(result).startswith(
        b"\x02" + struct.pack("<Q", 3) + s("aaa") + NONE * 4 + s("Burstable") + NONE
    )


def test_union_takes_the_labels_a_later_companion_knows_of_a_container() -> None:
    """A monitor upgraded mid-window writes a v1 companion, then v2 ones listing the same
    container with its labels. First-wins kept the v1 entry, so the labels the viewer showed
    for the sources vanished from the consolidated file. The labels now fill in the
    unlabelled entry in its place; between two labelled entries the first still wins, and
    so does the first of two values of any field."""
    v1 = ContainerSidecar(1, (c("aaa", qos="first"), c("bbb")))
    v2 = ContainerSidecar(
        2, (c("aaa", qos="second", labels=(("x", "y"),)), c("bbb", labels=(("k", "v"),)))
    )
    later = ContainerSidecar(2, (c("bbb", labels=(("k", "other"),)),))
    result = union([v1, v2, later])
    assert result == ContainerSidecar(
        2, (c("aaa", qos="first", labels=(("x", "y"),)), c("bbb", labels=(("k", "v"),)))
    )


def test_union_fills_in_what_a_later_companion_learnt_of_a_container() -> None:
    """A container listed before the monitor knew its pod, then with it: the first entry was
    kept whole, and its name, namespace and pod uid were lost with the sources' companions
    (an adversarial fidelity review). What both entries know keeps the first's value."""
    early = Container("aaa", "pod", None, None, None, "Burstable", None)
    learnt = Container("aaa", "pod", "app", "ns", "uid-1", "Guaranteed", (("k", "v"),))
    result = union([ContainerSidecar(2, (early,)), ContainerSidecar(2, (learnt, c("bbb")))])
    filled = Container("aaa", "pod", "app", "ns", "uid-1", "Burstable", (("k", "v"),))
    assert result == ContainerSidecar(2, (filled, c("bbb")))
    assert union([ContainerSidecar(2, (learnt,)), ContainerSidecar(2, (early,))]) == (
        ContainerSidecar(2, (learnt,))
    )


def test_union_does_not_mix_entries_that_place_a_container_elsewhere() -> None:
    """Filled from an entry naming another pod, one record would describe neither."""
    early = Container("aaa", "pod", None, None, None, "Burstable", None)
    elsewhere = Container("aaa", "other-pod", "app", "ns", "uid-1", "Burstable", (("k", "v"),))
    result = union([ContainerSidecar(2, (early,)), ContainerSidecar(2, (elsewhere,))])
    assert result == ContainerSidecar(2, (early,))


def test_union_version_max_regardless_of_order() -> None:
    result = union([ContainerSidecar(2, ()), ContainerSidecar(1, (c("aaa"),))])
    assert result == ContainerSidecar(2, (c("aaa"),))


def test_union_accepts_generator() -> None:
    result = union(ContainerSidecar(1, (c(str(i)),)) for i in range(3))
    assert result == ContainerSidecar(1, (c("0"), c("1"), c("2")))


def test_only_a_regular_companion_of_bounded_size_is_read(tmp_path: Path) -> None:
    """A link to /dev/zero, or a runaway file, would be read whole into a process whose
    limit is 128 MiB; a FIFO would block the read forever."""
    link = tmp_path / "link.containers"
    link.symlink_to("/dev/zero")
    fifo = tmp_path / "fifo.containers"
    os.mkfifo(fifo)
    huge = tmp_path / "huge.containers"
    with huge.open("wb") as handle:
        handle.truncate(MAX_BYTES + 1)
    for path, reason in (
        (link, "a symbolic link, not a regular file"),
        (fifo, "a FIFO, not a regular file"),
        (huge, f"companion is {MAX_BYTES + 1:,} bytes"),
    ):
        with pytest.raises(CompanionError, match=reason) as caught:
            read_companion(path)
        assert caught.value.path == str(path)
    just_right = tmp_path / "ok.containers"
    just_right.write_bytes(encode(ContainerSidecar(version=1, containers=())))
    assert read_companion(just_right).containers == ()

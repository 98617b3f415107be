"""The `.containers` companion the Rust monitor writes next to each parquet file.

The monitor serializes a ``ContainerSidecar`` with bincode 1.x default options: little-endian,
fixed-width integers, u64 length prefixes for strings, sequences and maps, and a u8 tag (0 = none,
1 = some) before an option's value. Version 2 appends ``labels`` to every container.

A companion is an input we did not write, possibly truncated by a crash or cut short by a full
disk, so ``decode`` trusts nothing: every short read, bad tag, bad UTF-8 sequence, implausible count
and trailing byte becomes a ``CompanionError`` naming the file, never a stray ``struct.error`` or
``UnicodeDecodeError`` that the caller would not know to catch.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from . import durable
from .errors import CompanionError

SUPPORTED_VERSIONS = (1, 2)
# A container takes ~200 bytes, up to ~2 KB with labels; a node runs at most a few hundred.
# 4 MiB is ten times the largest plausible companion and bounds what one can cost in memory.
MAX_BYTES = 4 * 1024 * 1024

_U64 = struct.Struct("<Q")

# Smallest encodings, used to reject a count before allocating for it: a count the remaining
# bytes cannot possibly hold is corruption, and believing it could make us loop 2**64 times.
_MIN_STRING = _U64.size
_MIN_CONTAINER_V1 = _MIN_STRING + 4 * 1 + _MIN_STRING  # id, four option tags, qos_class
_MIN_CONTAINER_V2 = _MIN_CONTAINER_V1 + 1  # plus the labels option tag
_MIN_LABEL = 2 * _MIN_STRING


@dataclass(frozen=True)
class Container:
    """One container the monitor saw while writing the parquet file next to the companion."""

    container_id: str
    pod_name: str | None
    container_name: str | None
    namespace: str | None
    pod_uid: str | None
    qos_class: str
    labels: tuple[tuple[str, str], ...] | None = None


@dataclass(frozen=True)
class ContainerSidecar:
    """A decoded companion; ``version`` is kept so a re-encode writes what a reader expects."""

    version: int
    containers: tuple[Container, ...]


class _Reader:
    """A cursor over the bytes so that every failure can report the offset and field it hit."""

    def __init__(self, data: bytes, path: str | Path) -> None:
        self._data = data
        self._path = path
        self.offset = 0

    def error(self, reason: str) -> CompanionError:
        return CompanionError(reason, self._path)

    @property
    def remaining(self) -> int:
        return len(self._data) - self.offset

    def _take(self, size: int, field: str) -> bytes:
        if size > self.remaining:
            raise self.error(
                f"truncated at byte {self.offset} reading {field}: "
                f"need {size} bytes, {self.remaining} left"
            )
        chunk = self._data[self.offset : self.offset + size]
        self.offset += size
        return chunk

    def u8(self, field: str) -> int:
        return self._take(1, field)[0]

    def u64(self, field: str) -> int:
        value: int = _U64.unpack(self._take(_U64.size, field))[0]
        return value

    def count(self, field: str, min_item_size: int) -> int:
        """Read a length prefix and refuse it if the rest of the data could not hold that many."""
        start = self.offset
        n = self.u64(f"{field} count")
        if n * min_item_size > self.remaining:
            raise self.error(
                f"implausible {field} count {n} at byte {start}: only {self.remaining} bytes left"
            )
        return n

    def string(self, field: str) -> str:
        length = self.u64(f"{field} length")
        start = self.offset
        raw = self._take(length, field)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self.error(f"invalid UTF-8 in {field} at byte {start + exc.start}") from None

    def option_tag(self, field: str) -> bool:
        start = self.offset
        tag = self.u8(f"{field} option tag")
        if tag not in (0, 1):
            raise self.error(f"bad option tag {tag} for {field} at byte {start} (expected 0 or 1)")
        return tag == 1

    def option_string(self, field: str) -> str | None:
        return self.string(field) if self.option_tag(field) else None


def _decode_container(reader: _Reader, version: int, index: int) -> Container:
    where = f"container {index}"
    container_id = reader.string(f"{where} container_id")
    pod_name = reader.option_string(f"{where} pod_name")
    container_name = reader.option_string(f"{where} container_name")
    namespace = reader.option_string(f"{where} namespace")
    pod_uid = reader.option_string(f"{where} pod_uid")
    qos_class = reader.string(f"{where} qos_class")
    labels: tuple[tuple[str, str], ...] | None = None
    if version >= 2 and reader.option_tag(f"{where} labels"):
        n = reader.count(f"{where} labels", _MIN_LABEL)
        labels = tuple(
            (reader.string(f"{where} label {i} key"), reader.string(f"{where} label {i} value"))
            for i in range(n)
        )
    return Container(
        container_id=container_id,
        pod_name=pod_name,
        container_name=container_name,
        namespace=namespace,
        pod_uid=pod_uid,
        qos_class=qos_class,
        labels=labels,
    )


def decode(data: bytes, path: str | Path = "<bytes>") -> ContainerSidecar:
    """Decode a whole companion; ``path`` only names the source in errors."""
    reader = _Reader(data, path)
    version = reader.u8("version")
    if version not in SUPPORTED_VERSIONS:
        raise reader.error(
            f"unsupported companion version {version} (this reader understands 1 and 2)"
        )
    min_container = _MIN_CONTAINER_V2 if version >= 2 else _MIN_CONTAINER_V1
    n = reader.count("containers", min_container)
    containers = tuple(_decode_container(reader, version, i) for i in range(n))
    if reader.remaining:
        raise reader.error(
            f"{reader.remaining} trailing bytes after the companion ended at byte {reader.offset}"
        )
    return ContainerSidecar(version=version, containers=containers)


def _encode_string(out: bytearray, value: str) -> None:
    raw = value.encode("utf-8")
    out += _U64.pack(len(raw))
    out += raw


def _encode_option_string(out: bytearray, value: str | None) -> None:
    if value is None:
        out.append(0)
    else:
        out.append(1)
        _encode_string(out, value)


def encode(sidecar: ContainerSidecar) -> bytes:
    """Encode byte-for-byte as the monitor would, so a union we write reads back in Rust too.

    Raises ``ValueError`` for a sidecar the format cannot carry: an unknown version, or labels
    on a version 1 sidecar (dropping them silently would lose data).
    """
    if sidecar.version not in SUPPORTED_VERSIONS:
        raise ValueError(f"cannot encode companion version {sidecar.version}")
    out = bytearray([sidecar.version])
    out += _U64.pack(len(sidecar.containers))
    for c in sidecar.containers:
        if sidecar.version == 1 and c.labels is not None:
            raise ValueError(
                f"container {c.container_id} has labels, which version 1 cannot represent"
            )
        _encode_string(out, c.container_id)
        _encode_option_string(out, c.pod_name)
        _encode_option_string(out, c.container_name)
        _encode_option_string(out, c.namespace)
        _encode_option_string(out, c.pod_uid)
        _encode_string(out, c.qos_class)
        if sidecar.version >= 2:
            if c.labels is None:
                out.append(0)
            else:
                out.append(1)
                out += _U64.pack(len(c.labels))
                for key, value in c.labels:
                    _encode_string(out, key)
                    _encode_string(out, value)
    return bytes(out)


def read_companion(path: Path) -> ContainerSidecar:
    """Read and decode one companion; I/O failures surface as ``CompanionError`` like corruption,
    because to the caller both mean the same thing: this source cannot be merged as it is.
    Only a regular file of at most MAX_BYTES is read: a link to /dev/zero or a runaway file
    would otherwise be read whole into a process whose limit is 128 MiB."""
    try:
        with durable.open_regular(path) as handle:
            size = os.fstat(handle.fileno()).st_size
            if size > MAX_BYTES:
                raise CompanionError(
                    f"companion is {size:,} bytes, more than the {MAX_BYTES:,} a list of"
                    " containers can take",
                    path,
                )
            data = handle.read(size + 1)  # one more: a file still growing shows it
    except OSError as exc:
        raise CompanionError(f"cannot read companion: {exc.strerror or exc}", path) from exc
    if len(data) > MAX_BYTES:
        raise CompanionError(f"companion grew past {MAX_BYTES:,} bytes while read", path)
    return decode(data, path)


def union(sidecars: Iterable[ContainerSidecar]) -> ContainerSidecar | None:
    """Merge the companions of files being consolidated into the one for their output.

    The first occurrence of a container id keeps its place and its values, so the result is
    deterministic given the order of the inputs; what it does not know (an option that is
    none) a later occurrence fills in (`_filled`). The version is the highest among the
    inputs so that no labels are lost; version 1 containers then simply carry no labels.
    ``None`` means there was nothing to merge, which is different from an empty companion.
    """
    version: int | None = None
    seen: dict[str, Container] = {}
    for sidecar in sidecars:
        version = sidecar.version if version is None else max(version, sidecar.version)
        for container in sidecar.containers:
            known = seen.get(container.container_id)
            # a dict keeps the key's place
            seen[container.container_id] = container if known is None else _filled(known, container)
    if version is None:
        return None
    return ContainerSidecar(version=version, containers=tuple(seen.values()))


# What places a container; entries that disagree on one describe two, and are not mixed.
_PLACE = ("pod_name", "container_name", "namespace", "pod_uid")
# What a companion may not know yet of a container, or not at all (labels before version 2).
_OPTIONS = (*_PLACE, "labels")


def _filled(known: Container, later: Container) -> Container:
    """`known` with the options it lacks taken from a later occurrence: a monitor upgraded
    mid-window lists a container in a version 1 companion, then with its labels in version 2
    ones, and one may list a container before it knows the pod; keeping the first occurrence
    whole dropped what the later ones said from the viewer. A later occurrence that places
    the container elsewhere (another pod, say) fills in nothing: one record made of two
    would describe neither."""
    if any(
        getattr(known, name) is not None
        and getattr(later, name) is not None
        and getattr(known, name) != getattr(later, name)
        for name in _PLACE
    ):
        return known
    learnt = {
        name: getattr(later, name)
        for name in _OPTIONS
        if getattr(known, name) is None and getattr(later, name) is not None
    }
    return replace(known, **learnt) if learnt else known


def missing_from(outer: ContainerSidecar, inner: ContainerSidecar) -> set[str]:
    """The container ids `inner` lists and `outer` lacks. The viewer knows a container by its
    id, so an output's companion lacking none of a source's stands for it, and the source's
    may go with the source."""
    return {c.container_id for c in inner.containers} - {c.container_id for c in outer.containers}

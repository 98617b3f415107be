"""Prove that every row of some files is among the rows of another, in bounded memory.

Lineage recovery deletes a file only once its output is shown to hold every row of it. Outputs
are laid out by metric, so a source's rows are spread over its output rather than found at an
offset: the proof counts row fingerprints instead, and hands each output row to one source
only, so it stays exact for rows two sources share.

Each file is read once. A row's fingerprint (a 128-bit digest of its exact values) goes to one
of several anonymous bucket files by its value, the output's first, then the sources' in
order, and one bucket at a time is counted, by Arrow, from the file's bytes. The buckets were
once counted by reading and fingerprinting every file again per bucket, with a bucket's
fingerprints held as Python integers, and each row digested from the repr of its Python
values: an output of 900,000 rows and its 40 sources took 214 MiB and 8.3 s of CPU to prove
at start-up (map era: 310 MiB and 136 s), more than the sidecar's memory. Now 96.2 MiB and
3.7 s (map: 96.9 MiB and 4.6 s; `scripts/bench_recovery.py`), and more rows take more
buckets, not more memory. The fingerprints cost 16 bytes a row on disk, beside the output,
while the proof runs.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, TypeVar

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import reading
from .errors import ProofStopped
from .schemas import conform, is_label, is_text_or_bytes

T = TypeVar("T")
StopCheck = Callable[[], bool]

# Rows of a bucket, counted in memory at once: Arrow's hashing of 16-byte digests peaks at
# about 125 bytes a row. More rows take more buckets, not more memory, up to MAX_BUCKETS
# files open at once (12.8 million rows, an output of 1.6 hours of a busy node); past that a
# bucket grows instead.
BUCKET_ROWS = 50_000
MAX_BUCKETS = 256
# Rows fingerprinted at once: each becomes its bytes (a few hundred, in Arrow) and two Python
# objects, those bytes and their digest. 8,192 rows took 15 MiB more at peak on the map era,
# whose labels are a map of about eight entries a row, each taken apart; the CPU was the same.
BATCH_ROWS = 4_096
DIGEST_BYTES = 16


def rows_not_found(
    output: Path,
    sources: Sequence[Path],
    *,
    drop_labels: bool = False,
    should_stop: StopCheck | None = None,
) -> Counter[str]:
    """How many rows of each source are not among the output's (a source absent from the
    answer is proven held); each output row counts for one source row only.

    `drop_labels`: a source's label columns that the output lacks are left out of its rows.
    A row then matches more easily, never less: right for asking whether none matches, and
    never for a proof that a source is held (it would hold without those labels).
    `should_stop`: asked before each batch; ProofStopped once it says so."""
    schema = pq.read_schema(output)
    rows = max(pq.read_metadata(output).num_rows, sum(_rows(source) for source in sources))
    count = min(MAX_BUCKETS, max(1, -(-rows // BUCKET_ROWS)))
    with _Buckets(output.parent, count) as buckets:
        buckets.add(stoppable(_fingerprints_of(output, schema), should_stop))
        for position, source in enumerate(sources):
            digests = _fingerprints_of(source, schema, drop_labels)
            buckets.add(stoppable(digests, should_stop), source=position)
        missing: Counter[str] = Counter()
        for position, lost in buckets.unmatched():
            missing[sources[position].name] += lost
    return missing


def stoppable(batches: Iterator[T], should_stop: StopCheck | None) -> Iterator[T]:
    """`batches`, asking `should_stop` before each. A proof reads a whole output and every
    source beside it, a minute of CPU for a busy node's output of 480 files: at start-up it
    outlasted Kubernetes' 30 s between SIGTERM and SIGKILL."""
    for batch in batches:
        if should_stop is not None and should_stop():
            raise ProofStopped("the service is stopping; proved again at the next start")
        yield batch


def _rows(path: Path) -> int:
    return int(pq.read_metadata(path).num_rows)


class _Buckets:
    """Fingerprints split by value into anonymous files, so that one bucket at a time holds
    what must be counted: first every output fingerprint, then the sources', in order."""

    def __init__(self, folder: Path, count: int) -> None:
        self._files: list[IO[bytes]] = []
        self._folder = folder
        self._count = count
        self._output_rows = [0] * count  # per bucket: the output's fingerprints come first
        self._runs: list[list[list[int]]] = [[] for _ in range(count)]  # [source, rows] runs

    def __enter__(self) -> _Buckets:
        try:
            for _ in range(self._count):
                self._files.append(tempfile.TemporaryFile(dir=self._folder))
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        for file in self._files:
            file.close()
        self._files.clear()

    def add(self, digests: Iterator[list[bytes]], source: int | None = None) -> None:
        """Digests of the output (`source` None, before any source's) or of one source."""
        for batch in digests:
            split: list[list[bytes]] = [[] for _ in range(self._count)]
            for digest in batch:
                split[int.from_bytes(digest[:8], "little") % self._count].append(digest)
            for bucket, found in enumerate(split):
                if not found:
                    continue
                self._files[bucket].write(b"".join(found))
                if source is None:
                    self._output_rows[bucket] += len(found)
                else:
                    self._note_run(bucket, source, len(found))

    def _note_run(self, bucket: int, source: int, rows: int) -> None:
        runs = self._runs[bucket]
        if runs and runs[-1][0] == source:
            runs[-1][1] += rows
        else:
            runs.append([source, rows])

    def unmatched(self) -> Iterator[tuple[int, int]]:
        """(source, rows) of source rows no output row is left for, bucket after bucket."""
        for bucket, file in enumerate(self._files):
            yield from _unmatched(_digests(file), self._output_rows[bucket], self._runs[bucket])
            file.close()  # its disk space back before the next bucket is counted


def _digests(file: IO[bytes]) -> pa.FixedSizeBinaryArray:
    """Every digest written to `file`, as one Arrow array over its bytes (no object a row)."""
    file.flush()
    file.seek(0)
    data = file.read()
    if len(data) % DIGEST_BYTES:
        raise OSError(f"a fingerprint bucket holds {len(data)} bytes, not whole digests")
    rows = len(data) // DIGEST_BYTES
    return pa.Array.from_buffers(pa.binary(DIGEST_BYTES), rows, [None, pa.py_buffer(data)])


def _unmatched(
    digests: pa.FixedSizeBinaryArray, output_rows: int, runs: list[list[int]]
) -> Iterator[tuple[int, int]]:
    """One bucket: the output's digests, then each source's, in `runs` ([source, rows]).

    Counted by Arrow's hashing: when no digest is wanted more often than the output has it,
    which is the answer whenever the files are held, every row is proven at once. Otherwise
    only the digests in short supply are handed out, row by row, in source order.
    """
    if len(digests) != output_rows + sum(rows for _source, rows in runs):
        raise OSError(f"a fingerprint bucket holds {len(digests)} digests, not as many as written")
    have = pc.value_counts(digests.slice(0, output_rows))
    theirs = digests.slice(output_rows)
    need = pc.value_counts(theirs)
    wanted = need.field("values")
    short = pc.filter(wanted, pc.greater(need.field("counts"), _counts_of(wanted, have)))
    if len(short) == 0:
        return
    left = dict(zip(short.to_pylist(), _counts_of(short, have).to_pylist(), strict=True))
    ends = list(itertools.accumulate(rows for _source, rows in runs))
    lost: Counter[int] = Counter()
    for row in pc.indices_nonzero(pc.is_in(theirs, value_set=short)).to_pylist():
        digest = theirs[row].as_py()
        if left[digest] > 0:
            left[digest] -= 1
        else:
            lost[runs[bisect.bisect_right(ends, row)][0]] += 1
    yield from lost.items()


def _counts_of(wanted: pa.Array, have: pa.StructArray) -> pa.Array:
    """How often the output has each digest of `wanted` (`have`: its value counts)."""
    places = pc.index_in(wanted, value_set=have.field("values"))
    return pc.coalesce(pc.take(have.field("counts"), places), 0)


def _fingerprints_of(
    path: Path, schema: pa.Schema, drop_labels: bool = False
) -> Iterator[list[bytes]]:
    """Each row's digest, a batch at a time, its values taken as the output's `schema`. Text
    the file stores plain under a dictionary type is read plain and encoded batch by batch,
    as the merge reads it, and so typed as the file says: a map-era output of long distinct
    labels and its sources took 273 MiB to prove, read as they say."""
    parquet, footer = reading.open_file(path)
    stored = reading.dictionary_types(footer.schema)
    with parquet:
        for batch in reading.batches(parquet, BATCH_ROWS, use_threads=False):
            batch = reading.encoded_as(batch, stored)
            if drop_labels:
                kept = [n for n in batch.schema.names if n in schema.names or not is_label(n)]
                batch = batch.select(kept)
            yield fingerprints(conform(batch, schema))


def fingerprints(batch: pa.RecordBatch) -> list[bytes]:
    """A 128-bit digest of each row's exact values. Python's own hash of a row was used here,
    and it hashes 0.0 like -0.0 and 0 like 2**61 - 1: a file differing from the output only
    so was proven held, and removed.

    A row's bytes are put together by Arrow, column by column, so that Python touches one
    object a row (the repr of a row's values, built in Python, was two thirds of the proof's
    CPU). They read back one way only: a fixed-width value is `v` and its stored bytes, a
    null `n`; a value of variable length is its length (8 bytes, -1 for null) and its bytes.
    So rows with different values never share their bytes.
    """
    pieces = [piece for column in batch.columns for piece in _value_bytes(column)]
    blake2b = hashlib.blake2b
    if not pieces:
        return [blake2b(b"", digest_size=DIGEST_BYTES).digest()] * batch.num_rows
    rows = pc.binary_join_element_wise(*pieces, _EMPTY).to_pylist()
    return [blake2b(row, digest_size=DIGEST_BYTES).digest() for row in rows]


_BYTES = pa.large_binary()
_EMPTY = pa.scalar(b"", _BYTES)
_VALID = pa.scalar(b"v", _BYTES)
_NULL = pa.scalar(b"n", _BYTES)


def _value_bytes(column: pa.Array) -> list[pa.Array]:
    """`column`'s values as pieces of each row's bytes (large binary, no nulls), which read
    back one way only whatever follows them."""
    kind = column.type
    if pa.types.is_dictionary(kind):
        return _value_bytes(column.dictionary_decode())
    if pa.types.is_boolean(kind):
        return _value_bytes(pc.cast(column, pa.int8()))
    if pa.types.is_null(kind):
        return [pa.repeat(_NULL, len(column))]
    if _fixed_width(kind):  # integers, floats (0.0 and -0.0 differ), times, decimals
        stored = pc.cast(column.view(pa.binary(kind.bit_width // 8)), _BYTES)
        return [pc.if_else(pc.is_valid(column), _VALID, _NULL), pc.fill_null(stored, _EMPTY)]
    if pa.types.is_struct(kind):
        fields = [piece for field in column.flatten() for piece in _value_bytes(field)]
        return [pc.if_else(pc.is_valid(column), _VALID, _NULL), *fields]
    if _is_bytes(kind):
        values = pc.cast(column, _BYTES)
    elif pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_map(kind):
        values = _joined_lists(column)
    else:  # anything else (unions, fixed-size lists) by the repr of its Python value
        values = pa.array(
            [None if v is None else repr(_hashable(v)).encode() for v in column.to_pylist()],
            _BYTES,
        )
    lengths = pc.fill_null(pc.cast(pc.binary_length(values), pa.int64()), -1)
    return [pc.cast(lengths.view(pa.binary(8)), _BYTES), pc.fill_null(values, _EMPTY)]


def _joined_lists(column: pa.ListArray) -> pa.Array:
    """Each list's elements' bytes one after the other (null for a null list): a map's
    entries, in their order, each its key and value."""
    offsets = column.offsets
    first, last = offsets[0].as_py(), offsets[-1].as_py()
    elements = column.values.slice(first, last - first)
    element_bytes = pc.binary_join_element_wise(*_value_bytes(elements), _EMPTY)
    starts = pc.cast(pc.subtract(offsets, first), pa.int64())
    lists = pa.LargeListArray.from_arrays(starts, element_bytes, mask=pc.is_null(column))
    return pc.binary_join(lists, _EMPTY)


def _fixed_width(kind: pa.DataType) -> bool:
    stored = (
        pa.types.is_integer(kind)
        or pa.types.is_floating(kind)
        or pa.types.is_temporal(kind)
        or pa.types.is_decimal(kind)
    )
    return bool(stored and kind.bit_width % 8 == 0)


def _is_bytes(kind: pa.DataType) -> bool:
    return is_text_or_bytes(kind) or bool(pa.types.is_fixed_size_binary(kind))


def _hashable(value: object) -> object:
    """Equal nested values, equal reprs: every NaN is one value here, and map entries are
    tuples (the repr of a float tells -0.0 from 0.0)."""
    if isinstance(value, float) and value != value:
        return ("NaN",)
    if isinstance(value, list | tuple):
        return tuple(_hashable(item) for item in value)
    return value

"""Footers are read once per version of a file, and a changed file is read again."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fgm_consolidator import footers
from fgm_consolidator.schemas import LINEAGE_KEY


@pytest.fixture
def parses(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Every footer parse, recorded: a cache hit must not open the file at all."""
    seen: list[object] = []
    real = pq.ParquetFile

    def counting(source: object, *args: object, **kwargs: object) -> pq.ParquetFile:
        seen.append(source)
        return real(source, *args, **kwargs)

    monkeypatch.setattr(footers.pq, "ParquetFile", counting)
    monkeypatch.setattr(footers, "_seen", type(footers._seen)())
    return seen


def write(path: Path, rows: int, key: bytes = b"v") -> None:
    table = pa.table({"x": pa.array(range(rows), pa.int64())}).replace_schema_metadata({b"k": key})
    pq.write_table(table, path)


def test_an_unchanged_file_is_parsed_once(tmp_path: Path, parses: list[object]) -> None:
    path = tmp_path / "a.parquet"
    write(path, 3)
    first, again = footers.read(path), footers.read(path)
    assert again is first and len(parses) == 1
    assert (first.rows, first.schema.names, first.schema.metadata[b"k"]) == (3, ["x"], b"v")


def test_a_file_with_a_new_identity_is_read_again(tmp_path: Path, parses: list[object]) -> None:
    path = tmp_path / "a.parquet"
    write(path, 3)
    assert footers.read(path).rows == 3
    replacement = tmp_path / "b.parquet"
    write(replacement, 5, b"w")
    os.replace(replacement, path)
    fresh = footers.read(path)
    assert (fresh.rows, fresh.schema.metadata[b"k"], len(parses)) == (5, b"w", 2)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # touched: read again
    assert footers.read(path) is not fresh and len(parses) == 3


def test_a_full_memory_keeps_what_it_has_and_reads_only_the_rest_again(
    tmp_path: Path, parses: list[object], monkeypatch: pytest.MonkeyPatch
) -> None:
    """It dropped its oldest entry for each new one: walked in the same order every pass,
    three files through a memory of two were all read again every time."""
    monkeypatch.setattr(footers, "CAPACITY", 2)
    paths = [tmp_path / f"{n}.parquet" for n in range(3)]
    for path in paths:
        write(path, 1)
    for _pass in range(3):
        for path in paths:
            footers.read(path)
    assert list(footers._seen) == paths[:2]
    assert len(parses) == 5  # each file once, and the one beyond the memory every time


def test_what_no_pass_looked_at_is_forgotten_when_the_next_starts(
    tmp_path: Path, parses: list[object]
) -> None:
    """A file merged away, or a folder removed, leaves an entry no pass reads again."""
    kept, gone = tmp_path / "kept.parquet", tmp_path / "gone.parquet"
    write(kept, 1)
    write(gone, 1)
    footers.next_pass()
    footers.read(kept)
    footers.read(gone)
    footers.next_pass()
    footers.read(kept)
    footers.next_pass()  # `gone` was not looked at in the pass that ended
    assert list(footers._seen) == [kept]
    footers.next_pass()
    assert list(footers._seen) == []
    assert len(parses) == 2


def test_a_file_that_does_not_read_raises_and_is_not_remembered(
    tmp_path: Path, parses: list[object]
) -> None:
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"not parquet")
    with pytest.raises(pa.ArrowException):
        footers.read(path)
    assert path not in footers._seen


def test_files_with_one_schema_share_it_and_lineage_stays_out_of_it(
    tmp_path: Path, parses: list[object]
) -> None:
    for name, lineage in (("a", b'{"merge_id":1}'), ("b", b'{"merge_id":2}')):
        table = pa.table({"x": pa.array([1], pa.int64())})
        meta = {b"k": b"v", LINEAGE_KEY: lineage}
        pq.write_table(table.replace_schema_metadata(meta), tmp_path / f"{name}.parquet")
    a, b = footers.read(tmp_path / "a.parquet"), footers.read(tmp_path / "b.parquet")
    assert a.schema is b.schema and a.schema.metadata == {b"k": b"v"}
    assert (a.lineage, b.lineage) == (b'{"merge_id":1}', b'{"merge_id":2}')


def test_digest_now_reads_past_the_cache(tmp_path: Path, parses: list[object]) -> None:
    """The cache knows a file by its identity, which a new file can take over: `digest_now`
    hashes the bytes there now, and says None for a file without a complete footer."""
    path = tmp_path / "a.parquet"
    write(path, 3)
    cached = footers.read(path)
    assert footers.digest_now(path) == cached.digest
    st = path.stat()
    write(path, 3, key=b"w")  # same rows, other footer
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert footers.digest_now(path) not in (None, cached.digest)
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])  # the monitor, mid-window
    assert footers.digest_now(path) is None
    path.write_bytes(whole[:-4] + b"PAR!")
    assert footers.digest_now(path) is None
    path.write_bytes(b"PAR1")
    assert footers.digest_now(path) is None
    with pytest.raises(FileNotFoundError):  # says nothing of what a file holds: raised
        footers.digest_now(tmp_path / "gone.parquet")


def _distinct_text(rows: int, width: int) -> list[str]:
    return [f"{row:0{width}d}" for row in range(rows)]


@pytest.mark.parametrize(
    ("column", "values", "plain"),
    [
        # distinct labels of 56 bytes: the dictionary page fills and the rest is stored plain
        ("l_pod_name", _distinct_text(40_000, 56), True),
        # the monitor writes metric names plain; they are few, and read as a dictionary
        ("metric_name", [f"{'m' * 40}.{row % 50}" for row in range(40_000)], False),
        # unless they are long and distinct: 1 KB names took 158 MiB read as a dictionary
        ("metric_name", _distinct_text(4_000, 1024), True),
        # a label the monitor dictionary-encodes, a few values over many rows
        ("l_container_id", [f"{row % 45:064d}" for row in range(40_000)], False),
        # a row group of a row per metric: its dictionary page alone passes the line
        ("l_container_id", [f"{row % 45:064d}" for row in range(50)], False),
    ],
    ids=[
        "distinct-56-byte-label",
        "metric-names",
        "distinct-1-KB-metric-names",
        "few-container-ids",
        "one-row-a-metric",
    ],
)
def test_text_stored_mostly_plain_is_found_by_its_stored_bytes(
    tmp_path: Path, column: str, values: list[str], plain: bool
) -> None:
    """Found columns are read plain and encoded batch by batch (`writer.py`); read as a
    dictionary, distinct labels of 56 bytes took 162 MiB for three 200,000-row sources."""
    path = tmp_path / "metrics-20250101T000000Z.parquet"
    table = pa.table({column: pa.array(values, pa.utf8())})
    pq.write_table(table, path, use_dictionary=column != "metric_name")
    assert footers.read(path).plain_text == ({column} if plain else set())


@pytest.mark.parametrize("distinct", [True, False], ids=["one-label-distinct", "all-repeated"])
def test_a_map_leaf_stored_plain_past_its_dictionary_page_is_found_however_short_the_rest(
    tmp_path: Path, distinct: bool
) -> None:
    """A map's value leaf holds every entry's value: with seven short repeated labels and one
    of 120 bytes distinct in every row, it stored 24 bytes a value, under the line, and two
    sources of 100,000 such rows took 343 MiB and 25 s of CPU to merge (now 108 MiB, 1.4 s)
    and 165 MiB to prove after a lost journal. Its dictionary page filled all the same."""
    rows = 20_000
    short = [("namespace", "default"), ("node", "node-1"), ("qos", "Burstable")] * 2
    requests = [f"{row:0120d}" if distinct else "r" for row in range(rows)]
    labels = [
        [("container_id", f"c{row % 45:011d}"), *short, ("request", requests[row])]
        for row in range(rows)
    ]
    path = tmp_path / "metrics-20250101T000000Z.parquet"
    pq.write_table(pa.table({"labels": pa.array(labels, pa.map_(pa.utf8(), pa.utf8()))}), path)
    stored = pq.read_metadata(path).row_group(0).column(1)
    assert stored.path_in_schema == "labels.key_value.value"
    assert stored.total_uncompressed_size < footers.PLAIN_BYTES_PER_VALUE * stored.num_values
    assert footers.read(path).plain_text == ({"labels.key_value.value"} if distinct else set())


def test_a_footer_can_say_another_stored_schema_and_the_file_reads_by_it(
    tmp_path: Path,
) -> None:
    """How `reading.read_plain` reads a map's dictionary-encoded text plain: every row group's
    offsets still point into the file."""
    path = tmp_path / "metrics-20250101T000000Z.parquet"
    text = pa.dictionary(pa.int32(), pa.utf8())
    table = pa.table({"m": pa.array(["a", "b", "a"], text), "v": pa.array([1, 2, 3], pa.int64())})
    pq.write_table(table, path, row_group_size=2)

    def plain(schema: pa.Schema) -> pa.Schema:
        return pa.schema([schema.field("m").with_type(pa.utf8()), schema.field("v")])

    with open(path, "rb") as handle:
        rewritten = footers.with_stored_schema(handle, plain)
        assert footers.with_stored_schema(handle, lambda schema: schema) is None
    assert rewritten is not None
    read = pq.ParquetFile(path, metadata=rewritten).read()
    assert read.schema.field("m").type == pa.utf8()
    assert read.column("m").to_pylist() == ["a", "b", "a"]
    assert read.column("v").to_pylist() == [1, 2, 3]


def test_a_footer_without_a_stored_schema_is_not_rewritten(tmp_path: Path) -> None:
    path = tmp_path / "metrics-20250101T000000Z.parquet"
    pq.write_table(pa.table({"m": ["a"]}), path, store_schema=False)
    with open(path, "rb") as handle:
        assert footers.with_stored_schema(handle, lambda schema: schema.remove_metadata()) is None

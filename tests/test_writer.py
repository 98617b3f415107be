import hashlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import data_files

from fgm_consolidator.durable import identity
from fgm_consolidator.errors import MergeAborted, SourceChangedError, SourceReadError
from fgm_consolidator.schemas import unify
from fgm_consolidator.simulate import PodSpec
from fgm_consolidator.writer import WriteOptions, WriteSource, write_merged


@pytest.fixture
def sources(data_dir: Path, populate) -> list[Path]:  # type: ignore[no-untyped-def]
    populate(PodSpec("pod-a"), rotations=6)
    return data_files(data_dir)


def write(paths: list[Path], target: Path, **kwargs) -> object:  # type: ignore[no-untyped-def]
    schema = unify([pq.read_schema(p) for p in paths])
    inputs = [WriteSource(p, identity(p), pq.read_metadata(p).num_rows) for p in paths]
    options = kwargs.pop("options", WriteOptions())
    return write_merged(inputs, target, schema, options, metadata={b"k": b"v"}, **kwargs)


def test_output_holds_every_row_in_source_order(sources: list[Path], tmp_path: Path) -> None:
    target = tmp_path / "out.parquet.tmp"
    result = write(sources, target)
    expected = pa.concat_tables(
        [pq.read_table(p) for p in sources], promote_options="default"
    ).to_pylist()
    got = pq.read_table(target).to_pylist()
    assert len(got) == result.rows == len(expected)
    assert [r["time"] for r in got] == [r["time"] for r in expected]
    assert [r["metric_name"] for r in got] == [r["metric_name"] for r in expected]
    assert result.checksum == hashlib.sha256(target.read_bytes()).hexdigest()
    assert result.size == target.stat().st_size
    assert pq.read_schema(target).metadata[b"k"] == b"v"


def test_row_groups_are_cut_by_the_byte_budget(sources: list[Path], tmp_path: Path) -> None:
    one_batch = pq.read_table(sources[0]).nbytes
    target = tmp_path / "out.parquet.tmp"
    result = write(sources, target, options=WriteOptions(row_group_bytes=one_batch * 2))
    metadata = pq.read_metadata(target)
    assert result.row_groups == metadata.num_row_groups == 3
    sizes = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
    assert sizes == [180, 180, 180]


def test_an_existing_target_is_never_overwritten(sources: list[Path], tmp_path: Path) -> None:
    target = tmp_path / "out.parquet.tmp"
    target.write_bytes(b"precious")
    with pytest.raises(FileExistsError):
        write(sources, target)
    assert target.read_bytes() == b"precious"


def test_a_corrupt_source_is_named_and_the_partial_output_removed(
    sources: list[Path], tmp_path: Path
) -> None:
    victim = sources[3]
    good_footer = pq.read_metadata(victim).num_rows
    data = bytearray(victim.read_bytes())
    data[4:200] = b"\x00" * 196  # break the data pages, keep the footer
    victim.write_bytes(bytes(data))
    assert pq.read_metadata(victim).num_rows == good_footer
    target = tmp_path / "out.parquet.tmp"
    with pytest.raises(SourceReadError) as info:
        write(sources, target)
    assert info.value.path == str(victim)
    assert not target.exists()


def test_a_source_changed_since_planning_stops_the_write(
    sources: list[Path], tmp_path: Path
) -> None:
    schema = unify([pq.read_schema(p) for p in sources])
    planned = [WriteSource(p, identity(p), pq.read_metadata(p).num_rows) for p in sources]
    with open(sources[1], "ab") as handle:
        handle.write(b"x")
    target = tmp_path / "out.parquet.tmp"
    with pytest.raises(SourceChangedError):
        write_merged(planned, target, schema, WriteOptions(), metadata={})
    assert not target.exists()


def test_an_abort_request_removes_the_partial_output(sources: list[Path], tmp_path: Path) -> None:
    target = tmp_path / "out.parquet.tmp"
    calls = []

    def abort() -> bool:
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(MergeAborted):
        write(sources, target, should_abort=abort)
    assert not target.exists()
    assert len(calls) == 3

"""The oracle must be able to fail: each of its six conditions, broken on purpose on a settled
data directory, is reported; the untouched directory is not."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import clone_tree, small_spec
from oracle import (
    RowKey,
    check,
    expected_rows,
    journal_records,
    quiescent_pass,
    row_keys,
    viewer_containers,
)

from fgm_consolidator import companions
from fgm_consolidator.journal import Journal
from fgm_consolidator.layout import default_journal_path
from fgm_consolidator.plan import Policy
from fgm_consolidator.simulate import PodSpec, generate

POD_A = "dt=2025-12-30/identifier=pod-a"
POLICY = Policy(min_files=2, min_age_s=0)


@dataclass(frozen=True)
class Settled:
    data_dir: Path
    before: Path  # hard links to the sources, taken before they were merged
    expected: Counter[RowKey]


@pytest.fixture(scope="module")
def settled(tmp_path_factory: pytest.TempPathFactory) -> Settled:
    """Two partitions, each merged into one output; the expected rows read before the merge."""
    root = tmp_path_factory.mktemp("oracle")
    data_dir = root / "data"
    data_dir.mkdir()
    generate(data_dir, small_spec((PodSpec("pod-a"), PodSpec("pod-b")), rotations=6))
    expected = expected_rows(data_dir)
    before = clone_tree(data_dir, root / "before")
    assert quiescent_pass(data_dir, POLICY) == 0
    return Settled(data_dir, before, expected)


def output(data_dir: Path) -> Path:
    return next((data_dir / POD_A).glob("consolidated-*.parquet"))


def lose_a_row(data_dir: Path) -> None:
    """Rewrite the output one row short (a new inode, as a careless tool would)."""
    path = output(data_dir)
    table = pq.read_table(path)
    path.unlink()
    pq.write_table(table.slice(1), path)


def duplicate_a_source(data_dir: Path) -> None:
    path = output(data_dir)
    pq.write_table(
        pq.read_table(path).slice(0, 5), path.with_name("metrics-20251230T090000Z.parquet")
    )


def tear_the_output(data_dir: Path) -> None:
    """A torn copy under the output's name (never truncate in place: the inode is shared)."""
    path = output(data_dir)
    data = path.read_bytes()
    path.unlink()
    path.write_bytes(data[:-100])


def leave_a_tmp(data_dir: Path) -> None:
    (data_dir / POD_A / (output(data_dir).name + ".tmp")).write_bytes(b"partial")


def leave_a_merge_unfinished(data_dir: Path) -> None:
    """A merge planned and never resolved (recovery would roll it back)."""
    journal = Journal.open(default_journal_path(data_dir))
    try:
        journal.record_planned(
            partition=POD_A,
            output="consolidated-20251230T090000Z-20251230T091500Z.parquet",
            era="flat",
            policy={},
            sources=[],
            has_companion=False,
        )
    finally:
        journal.close()


def orphan_a_companion(data_dir: Path) -> None:
    (data_dir / POD_A / "metrics-20251230T090000Z.containers").write_bytes(b"\x02" + bytes(8))


def leave_a_recoverable_tmp(data_dir: Path) -> None:
    """A temp file of ours only recovery removes: the first recovery is not a no-op."""
    (data_dir / POD_A / "consolidated-20251230T090000Z-20251230T091500Z.parquet.tmp").touch()


# What recovery itself would repair is checked on the disk as the damage left it.
REPAIRED_BY_RECOVERY = (leave_a_tmp, leave_a_merge_unfinished)
BREAKS: list[tuple[Callable[[Path], None], str]] = [
    (lose_a_row, "expected rows lost"),
    (duplicate_a_source, "rows present more often than written"),
    (tear_the_output, "does not read back"),
    (leave_a_tmp, "temp file left behind"),
    (leave_a_merge_unfinished, "left in state planned"),
    (orphan_a_companion, "companion left without its parquet file"),
    (leave_a_recoverable_tmp, "the first recovery of a recovered directory changed files"),
]


def test_a_settled_directory_passes(settled: Settled) -> None:
    data_dir, expected = settled.data_dir, settled.expected
    report = check(data_dir, expected)
    assert report.violations == []
    assert report.rows_checked == sum(expected.values()) > 0
    assert report.files_checked == 2
    assert report.merges == 2


@pytest.mark.parametrize("damage,message", BREAKS, ids=[b.__name__ for b, _ in BREAKS])
def test_each_broken_condition_is_reported(
    settled: Settled,
    tmp_path: Path,
    damage: Callable[[Path], None],
    message: str,
) -> None:
    data_dir = clone_tree(settled.data_dir, tmp_path / "data")
    damage(data_dir)
    idempotence = damage not in REPAIRED_BY_RECOVERY
    violations = check(data_dir, settled.expected, idempotence=idempotence).violations
    assert any(message in v for v in violations), violations


def test_journal_against_disk(settled: Settled, tmp_path: Path) -> None:
    """A journaled source back under its name (same inode, size and mtime), and an output whose
    rows are right but whose bytes are not the ones journaled."""
    data_dir = clone_tree(settled.data_dir, tmp_path / "data")
    record = next(r for r in journal_records(data_dir) if r.partition == POD_A)
    source = record.sources[2].name
    os.link(settled.before / POD_A / source, data_dir / POD_A / source)
    path = data_dir / POD_A / record.output
    table = pq.read_table(path)
    path.unlink()
    pq.write_table(table, path)
    violations = check(data_dir, settled.expected).violations
    assert any(
        f"{source}: source of finished merge {record.id} still present" in v for v in violations
    ), violations
    assert any("checksum differs" in v for v in violations), violations
    assert any("rows present more often than written" in v for v in violations), violations


def test_row_keys_ignore_layout(settled: Settled) -> None:
    """A row keeps its key whatever columns its file has: the output adds null label columns."""
    data_dir, expected = settled.data_dir, settled.expected
    table = pq.read_table(output(data_dir))
    narrow = table.select([n for n in table.column_names if n != "l_device"])
    assert table.column("l_device").null_count > 0
    keep = [i for i, v in enumerate(table.column("l_device").to_pylist()) if v is None]
    assert row_keys(table.take(keep), POD_A) == row_keys(narrow.take(keep), POD_A)
    assert row_keys(table, POD_A) <= expected


def test_a_container_no_companion_lists_any_more_is_reported(
    settled: Settled, tmp_path: Path
) -> None:
    """The output's companion rewritten without one of its containers: its rows are all
    there, but the viewer no longer lists the container (FORMATS)."""
    data_dir = clone_tree(settled.data_dir, tmp_path / "data")
    expected = viewer_containers(settled.before)
    assert all(expected.values())
    assert check(data_dir, settled.expected, containers=expected).violations == []
    path = output(data_dir).with_suffix(".containers")
    sidecar = companions.read_companion(path)
    path.unlink()  # the inode is shared with the settled directory
    path.write_bytes(
        companions.encode(companions.ContainerSidecar(sidecar.version, sidecar.containers[1:]))
    )
    gone = sidecar.containers[0].container_id
    violations = check(data_dir, settled.expected, containers=expected).violations
    assert any("containers no companion lists any more" in v and gone in v for v in violations)

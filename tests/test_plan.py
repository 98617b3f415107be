"""The planner is a pure function: these tests feed it scans built by hand."""

from datetime import UTC, date, datetime, timedelta

import pyarrow as pa

from fgm_consolidator.durable import FileIdentity
from fgm_consolidator.layout import format_stamp, parse_data_file
from fgm_consolidator.plan import MB, Group, Policy, group_sources, plan_partition
from fgm_consolidator.scan import PartitionScan, SourceFile

DAY = "dt=2025-12-30/identifier=pod-a"
T0 = datetime(2025, 12, 30, 10, 0, 0, tzinfo=UTC)
FLAT = pa.schema([("metric_name", pa.string()), ("l_pod", pa.string())])
MAP = pa.schema([("metric_name", pa.string()), ("labels", pa.map_(pa.string(), pa.string()))])
OPEN_DAY = date(2025, 12, 30)
LATER = date(2026, 1, 5)


def metrics(offset_s: int, size: int = 1000, schema: pa.Schema = FLAT) -> SourceFile:
    name = f"metrics-{format_stamp(T0 + timedelta(seconds=offset_s))}.parquet"
    parsed = parse_data_file(name)
    assert parsed is not None
    return SourceFile(parsed, FileIdentity(offset_s, size, 0), 10, schema, None, 0, name)


def consolidated(start_s: int, end_s: int, size: int = 1000) -> SourceFile:
    start = format_stamp(T0 + timedelta(seconds=start_s))
    end = format_stamp(T0 + timedelta(seconds=end_s))
    parsed = parse_data_file(f"consolidated-{start}-{end}.parquet")
    assert parsed is not None
    return SourceFile(parsed, FileIdentity(start_s + 7, size, 0), 10, FLAT, None, 0, parsed.name)


def scan(*files: SourceFile, young: int = 0, extra: tuple[str, ...] = ()) -> PartitionScan:
    names = frozenset(f.name for f in files) | frozenset(extra)
    return PartitionScan(DAY, None, tuple(files), (), young, names)  # type: ignore[arg-type]


def names(groups: list[Group]) -> list[list[str]]:
    return [[s.name for s in group.sources] for group in groups]


def test_windows_are_aligned_and_bounded_by_max_span() -> None:
    files = [metrics(90 * i) for i in range(80)]  # 10:00:00 .. 11:58:30
    groups = group_sources(files, Policy(max_span_s=3600))
    assert [len(g[0]) for g in groups] == [40, 40]
    assert groups[0][0][-1].name == "metrics-20251230T105830Z.parquet"


def test_size_limit_cuts_a_window() -> None:
    files = [metrics(90 * i, size=30 * MB) for i in range(10)]
    groups = group_sources(files, Policy(max_output_bytes=100 * MB))
    assert [len(g[0]) for g in groups] == [3, 3, 3, 1]


def test_eras_split_groups_in_time_order() -> None:
    files = [metrics(0), metrics(90), metrics(180, schema=MAP), metrics(270, schema=MAP)]
    assert [len(g) for g in names(group_sources(files, Policy()))] == [2, 2]


def test_min_files_counts_waiting_metrics_files_on_an_open_day() -> None:
    few = scan(*(metrics(90 * i) for i in range(9)))
    assert plan_partition(few, Policy(min_files=10), OPEN_DAY) == ([], [])
    enough = scan(*(metrics(90 * i) for i in range(10)))
    plans, skipped = plan_partition(enough, Policy(min_files=10), OPEN_DAY)
    assert [len(p.sources) for p in plans] == [10]
    assert plans[0].output == "consolidated-20251230T100000Z-20251230T101330Z.parquet"
    assert skipped == []


def test_a_closed_day_merges_its_tail_below_min_files() -> None:
    tail = scan(*(metrics(90 * i) for i in range(3)))
    plans, _ = plan_partition(tail, Policy(min_files=10), LATER)
    assert [len(p.sources) for p in plans] == [3]
    still_writing = scan(*(metrics(90 * i) for i in range(3)), young=1)
    assert plan_partition(still_writing, Policy(min_files=10), LATER) == ([], [])


def test_consolidated_outputs_are_merged_again_with_their_neighbours() -> None:
    files = [consolidated(0, 900), consolidated(990, 1800), metrics(1890), metrics(1980)]
    plans, _ = plan_partition(scan(*files), Policy(min_files=2), OPEN_DAY)
    assert len(plans) == 1
    assert plans[0].output == "consolidated-20251230T100000Z-20251230T103300Z.parquet"


def test_a_full_window_is_left_alone() -> None:
    full = consolidated(0, 3510)
    plans, _ = plan_partition(
        scan(full, metrics(3600), metrics(3690)), Policy(min_files=2), OPEN_DAY
    )
    assert [[s.name for s in p.sources] for p in plans] == [
        ["metrics-20251230T110000Z.parquet", "metrics-20251230T110130Z.parquet"]
    ]


def test_a_taken_output_name_is_skipped_not_overwritten() -> None:
    files = [metrics(0), metrics(90)]
    taken = "consolidated-20251230T100000Z-20251230T100130Z.parquet"
    plans, skipped = plan_partition(scan(*files, extra=(taken,)), Policy(min_files=2), OPEN_DAY)
    assert plans == []
    assert [(s.output, s.sources) for s in skipped] == [
        (taken, ("metrics-20251230T100000Z.parquet", "metrics-20251230T100130Z.parquet"))
    ]


def test_single_file_groups_are_not_merges() -> None:
    plans, _ = plan_partition(scan(metrics(0), metrics(3600)), Policy(min_files=2), OPEN_DAY)
    assert plans == []


def test_a_group_never_spans_a_file_left_out_of_this_pass() -> None:
    """Else merging that file later would produce the output's own name, skipped forever."""
    files = [metrics(0), metrics(90), metrics(270), metrics(360)]
    unreadable = "metrics-20251230T100300Z.parquet"  # 10:03:00, between 90 s and 270 s
    plans, _ = plan_partition(scan(*files, extra=(unreadable,)), Policy(min_files=2), OPEN_DAY)
    assert [p.output for p in plans] == [
        "consolidated-20251230T100000Z-20251230T100130Z.parquet",
        "consolidated-20251230T100430Z-20251230T100600Z.parquet",
    ]


def test_a_foreign_file_whose_range_covers_its_neighbours_does_not_swallow_them() -> None:
    """A `consolidated-*` file we did not write (the original consolidator's, say) may span
    hours, or cover stamps of the files beside it. Grouped with them, the output would get that
    file's own name: skipped on every pass, its neighbours never merged, even on a closed day."""
    spans_hours = consolidated(0, 4 * 3600)  # 10:00 .. 14:00, in the 10:00 window
    covers = consolidated(0, 3000)  # 10:00 .. 10:50, all the metrics files below inside it
    for foreign in (spans_hours, covers):
        files = [foreign, *(metrics(900 + 90 * i) for i in range(10))]
        plans, skipped = plan_partition(scan(*files), Policy(min_files=2), LATER)
        assert skipped == []
        assert [[s.name for s in p.sources] for p in plans] == [[f.name for f in files[1:]]]
        assert plans[0].output == "consolidated-20251230T101500Z-20251230T102830Z.parquet"


def test_a_skip_names_the_file_that_takes_the_name() -> None:
    """Only the companion's name may be taken (a person removed an output but not its
    companion): the reason said the output's name was taken, and no such file was there."""
    files = [metrics(0), metrics(90)]
    output = "consolidated-20251230T100000Z-20251230T100130Z.parquet"
    stray = "consolidated-20251230T100000Z-20251230T100130Z.containers"
    for taken in (output, stray):
        _, [skipped] = plan_partition(scan(*files, extra=(taken,)), Policy(min_files=2), OPEN_DAY)
        assert skipped.output == output
        assert skipped.reason == f"{taken} already exists; nothing is overwritten"


MAP_AMONG_FLAT = [metrics(0), metrics(90), metrics(180, schema=MAP), metrics(270), metrics(360)]


def test_a_file_its_schema_keeps_from_both_neighbours_is_reported_apart() -> None:
    """Such a file is never merged and cuts its window in two for good; nothing said why."""
    plans, skipped = plan_partition(scan(*MAP_AMONG_FLAT), Policy(min_files=2), OPEN_DAY)
    assert [len(p.sources) for p in plans] == [2, 2]
    [apart] = skipped
    assert (apart.output, apart.sources) == (None, ("metrics-20251230T100300Z.parquet",))
    assert apart.reason == (
        "its schema keeps it from the files beside it: schema eras differ: flat and map"
    )


def test_a_lone_output_or_a_file_alone_in_its_window_is_not_reported() -> None:
    """An output is complete as it is; a file alone in its window waits for no schema."""
    era_change = [consolidated(0, 900), metrics(990, schema=MAP), metrics(1080, schema=MAP)]
    plans, skipped = plan_partition(scan(*era_change), Policy(min_files=2), OPEN_DAY)
    assert [len(p.sources) for p in plans] == [2] and skipped == []
    last_in_window = [metrics(3420), metrics(3510), metrics(3600)]
    plans, skipped = plan_partition(scan(*last_in_window), Policy(min_files=2), LATER)
    assert [len(p.sources) for p in plans] == [2] and skipped == []


def test_a_file_an_outputs_range_keeps_apart_is_reported() -> None:
    """After the clock steps back, a new file's stamp can fall inside an output's range: with
    the output, the merge would take the output's own name, so it is never merged; nothing
    said why (a review, helper-47). Several such files still merge among themselves."""
    output = consolidated(0, 2070)  # 10:00 .. 10:34:30
    alone = [metrics(0), output, metrics(90)]
    plans, skipped = plan_partition(scan(*alone), Policy(min_files=2), OPEN_DAY)
    assert plans == []
    assert [s.sources for s in skipped] == [(alone[0].name,), (alone[2].name,)]
    assert all(
        f"merged with {output.name}, whose range holds its stamp" in s.reason for s in skipped
    )
    several = [output, *(metrics(90 * i) for i in range(1, 4))]
    plans, skipped = plan_partition(scan(*several), Policy(min_files=2), OPEN_DAY)
    assert [[s.name for s in p.sources] for p in plans] == [[f.name for f in several[1:]]]
    assert skipped == []

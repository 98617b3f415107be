from datetime import UTC, date, datetime
from pathlib import Path

import pytest

from fgm_consolidator.layout import (
    companion_name,
    format_consolidated,
    format_stamp,
    is_our_tmp,
    iter_partitions,
    parse_data_file,
    parse_partition,
    parse_stamp,
    partition_day,
    tmp_name,
    walk_partitions,
)

T1 = datetime(2025, 12, 30, 12, 0, 0, tzinfo=UTC)
T2 = datetime(2025, 12, 30, 13, 15, 0, tzinfo=UTC)


def test_stamp_round_trip_is_fixed_width_utc() -> None:
    assert format_stamp(T1) == "20251230T120000Z"
    assert parse_stamp("20251230T120000Z") == T1


def test_consolidated_name_is_what_the_viewer_parses() -> None:
    name = format_consolidated(T1, T2)
    assert name == "consolidated-20251230T120000Z-20251230T131500Z.parquet"
    parsed = parse_data_file(name)
    assert parsed is not None
    assert (parsed.start, parsed.end, parsed.kind) == (T1, T2, "consolidated")


def test_metrics_name_parses_with_equal_start_and_end() -> None:
    parsed = parse_data_file("metrics-20251230T120000Z.parquet")
    assert parsed is not None
    assert (parsed.start, parsed.end, parsed.kind) == (T1, T1, "metrics")


@pytest.mark.parametrize(
    "name",
    [
        "metrics-20251230T120000Z.parquet.tmp",
        "metrics-20251230T120000Z.containers",
        "metrics-2025-12-30.parquet",
        "consolidated-20251230T120000Z.parquet",
        "other.parquet",
        "session.json",
        "metrics-20251399T120000Z.parquet",  # shaped like a stamp, but month 13
        "metrics-20251230T120060Z.parquet",  # second 60
        "consolidated-20251230T120000Z-20251232T000000Z.parquet",
        "metrics-\uff12\uff10\uff12\uff151230T120000Z.parquet",  # fullwidth digits
    ],
)
def test_names_that_are_not_data_files(name: str) -> None:
    assert parse_data_file(name) is None


def test_only_our_temp_files_are_ours() -> None:
    output = format_consolidated(T1, T2)
    assert is_our_tmp(tmp_name(output))
    assert is_our_tmp(tmp_name(companion_name(output)))
    assert not is_our_tmp("metrics-20251230T120000Z.containers.tmp")
    assert not is_our_tmp(output)


def test_companion_name_replaces_the_extension() -> None:
    assert companion_name("metrics-20251230T120000Z.parquet") == (
        "metrics-20251230T120000Z.containers"
    )


def test_partition_keys_are_validated() -> None:
    assert parse_partition("/dt=2025-12-30/identifier=pod-a/") == "dt=2025-12-30/identifier=pod-a"
    with pytest.raises(ValueError, match="dt=YYYY-MM-DD/identifier=<name>"):
        parse_partition("pod-a")


def test_a_stamp_that_names_no_moment_is_refused() -> None:
    for text in ("20251399T120000Z", "20251230T250000Z", "2025123T120000Z", "20251230T120000"):
        with pytest.raises(ValueError):
            parse_stamp(text)


def test_partition_folders_without_a_real_date_are_not_partitions(tmp_path: Path) -> None:
    for key in ("dt=2025-12-30/identifier=a", "dt=2025-13-45/identifier=b", "dt=x/identifier=c"):
        (tmp_path / key).mkdir(parents=True)
    assert list(iter_partitions(tmp_path)) == ["dt=2025-12-30/identifier=a"]
    assert partition_day("dt=2025-12-30/identifier=a") == date(2025, 12, 30)
    assert partition_day("dt=2025-13-45/identifier=b") is None
    with pytest.raises(ValueError, match="with a real date"):
        parse_partition("dt=2025-02-30/identifier=a")


def test_symlinked_partition_folders_are_reported_not_walked(tmp_path: Path) -> None:
    real = tmp_path / "dt=2025-12-30" / "identifier=a"
    real.mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "identifier=b").mkdir(parents=True)
    links = [tmp_path / "dt=2025-12-30" / "identifier=linked", tmp_path / "dt=2025-12-31"]
    links[0].symlink_to(real)
    links[1].symlink_to(elsewhere)
    (tmp_path / "dt=2025-13-45").symlink_to(elsewhere)  # not a day: not a partition at all
    (tmp_path / "dt=2025-12-30" / "identifier=file").write_text("")
    keys, skipped = walk_partitions(tmp_path)
    assert keys == ["dt=2025-12-30/identifier=a"] == list(iter_partitions(tmp_path))
    assert [s.path for s in skipped] == links
    assert all("symbolic link" in s.reason for s in skipped)


def test_every_stamp_that_parses_formats_back_to_itself() -> None:
    """`%Y` does not pad years below 1000: a file stamped by a monitor whose clock was far off
    gave an output named `consolidated-10101T...`, which no parser (ours or the viewer's)
    takes for an output, so recovery and the lineage check could not see it."""
    for text in ("00010101T000000Z", "09991231T235959Z", "99991231T235959Z"):
        assert format_stamp(parse_stamp(text)) == text
        name = format_consolidated(parse_stamp(text), parse_stamp(text))
        assert parse_data_file(name) is not None

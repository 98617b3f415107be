from datetime import UTC, datetime

import pytest

from fgm_consolidator.layout import (
    companion_name,
    format_consolidated,
    format_stamp,
    is_our_tmp,
    parse_data_file,
    parse_partition,
    parse_stamp,
    tmp_name,
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

"""The row proof behind lineage recovery: exact, whatever the buckets, and bounded in memory.

`containment.rows_not_found` decides which files lineage recovery may delete, so every answer
is checked against a plain multiset count done here, over random files with rows repeated
within and across them, with buckets from one row to more than the rows.
"""

from __future__ import annotations

import itertools
import json
import random
import subprocess
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import say_stored_schema

from fgm_consolidator import containment, footers

SCHEMA = pa.schema(
    [
        ("time", pa.timestamp("ms")),
        ("metric_name", pa.dictionary(pa.int32(), pa.utf8())),
        ("value_int", pa.uint64()),
        ("value_float", pa.float64()),
        ("labels", pa.map_(pa.utf8(), pa.utf8())),
        ("value_histogram", pa.list_(pa.float64())),
    ]
)


def row(seed: int) -> dict[str, object]:
    """A row fixed by `seed`; few seeds, so that files share rows."""
    return {
        "time": 1_700_000_000_000 + seed % 7,
        "metric_name": f"m{seed % 3}",
        "value_int": None if seed % 5 == 0 else seed % 4,
        "value_float": [0.0, -0.0, float("nan"), 1.5, None][seed % 5],
        "labels": [("pod", f"p{seed % 2}")] if seed % 6 else None,
        "value_histogram": [float(seed % 3), -0.0] if seed % 4 else [],
    }


def write(path: Path, seeds: Sequence[int]) -> Path:
    pq.write_table(pa.Table.from_pylist([row(s) for s in seeds], schema=SCHEMA), path)
    return path


def expected(output: Sequence[int], sources: dict[str, list[int]]) -> Counter[str]:
    """The answer counted plainly: output rows handed to source rows in source order. Rows are
    told apart by their fingerprint, the one notion of "the same row" under test elsewhere."""
    have = Counter(fingerprint(s) for s in output)
    missing: Counter[str] = Counter()
    for name, seeds in sources.items():
        for seed in seeds:
            key = fingerprint(seed)
            if have[key] > 0:
                have[key] -= 1
            else:
                missing[name] += 1
    return missing


def fingerprint(seed: int) -> bytes:
    return containment.fingerprints(pa.RecordBatch.from_pylist([row(seed)], schema=SCHEMA))[0]


@pytest.mark.parametrize("bucket_rows", [1, 3, 10_000])
@pytest.mark.parametrize("trial", range(8))
def test_the_answer_is_a_plain_multiset_count_whatever_the_buckets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bucket_rows: int, trial: int
) -> None:
    monkeypatch.setattr(containment, "BUCKET_ROWS", bucket_rows)
    monkeypatch.setattr(containment, "BATCH_ROWS", 4)  # several batches a file
    rng = random.Random(trial)
    sources = {
        f"s{i}.parquet": [rng.randrange(40) for _ in range(rng.randrange(0, 25))] for i in range(3)
    }
    held = [seed for seeds in sources.values() for seed in seeds]
    output = rng.sample(held, k=len(held) - rng.randrange(0, 4)) + [
        rng.randrange(40) for _ in range(rng.randrange(0, 4))
    ]
    paths = [write(tmp_path / name, seeds) for name, seeds in sources.items()]
    answer = containment.rows_not_found(write(tmp_path / "out.parquet", output), paths)
    assert answer == expected(output, sources)


def test_every_row_held_in_another_order_is_proven(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(containment, "BUCKET_ROWS", 2)
    first, second = list(range(0, 30)), list(range(30, 60))
    output = write(tmp_path / "out.parquet", sorted(first + second, key=lambda s: (s % 3, -s)))
    paths = [write(tmp_path / "a.parquet", first), write(tmp_path / "b.parquet", second)]
    assert containment.rows_not_found(output, paths) == Counter()
    assert not list(tmp_path.glob("tmp*")), "the bucket files are anonymous"


def test_a_row_two_sources_share_is_handed_to_the_first_only(tmp_path: Path) -> None:
    output = write(tmp_path / "out.parquet", [1, 2, 3])
    paths = [write(tmp_path / "a.parquet", [1, 2]), write(tmp_path / "b.parquet", [2, 3])]
    assert containment.rows_not_found(output, paths) == Counter({"b.parquet": 1})


def test_zero_signs_and_nans_are_told_apart_as_the_values_are(tmp_path: Path) -> None:
    """0.0 and -0.0 differ (the file holding the other one is not the output's); every NaN is
    the same value, inside lists too."""
    zero, minus_zero, nan = 10, 11, 12  # seeds whose value_float is 0.0, -0.0 and NaN
    assert (row(zero)["value_float"], row(minus_zero)["value_float"]) == (0.0, -0.0)
    output = write(tmp_path / "out.parquet", [zero, nan])
    paths = [write(tmp_path / "a.parquet", [nan]), write(tmp_path / "b.parquet", [minus_zero])]
    assert containment.rows_not_found(output, paths) == Counter({"b.parquet": 1})


# Runs in a fresh process, so that Arrow's peak and Python's count this proof alone.
PROVE = """
import json, sys, tracemalloc
from pathlib import Path
import pyarrow as pa
from fgm_consolidator import containment

folder = Path(sys.argv[1])
containment.BUCKET_ROWS = 20_000
sources = sorted(folder.glob("s*.parquet"))
tracemalloc.start()
missing = containment.rows_not_found(folder / "out.parquet", sources)
python_peak = tracemalloc.get_traced_memory()[1]
print(json.dumps({"peak": python_peak + pa.default_memory_pool().max_memory(),
                  "missing": sum(missing.values())}))
"""


def prove_in_a_fresh_process(folder: Path, files: int) -> int:
    rows = 10_000
    tables = []
    for index in range(files):
        table = pa.table(
            {
                "time": pa.array(range(index * rows, (index + 1) * rows), pa.timestamp("ms")),
                "metric_name": pa.array([f"m{i % 10}" for i in range(rows)]),
                "value_float": pa.array([i / 7 for i in range(rows)], pa.float64()),
            }
        )
        pq.write_table(table, folder / f"s{index:03}.parquet")
        tables.append(table)
    pq.write_table(pa.concat_tables(tables).sort_by("metric_name"), folder / "out.parquet")
    run = subprocess.run(
        [sys.executable, "-c", PROVE, str(folder)], capture_output=True, text=True, check=True
    )
    found = json.loads(run.stdout)
    assert found["missing"] == 0
    return int(found["peak"])


def test_eight_times_the_rows_take_no_more_memory(tmp_path: Path) -> None:
    """A proof of 20,000 rows and one of 160,000 (several buckets), each in its own process.
    Both peak at 5.9 MB (Python's heap and Arrow's); with one bucket for all the rows
    (BUCKET_ROWS past them) the larger peaked at 27 MB."""
    (small := tmp_path / "small").mkdir()
    (large := tmp_path / "large").mkdir()
    small_peak = prove_in_a_fresh_process(small, 2)
    large_peak = prove_in_a_fresh_process(large, 16)
    assert large_peak < 1.5 * small_peak, (small_peak, large_peak)


ODD = pa.schema(
    [
        ("i", pa.int64()),
        ("f", pa.float64()),
        ("s", pa.utf8()),
        ("d", pa.dictionary(pa.int32(), pa.utf8())),
        ("b", pa.binary()),
        ("t", pa.timestamp("ns")),
        ("flag", pa.bool_()),
        ("l", pa.list_(pa.float64())),
        ("m", pa.map_(pa.utf8(), pa.utf8())),
        ("st", pa.struct([("x", pa.int32()), ("y", pa.utf8())])),
        ("n", pa.null()),
    ]
)
DOMAINS: dict[str, list[object]] = {
    "i": [None, 0, 1, -1, 2**62],
    "f": [None, 0.0, -0.0, float("nan"), 1.5],
    "s": [None, "", "a", "ab", "v1:", "n"],
    "d": [None, "", "x", "xy"],
    "b": [None, b"", b"\x00", b"b", b"n"],
    "t": [None, 0, 1, 2**62],
    "flag": [None, False, True],
    "l": [None, [], [None], [0.0], [-0.0], [1.0, None], [None, 1.0]],
    "m": [None, [], [("a", "")], [("", "a")], [("a", None)], [("a", "b"), ("c", "d")]],
    "st": [None, {"x": None, "y": None}, {"x": 1, "y": ""}, {"x": 1, "y": "a"}],
    "n": [None],
}


def plain(row: dict[str, object]) -> str:
    """What makes two rows the same: the exact values, -0.0 not 0.0, every NaN one value."""
    return repr(containment._hashable([row[name] for name in ODD.names]))


@pytest.mark.parametrize("seed", range(3))
def test_fingerprints_tell_rows_apart_exactly_as_their_values_do(seed: int) -> None:
    """Rows with values from small domains (empty and null, -0.0 and 0.0 whose bits are 0's,
    text that looks like the encoding, lists and maps with nulls), each beside variants of
    itself with one or two neighbouring values changed, so that near misses abound: the same
    fingerprint for the same values only. A slice, with its lists' and maps' offsets into a
    larger batch, digests its rows as the whole batch does."""
    rng = random.Random(seed)
    rows = []
    for _ in range(12):
        base = {name: rng.choice(DOMAINS[name]) for name in ODD.names}
        rows.append(base)
        for left, right in itertools.pairwise(ODD.names):  # a value moved to its neighbour
            for _ in range(3):
                rows.append(base | {left: rng.choice(DOMAINS[left])})
                rows.append(
                    base | {left: rng.choice(DOMAINS[left]), right: rng.choice(DOMAINS[right])}
                )
    batch = pa.RecordBatch.from_pylist(rows, schema=ODD)
    digests = containment.fingerprints(batch)
    values = [plain(row) for row in rows]
    for i in range(len(rows)):
        for j in range(i + 1, len(rows)):
            assert (digests[i] == digests[j]) == (values[i] == values[j]), (rows[i], rows[j])
    assert containment.fingerprints(batch.slice(37, 101)) == digests[37:138]


def test_text_read_back_as_another_type_than_stored_is_still_proven(tmp_path: Path) -> None:
    """pyarrow reads a stored dictionary of large_string as one of string (`Footer.retyped`).
    Such a label, stored plain past its dictionary page, was read plain as large_string,
    which is neither, and no file of it was proven held, not even by itself."""
    rows = 20_000
    kind = pa.dictionary(pa.int32(), pa.large_utf8())
    values = pa.array([f"{row:0100d}" for row in range(rows)], pa.large_utf8())
    output = tmp_path / "consolidated-20250101T000000Z-20250101T000130Z.parquet"
    pq.write_table(pa.table({"l_pod": values}), output)
    say_stored_schema(output, pa.schema([pa.field("l_pod", kind)]))
    assert footers.read(output).plain_text == {"l_pod"}
    assert footers.read(output).retyped
    source = tmp_path / "metrics-20250101T000000Z.parquet"
    source.write_bytes(output.read_bytes())
    assert containment.rows_not_found(output, [source]) == Counter()

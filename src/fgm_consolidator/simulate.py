"""A stand-in for the `fine-grained-monitor` process: it writes the files the consolidator eats.

The consolidator must never be tested only against files it wrote itself, so this module spells
the monitor's contract out independently (its own name formatting, its own schemas, no import of
`layout`): if the two disagree, a test notices. Everything that varies in the field and matters
to a merge is reproduced: `l_*` column sets that differ between files of one partition, the
lading map-label era, a monitor upgrade that switches era mid-partition, date partitions taken
at file start, companions written through `.tmp` + rename, and mtimes at the end of each window
so that age-based eligibility sees what it would see on a node.

Output is a pure function of the spec: values are derived from (seed, series, second) rather
than drawn from a shared random stream, so a file's bytes do not depend on which files were
written before it, and two runs with the same seed produce byte-identical trees.
"""

from __future__ import annotations

import math
import os
import random
import struct
import uuid
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq

from fgm_consolidator.companions import Container, ContainerSidecar, encode

Era = Literal["flat", "map"]

BASE_FIELDS: tuple[pa.Field, ...] = (
    pa.field("run_id", pa.utf8(), nullable=False),
    pa.field("time", pa.timestamp("ms"), nullable=False),
    pa.field("fetch_index", pa.uint64(), nullable=False),
    pa.field("metric_name", pa.utf8(), nullable=False),
    pa.field("metric_kind", pa.utf8(), nullable=False),
    pa.field("value_int", pa.uint64()),
    pa.field("value_float", pa.float64()),
)
HISTOGRAM_FIELD = pa.field("value_histogram", pa.binary())
LABEL_DICTIONARY = pa.dictionary(pa.int32(), pa.utf8())
# Exactly lading-capture's `capture_schema()`: nothing nullable inside the map, and the map
# column itself not nullable either (a row without labels is an empty map).
LABELS_FIELD = pa.field(
    "labels",
    pa.map_(
        pa.field("key", LABEL_DICTIONARY, nullable=False),
        pa.field("value", LABEL_DICTIONARY, nullable=False),
    ),
    nullable=False,
)
# Parquet column paths of the map's leaves: `use_dictionary` wants leaf paths, not field names.
_MAP_LEAVES = ("labels.key_value.key", "labels.key_value.value")

# Keys every container carries; `device` and `pid` come only with some containers and metrics.
_COMMON_KEYS = (
    "cluster_name",
    "container_id",
    "container_name",
    "namespace",
    "node_name",
    "pod_name",
    "pod_uid",
    "qos_class",
)
CLUSTER_NAME = "fgm-sim"
_APPS = ("api", "worker", "nginx", "redis", "envoy", "postgres", "kafka", "etcd", "dogstatsd")
_NAMESPACES = ("default", "payments", "monitoring", "kube-system", "ingest")
_QOS = ("Guaranteed", "Burstable", "BestEffort")
_DEVICES = ("nvme0n1", "nvme1n1", "sda", "dm-0")
_EPOCH_OFFSET = 1_600_000_000  # keeps counters in a plausible range without overflow


@dataclass(frozen=True)
class PodSpec:
    """One monitor instance, i.e. one `identifier=` folder per day."""

    identifier: str
    era: Era = "flat"
    # Rotation index at which a map-era monitor is replaced by a flat-era one (an upgrade: the
    # new process gets a new run_id and restarts fetch_index at 0).
    switch_to_flat_at: int | None = None
    companions: bool = True
    # 1 = older monitors, 2 = with pod labels; consolidation must union both.
    companion_version: int = 2


@dataclass(frozen=True)
class SimulationSpec:
    """What to generate; `start` is when every simulated monitor process started."""

    pods: tuple[PodSpec, ...]
    start: datetime
    rotations: int
    rotation_seconds: int = 90
    metrics: int = 20
    containers: int = 4
    seconds_per_row_sample: int = 1
    seed: int = 0
    # Rotations a container lives, drawn per slot from this range. The short default makes
    # tests see containers (and `l_*` columns) come and go within a few files; a real node
    # keeps most containers for hours, which is what a benchmark of the viewer wants.
    container_lifetime: tuple[int, int] = (2, 4)

    def __post_init__(self) -> None:
        if self.start.tzinfo is None:
            raise ValueError("start must be timezone-aware (the monitor's stamps are UTC)")
        for name in ("rotation_seconds", "metrics", "containers", "seconds_per_row_sample"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.rotations < 0:
            raise ValueError("rotations must not be negative")
        shortest, longest = self.container_lifetime
        if not 1 <= shortest <= longest:
            raise ValueError("container_lifetime must be (shortest, longest) with 1 <= shortest")


@dataclass(frozen=True)
class SimulationSummary:
    """Totals of a `generate` call; `bytes` counts parquet files only, not companions."""

    files: int
    rows: int
    bytes: int
    companions: int


@dataclass(frozen=True)
class SimContainer:
    """A container as the monitor sees it; `device`/`pid` decide which extra labels it emits."""

    container_id: str
    pod_name: str
    container_name: str
    namespace: str
    pod_uid: str
    qos_class: str
    device: str | None = None
    pid: str | None = None

    def companion_entry(self, version: int) -> Container:
        labels = None
        if version >= 2:
            labels = (("app", self.container_name), ("team", self.namespace))
        return Container(
            container_id=self.container_id,
            pod_name=self.pod_name,
            container_name=self.container_name,
            namespace=self.namespace,
            pod_uid=self.pod_uid,
            qos_class=self.qos_class,
            labels=labels,
        )


@dataclass(frozen=True)
class MonitorRun:
    """One monitor process: files of one run share run_id, era and fetch_index origin."""

    era: Era
    run_id: str
    started: datetime
    node_name: str


@dataclass(frozen=True)
class WrittenRotation:
    """What one rotation left on disk; `companion` is None when the pod writes none."""

    path: Path
    rows: int
    bytes: int
    companion: Path | None


@dataclass(frozen=True)
class MetricDef:
    """One metric the simulated monitor emits for every container, every second."""

    name: str
    kind: Literal["counter", "gauge", "histogram"]
    # Container attribute that adds a label to this metric's rows (block device, process id).
    extra: Literal["device", "pid"] | None = None


# The first five cover every kind and both optional labels, so even tiny test specs
# (metrics >= 5) see `l_device` and `l_pid` come and go.
_CATALOG: tuple[MetricDef, ...] = (
    MetricDef("cpu_usage_user", "counter"),
    MetricDef("memory_rss_bytes", "gauge"),
    MetricDef("io_read_bytes", "counter", "device"),
    MetricDef("cpu_scheduler_latency_us", "histogram"),
    MetricDef("process_threads", "gauge", "pid"),
    MetricDef("cpu_usage_system", "counter"),
    MetricDef("memory_working_set_bytes", "gauge"),
    MetricDef("io_write_bytes", "counter", "device"),
    MetricDef("network_rx_bytes", "counter"),
    MetricDef("network_tx_bytes", "counter"),
    MetricDef("cpu_throttled_usec", "counter"),
    MetricDef("memory_anon_bytes", "gauge"),
    MetricDef("memory_file_bytes", "gauge"),
    MetricDef("cpu_pressure_some_avg10", "gauge"),
    MetricDef("memory_pressure_some_avg10", "gauge"),
    MetricDef("io_pressure_some_avg10", "gauge"),
    MetricDef("io_latency_us", "histogram", "device"),
    MetricDef("process_open_fds", "gauge", "pid"),
    MetricDef("memory_pgfault", "counter"),
    MetricDef("cpu_nr_throttled", "counter"),
)


def metric_catalog(count: int) -> tuple[MetricDef, ...]:
    """Real-looking names first; beyond the catalog, numbered gauges keep the count honest."""
    extra = tuple(MetricDef(f"custom_gauge_{i:03d}", "gauge") for i in range(count - len(_CATALOG)))
    return (_CATALOG + extra)[:count]


def flat_schema(label_keys: Sequence[str]) -> pa.Schema:
    """The flat-label era: one Utf8 `l_<key>` column per key, sorted, histogram always last."""
    labels = [pa.field(f"l_{key}", pa.utf8()) for key in sorted(label_keys)]
    return pa.schema([*BASE_FIELDS, *labels, HISTOGRAM_FIELD])


def map_schema() -> pa.Schema:
    """The lading capture era: one map column where the flat era has its `l_*` columns."""
    return pa.schema([*BASE_FIELDS, LABELS_FIELD, HISTOGRAM_FIELD])


def format_stamp(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")


def rotation_path(data_dir: Path, identifier: str, start: datetime) -> Path:
    """The monitor takes the date partition from the file's start, so a window that crosses
    midnight stays in the day it began."""
    day = start.astimezone(UTC).strftime("%Y-%m-%d")
    name = f"metrics-{format_stamp(start)}.parquet"
    return data_dir / f"dt={day}" / f"identifier={identifier}" / name


def _rng(*parts: object) -> random.Random:
    """A generator per named purpose, so adding one draw never shifts any other value."""
    return random.Random(":".join(str(p) for p in parts))


def _hash(*parts: object) -> int:
    return zlib.crc32(":".join(str(p) for p in parts).encode())


def _node_name(seed: int, identifier: str) -> str:
    rng = _rng(seed, identifier, "node")
    return f"ip-10-{rng.randrange(256)}-{rng.randrange(256)}-{rng.randrange(1, 255)}.ec2.internal"


def _slot_generation(
    seed: int, identifier: str, slot: int, rotation: int, lifetimes: tuple[int, int]
) -> int:
    """Each slot replaces its container every `lifetimes` rotations (2-4 by default), at a
    slot-specific phase, so by default within any 5 rotations slot 0 changes at least once."""
    rng = _rng(seed, identifier, "slot", slot)
    lifetime = rng.randint(*lifetimes)
    return (rotation + rng.randrange(lifetime)) // lifetime


def _make_container(
    seed: int, identifier: str, slot: int, generation: int, slots: int
) -> SimContainer:
    rng = _rng(seed, identifier, "container", slot, generation)
    app = rng.choice(_APPS)
    pod_hash = f"{rng.getrandbits(36):09x}"
    # Only slot 0 ever has a device and only slot 1 a pid, each in alternate generations: the
    # `l_device`/`l_pid` columns then really appear and disappear across files.
    has_device = slot == 0 and generation % 2 == 1
    has_pid = slot == min(1, slots - 1) and generation % 2 == 0
    return SimContainer(
        container_id=f"{rng.getrandbits(48):012x}",
        pod_name=f"{app}-{pod_hash}-{rng.getrandbits(20):05x}",
        container_name=app,
        namespace=rng.choice(_NAMESPACES),
        pod_uid=str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        qos_class=rng.choice(_QOS),
        device=rng.choice(_DEVICES) if has_device else None,
        pid=str(rng.randint(300, 4_000_000)) if has_pid else None,
    )


def containers_at(spec: SimulationSpec, identifier: str, rotation: int) -> tuple[SimContainer, ...]:
    """The containers alive on the pod's node during one rotation."""
    return tuple(
        _make_container(
            spec.seed,
            identifier,
            slot,
            _slot_generation(spec.seed, identifier, slot, rotation, spec.container_lifetime),
            spec.containers,
        )
        for slot in range(spec.containers)
    )


def run_at(spec: SimulationSpec, pod: PodSpec, rotation: int) -> MonitorRun:
    """Which monitor process wrote a rotation: the first one, or its upgraded successor."""
    switch = pod.switch_to_flat_at
    upgraded = switch is not None and rotation >= switch
    rng = _rng(spec.seed, pod.identifier, "run", int(upgraded))
    return MonitorRun(
        era="flat" if upgraded else pod.era,
        run_id=str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        started=rotation_start(spec, switch if upgraded and switch is not None else 0),
        node_name=_node_name(spec.seed, pod.identifier),
    )


def _whole_second(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(microsecond=0)


def _labels(container: SimContainer, metric: MetricDef, node_name: str) -> dict[str, str]:
    labels = {
        "cluster_name": CLUSTER_NAME,
        "container_id": container.container_id,
        "container_name": container.container_name,
        "namespace": container.namespace,
        "node_name": node_name,
        "pod_name": container.pod_name,
        "pod_uid": container.pod_uid,
        "qos_class": container.qos_class,
    }
    if metric.extra is not None and (value := getattr(container, metric.extra)) is not None:
        labels[metric.extra] = value
    return labels


def label_keys(containers: Sequence[SimContainer], metrics: Sequence[MetricDef]) -> list[str]:
    """The keys seen at a file's first flush, which fix its `l_*` columns."""
    keys = set(_COMMON_KEYS)
    for metric in metrics:
        if metric.extra and any(getattr(c, metric.extra) for c in containers):
            keys.add(metric.extra)
    return sorted(keys)


def _counter(series: int, second: int) -> int:
    """Monotonic in `second` and stateless: the wobble is always smaller than the rate."""
    rate = 1_000 + series % 50_000
    return series % 10**9 + rate * second + (second * 2_654_435_761) % (rate // 2)


def _gauge(series: int, second: int) -> float:
    base = 1e6 * (1 + series % 997)
    phase = (series % 360) * math.pi / 180
    noise = ((second * 2_654_435_761 + series) % 1000) / 1000 - 0.5
    return round(base * (1 + 0.2 * math.sin(second / 60 + phase) + 0.02 * noise), 3)


def _histogram(series: int, second: int) -> bytes:
    """Opaque bytes shaped like a serialized DDSketch (header, count, a few sparse bins)."""
    state = (series * 31 + second) * 2_654_435_761
    bins = 2 + state % 6
    out = bytearray(struct.pack("<BdQ", 1, 1.02, 10 + state % 500))
    for i in range(bins):
        out += struct.pack("<hI", 100 + i * 3 + (state >> i) % 3, 1 + (state >> (2 * i)) % 40)
    return bytes(out)


@dataclass
class _Columns:
    """Column buffers for one file; labels are kept per row and shaped at the end per era."""

    run_id: str
    time: list[int]
    fetch_index: list[int]
    metric_name: list[str]
    metric_kind: list[str]
    value_int: list[int | None]
    value_float: list[float | None]
    value_histogram: list[bytes | None]
    labels: list[dict[str, str]]


def _rows(
    spec: SimulationSpec,
    run: MonitorRun,
    containers: Sequence[SimContainer],
    start: datetime,
    seconds: int,
) -> _Columns:
    """Every metric of every container once per sampled second, as the monitor's 1 Hz loop."""
    metrics = metric_catalog(spec.metrics)
    cols = _Columns(run.run_id, [], [], [], [], [], [], [], [])
    offset = int((start - run.started).total_seconds())
    start_s = int(start.timestamp())
    series = {
        (c.container_id, m.name): _hash(spec.seed, c.container_id, m.name)
        for c in containers
        for m in metrics
    }
    labels = {
        (c.container_id, m.name): _labels(c, m, run.node_name) for c in containers for m in metrics
    }
    for second in range(0, seconds, spec.seconds_per_row_sample):
        wall = start_s + second
        for container in containers:
            for metric in metrics:
                key = (container.container_id, metric.name)
                _append_row(cols, metric, series[key], wall, offset + second, labels[key])
    return cols


def _append_row(
    cols: _Columns, metric: MetricDef, series: int, wall: int, fetch: int, labels: dict[str, str]
) -> None:
    cols.time.append(wall * 1000)
    cols.fetch_index.append(fetch)
    cols.metric_name.append(metric.name)
    cols.metric_kind.append(metric.kind)
    clock = max(wall - _EPOCH_OFFSET, 0)  # UInt64 counters: a pre-2020 start stays flat
    cols.value_int.append(_counter(series, clock) if metric.kind == "counter" else None)
    cols.value_float.append(_gauge(series, clock) if metric.kind == "gauge" else None)
    cols.value_histogram.append(_histogram(series, clock) if metric.kind == "histogram" else None)
    cols.labels.append(labels)


def _base_arrays(cols: _Columns) -> list[pa.Array]:
    n = len(cols.time)
    return [
        pa.array([cols.run_id] * n, pa.utf8()),
        pa.array(cols.time, pa.timestamp("ms")),
        pa.array(cols.fetch_index, pa.uint64()),
        pa.array(cols.metric_name, pa.utf8()),
        pa.array(cols.metric_kind, pa.utf8()),
        pa.array(cols.value_int, pa.uint64()),
        pa.array(cols.value_float, pa.float64()),
    ]


def _flat_table(cols: _Columns, schema: pa.Schema) -> pa.Table:
    keys = [name.removeprefix("l_") for name in schema.names if name.startswith("l_")]
    label_arrays = [pa.array([row.get(k) for row in cols.labels], pa.utf8()) for k in keys]
    histogram = pa.array(cols.value_histogram, pa.binary())
    return pa.Table.from_arrays([*_base_arrays(cols), *label_arrays, histogram], schema=schema)


def _map_table(cols: _Columns, schema: pa.Schema) -> pa.Table:
    offsets, keys, values = [0], [], []
    for row in cols.labels:
        for key in sorted(row):
            keys.append(key)
            values.append(row[key])
        offsets.append(len(keys))
    labels = pa.MapArray.from_arrays(
        pa.array(offsets, pa.int32()),
        pa.array(keys, pa.utf8()).dictionary_encode(),
        pa.array(values, pa.utf8()).dictionary_encode(),
        type=LABELS_FIELD.type,
    )
    histogram = pa.array(cols.value_histogram, pa.binary())
    return pa.Table.from_arrays([*_base_arrays(cols), labels, histogram], schema=schema)


def _dictionary_columns(schema: pa.Schema) -> list[str]:
    """The monitor dictionary-encodes run_id, metric_kind and labels, nothing else."""
    labels = [n for n in schema.names if n.startswith("l_")]
    if "labels" in schema.names:
        labels = list(_MAP_LEAVES)
    return ["run_id", "metric_kind", *labels]


class OpenRotation:
    """A metrics file whose window is still running: created under its final name (header
    only, no footer, exactly what a reader sees mid-window on a node) until `finish`."""

    def __init__(
        self,
        data_dir: Path,
        pod: PodSpec,
        start: datetime,
        *,
        spec: SimulationSpec,
        run: MonitorRun,
        containers: Sequence[SimContainer],
    ) -> None:
        self.start = _whole_second(start)
        self.path = rotation_path(data_dir, pod.identifier, self.start)
        self._pod = pod
        self._spec = spec
        self._run = run
        self._containers = tuple(containers)
        metrics = metric_catalog(spec.metrics)
        self.schema = (
            map_schema() if run.era == "map" else flat_schema(label_keys(containers, metrics))
        )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = pq.ParquetWriter(
            self.path,
            self.schema,
            compression="zstd",
            compression_level=3,
            version="2.6",
            data_page_version="2.0",
            use_dictionary=_dictionary_columns(self.schema),
            write_statistics=True,
            store_schema=True,
        )

    def table(self, seconds: int) -> pa.Table:
        """The rows `finish(seconds)` writes: a harness can learn them before they exist."""
        cols = _rows(self._spec, self._run, self._containers, self.start, seconds)
        build = _map_table if self._run.era == "map" else _flat_table
        return build(cols, self.schema)

    def finish(self, seconds: int | None = None) -> WrittenRotation:
        """Write the window's rows as one row group and the footer, then the companion.

        `seconds` shorter than the rotation models a graceful shutdown mid-window.
        """
        seconds = self._spec.rotation_seconds if seconds is None else seconds
        table = self.table(seconds)
        self._writer.write_table(table, row_group_size=max(table.num_rows, 1))
        self._writer.close()
        end = (self.start + timedelta(seconds=seconds)).timestamp()
        os.utime(self.path, (end, end))
        companion = None
        if self._pod.companions:
            companion = write_companion(
                self.path, self._containers, self._pod.companion_version, end
            )
        return WrittenRotation(self.path, table.num_rows, self.path.stat().st_size, companion)


def write_companion(
    parquet: Path, containers: Sequence[SimContainer], version: int, mtime: float
) -> Path:
    """As the monitor does it: the whole sidecar to `<name>.containers.tmp`, then rename."""
    final = parquet.with_suffix(".containers")
    tmp = final.with_name(final.name + ".tmp")
    sidecar = ContainerSidecar(version, tuple(c.companion_entry(version) for c in containers))
    tmp.write_bytes(encode(sidecar))
    os.utime(tmp, (mtime, mtime))
    tmp.rename(final)
    return final


def open_rotation(
    data_dir: Path, spec: SimulationSpec, pod: PodSpec, rotation: int
) -> OpenRotation:
    """One pod's file of one rotation, created under its final name and not yet finished:
    which monitor process writes it, and which containers it sees, follow from the spec."""
    return OpenRotation(
        data_dir,
        pod,
        rotation_start(spec, rotation),
        spec=spec,
        run=run_at(spec, pod, rotation),
        containers=containers_at(spec, pod.identifier, rotation),
    )


def open_rotations(data_dir: Path, spec: SimulationSpec, rotation: int) -> list[OpenRotation]:
    """Every pod's file of one rotation, open at once: what a live node holds while the
    window runs. Each is completed by its `finish`."""
    return [open_rotation(data_dir, spec, pod, rotation) for pod in spec.pods]


def rotation_start(spec: SimulationSpec, rotation: int) -> datetime:
    return _whole_second(spec.start) + timedelta(seconds=rotation * spec.rotation_seconds)


def iter_rotations(
    data_dir: Path, spec: SimulationSpec, only: range | None = None
) -> Iterator[WrittenRotation]:
    """Rotation by rotation, every pod at each step, in the order a node would produce them.

    `only` limits it to some rotations of the spec: since every file is a pure function of
    (spec, rotation), separate processes can each write a share of one spec.
    """
    for rotation in range(spec.rotations) if only is None else only:
        for pod in spec.pods:  # each finished before the next is opened
            yield open_rotation(data_dir, spec, pod, rotation).finish()


def generate(data_dir: Path, spec: SimulationSpec, only: range | None = None) -> SimulationSummary:
    """Write `spec.rotations` complete files per pod under `data_dir` (or the `only` ones)."""
    files = rows = size = companions = 0
    for written in iter_rotations(Path(data_dir), spec, only):
        files += 1
        rows += written.rows
        size += written.bytes
        companions += written.companion is not None
    return SimulationSummary(files=files, rows=rows, bytes=size, companions=companions)

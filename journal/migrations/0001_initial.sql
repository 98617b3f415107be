-- Migration 1: the first journal schema.
-- Frozen once released: later changes add columns or tables in new numbered files, never
-- rename or drop. The package applies files whose number is above PRAGMA user_version, each in
-- its own transaction, and sets user_version to that number.

-- One row per merge; written once when the merge is planned. The output figures are filled
-- in exactly once, in the same transaction as the merge's 'written' transition.
CREATE TABLE merges (
    id INTEGER PRIMARY KEY,
    partition TEXT NOT NULL,          -- dt=YYYY-MM-DD/identifier=<name>
    output TEXT NOT NULL,             -- final file name, consolidated-<start>-<end>.parquet
    era TEXT NOT NULL,                -- 'flat' or 'map'
    policy TEXT NOT NULL,             -- JSON of the options that planned it
    rows_in INTEGER NOT NULL,
    bytes_in INTEGER NOT NULL,
    has_companion INTEGER NOT NULL,   -- 1 when a .containers companion goes with the output
    output_rows INTEGER,
    output_bytes INTEGER,
    output_checksum TEXT              -- sha256 of the output file, hex
);
CREATE INDEX merges_by_partition ON merges(partition, id);

-- The sources of each merge in output order, with the identity that must still hold before
-- any of them is deleted.
CREATE TABLE sources (
    merge_id INTEGER NOT NULL REFERENCES merges(id),
    position INTEGER NOT NULL,
    name TEXT NOT NULL,
    inode INTEGER NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    rows INTEGER NOT NULL,
    schema_fingerprint TEXT NOT NULL,
    companion_inode INTEGER,          -- NULL when the source had no .containers companion
    companion_size INTEGER,
    companion_mtime_ns INTEGER,
    PRIMARY KEY (merge_id, position)
);

-- Append-only: every state a merge reaches, never rewritten. A merge's state is its latest row.
CREATE TABLE transitions (
    id INTEGER PRIMARY KEY,
    merge_id INTEGER NOT NULL REFERENCES merges(id),
    state TEXT NOT NULL,
    at TEXT NOT NULL,                 -- ISO 8601, UTC
    actor TEXT NOT NULL,              -- 'merge' or 'recovery'
    error TEXT                        -- why a merge was rolled back or needs a person
);
CREATE INDEX transitions_by_merge ON transitions(merge_id, id);

-- Files that could not be read completely; excluded from merges while their identity holds.
CREATE TABLE unreadable (
    id INTEGER PRIMARY KEY,
    partition TEXT NOT NULL,
    name TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    reason TEXT NOT NULL,
    first_seen TEXT NOT NULL,
    UNIQUE (partition, name, size, mtime_ns)
);

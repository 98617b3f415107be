-- Migration 2: a record of every consolidation pass and of every prune of old history.
-- Frozen once released, like 0001.

-- One row per pass, inserted when the pass starts and completed once when it ends, so that
-- `status` can tell when the service last succeeded (and with which settings) without asking
-- the process. A row left with result NULL by a process that died is marked 'interrupted' by
-- the next pass to start (only one writer ever holds the journal).
CREATE TABLE passes (
    id INTEGER PRIMARY KEY,
    started TEXT NOT NULL,            -- ISO 8601, UTC
    ended TEXT,                       -- NULL while the pass runs or if its process died
    result TEXT,                      -- 'ok', 'failed', 'stopped', 'interrupted'; NULL: running
    merges_finished INTEGER NOT NULL DEFAULT 0,  -- merges that reached sources-deleted
    merges_failed INTEGER NOT NULL DEFAULT 0,    -- merges rolled back or flagged for a person
    partition_errors INTEGER NOT NULL DEFAULT 0, -- partitions the pass could not work
    unreadable INTEGER NOT NULL DEFAULT 0,       -- files found unreadable for the first time
    error TEXT,                       -- why the pass failed as a whole
    settings TEXT NOT NULL            -- JSON: policy, check interval and retention it ran with
);
CREATE INDEX passes_by_result ON passes(result, id);

-- One row per prune of finished history (retention), so it runs at most once a day across
-- restarts and a reader can tell why old merges are no longer listed.
CREATE TABLE prunes (
    id INTEGER PRIMARY KEY,
    at TEXT NOT NULL,                 -- ISO 8601, UTC
    cutoff TEXT NOT NULL,             -- merges finished before this were eligible
    merges INTEGER NOT NULL,          -- merges removed with their sources and transitions
    passes INTEGER NOT NULL           -- pass records removed
);

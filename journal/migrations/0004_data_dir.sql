-- Migration 4: the data directory this journal belongs to.
-- Frozen once released, like 0001.
--
-- A journal records partitions relative to its data directory, so a `--journal` kept outside
-- it and given later with another data directory would have that directory's recovery act on
-- the first one's merges. The data directory's identity is a random id kept in its state
-- folder (`.fgm-consolidator/data-dir-id`), so it survives the volume being mounted at another
-- path (the host's, the pod's). At most one row: written by the first `run` or `recover` that
-- opens the journal (a journal from before this migration adopts the data directory it is
-- next used with); a journal whose row names another id is refused.
CREATE TABLE data_dir (
    one INTEGER PRIMARY KEY CHECK (one = 1),
    id TEXT NOT NULL,                 -- the content of <data-dir>/.fgm-consolidator/data-dir-id
    path TEXT NOT NULL                -- absolute path it was last opened at, for messages
);

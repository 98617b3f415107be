-- Migration 7: files shown new though an output's lineage lists their name.
-- Frozen once released, like 0001.
--
-- A lineage lists each source by name and footer digest. A file found under a listed name
-- with another footer is a new file (the monitor's clock stepped back, and it reused the
-- name) or the merged file rewritten in place. With the journal intact, its merges tell
-- (one of them deleted that name). With the journal lost, start-up's lineage check compares
-- the rows: a file none of whose rows the output holds is new, and is recorded here, so that
-- every later pass may merge it. The footer names the version shown new; another is not.
CREATE TABLE released (
    partition TEXT NOT NULL,
    name TEXT NOT NULL,
    footer TEXT NOT NULL,             -- the file's footer digest (lineage `footer`)
    output TEXT NOT NULL,             -- the output whose lineage lists the name
    at TEXT NOT NULL,                 -- when it was shown new (UTC, ISO 8601)
    PRIMARY KEY (partition, name, footer, output)
);

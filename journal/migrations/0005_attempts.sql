-- Migration 5: start-up steps that died with their process.
-- Frozen once released, like 0001.
--
-- A merge that kills its process is counted from the journal's own history: recovery rolls it
-- back from `planned` or `writing`. A start-up step outside any merge (the lineage proof of an
-- output found beside its sources with no journal to explain them) leaves no such trace, so it
-- keeps a row here: written before the step begins, deleted when it ends, however it ends. A
-- row found at the next start is a step that died with its process, `deaths` times in a row.
CREATE TABLE attempts (
    subject TEXT PRIMARY KEY,         -- what was being done: lineage:<partition>/<output>
    deaths INTEGER NOT NULL,          -- attempts begun and never ended
    last_at TEXT NOT NULL             -- when the latest of them began (UTC, ISO 8601)
);

-- Migration 6: the checksum of the output's companion, as of the output's.
-- Frozen once released, like 0001.
--
-- `written` promises the companion's temp file as it promises the output's (DESIGN step 3).
-- Recovery could only check that a companion decodes: one altered but still decodable (a disk
-- that returned other bytes than it acknowledged) would have been published, and every
-- source's companion deleted. NULL: the merge had no companion, or was written before this
-- migration (recovery then checks that it decodes, as before).
ALTER TABLE merges ADD COLUMN companion_checksum TEXT;  -- sha256 of the output's companion, hex

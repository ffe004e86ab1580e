-- Fencing and status.json ordering (issue 16). lease_gen grows by one at
-- every claim: an outcome, progress or retry is written only while the row
-- still carries the generation of the attempt that reports it. version grows
-- at every re-derivation of the batch: a status.json built from an older
-- snapshot never replaces a newer one.
ALTER TABLE batch_files ADD COLUMN lease_gen INTEGER NOT NULL DEFAULT 0;
ALTER TABLE batch_jobs ADD COLUMN version INTEGER NOT NULL DEFAULT 0;

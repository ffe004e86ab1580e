-- Fencing and status.json ordering (issue 16); see sqlite/0003_fencing.sql.
ALTER TABLE batch_files ADD COLUMN lease_gen integer NOT NULL DEFAULT 0;
ALTER TABLE batch_jobs ADD COLUMN version bigint NOT NULL DEFAULT 0;

-- The worker that claimed a file itself (issue 15): the daemon requeues
-- exactly the files a worker claimed when it sees that worker die before
-- reporting the claim. NULL: claimed by the daemon (or before this column).
ALTER TABLE batch_files ADD COLUMN claimant text;

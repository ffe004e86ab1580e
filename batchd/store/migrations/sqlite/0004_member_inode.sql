-- The device and inode each member had when scanned (issue 12).
ALTER TABLE batch_files ADD COLUMN file_dev INTEGER;
ALTER TABLE batch_files ADD COLUMN file_ino INTEGER;

CREATE TABLE batch_jobs (
    id              TEXT PRIMARY KEY,
    user_id         TEXT,
    status          TEXT NOT NULL,
    total_files     INTEGER NOT NULL DEFAULT 0,
    processed_files INTEGER NOT NULL DEFAULT 0,
    failed_files    INTEGER NOT NULL DEFAULT 0,
    priority        TEXT NOT NULL,
    created_at      TEXT NOT NULL,
    started_at      TEXT,
    completed_at    TEXT,
    error           TEXT,
    name            TEXT NOT NULL UNIQUE,
    source          TEXT,
    work_path       TEXT NOT NULL
);
CREATE INDEX batch_jobs_created ON batch_jobs (created_at);
CREATE INDEX batch_jobs_status ON batch_jobs (status, created_at);
CREATE INDEX batch_jobs_work ON batch_jobs (work_path);

CREATE TABLE batch_files (
    id            TEXT PRIMARY KEY,
    batch_id      TEXT NOT NULL REFERENCES batch_jobs (id) ON DELETE CASCADE,
    filename      TEXT NOT NULL,
    file_size     INTEGER,
    file_hash     TEXT,
    status        TEXT NOT NULL,
    progress      INTEGER NOT NULL DEFAULT 0,
    result        TEXT,
    error         TEXT,
    retry_count   INTEGER NOT NULL DEFAULT 0,
    created_at    TEXT NOT NULL,
    started_at    TEXT,
    completed_at  TEXT,
    relpath       TEXT NOT NULL,
    seq           INTEGER NOT NULL,
    priority      TEXT NOT NULL,
    priority_rank INTEGER NOT NULL,
    available_at  TEXT,
    attempts      INTEGER NOT NULL DEFAULT 0,
    processor     TEXT,
    UNIQUE (batch_id, relpath)
);
-- The dispatch query walks this index in order: O(log n) per claim.
CREATE INDEX batch_files_queue ON batch_files (status, priority_rank, seq);
CREATE INDEX batch_files_batch ON batch_files (batch_id, status);

CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT INTO counters (name, value) VALUES ('file_seq', 0);

CREATE TABLE uploads (
    id         INTEGER PRIMARY KEY,
    user_id    TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE INDEX uploads_user ON uploads (user_id, created_at);

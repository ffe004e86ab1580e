CREATE TABLE batch_jobs (
    id              uuid PRIMARY KEY,
    user_id         text,
    status          text NOT NULL
        CHECK (status IN ('pending', 'processing', 'completed', 'failed')),
    total_files     integer NOT NULL DEFAULT 0,
    processed_files integer NOT NULL DEFAULT 0,
    failed_files    integer NOT NULL DEFAULT 0,
    priority        text NOT NULL CHECK (priority IN ('high', 'normal', 'low')),
    created_at      timestamptz NOT NULL,
    started_at      timestamptz,
    completed_at    timestamptz,
    error           text,
    name            text NOT NULL UNIQUE,
    source          text,
    -- Unique: the database half of exactly-once claiming (see register_batch).
    work_path       text NOT NULL UNIQUE,
    -- Registration order, for ties of created_at (SQLite's rowid).
    ord             bigint GENERATED ALWAYS AS IDENTITY
);
CREATE INDEX batch_jobs_created ON batch_jobs (created_at, ord);
CREATE INDEX batch_jobs_status ON batch_jobs (status, created_at);

CREATE TABLE batch_files (
    id            uuid PRIMARY KEY,
    batch_id      uuid NOT NULL REFERENCES batch_jobs (id) ON DELETE CASCADE,
    filename      text NOT NULL,
    file_size     bigint,
    file_hash     text,
    status        text NOT NULL
        CHECK (status IN ('pending', 'processing', 'completed', 'failed')),
    progress      integer NOT NULL DEFAULT 0,
    result        json,
    error         text,
    retry_count   integer NOT NULL DEFAULT 0,
    created_at    timestamptz NOT NULL,
    started_at    timestamptz,
    completed_at  timestamptz,
    relpath       text NOT NULL,
    seq           bigint NOT NULL,
    priority      text NOT NULL,
    priority_rank integer NOT NULL,
    available_at  timestamptz,
    attempts      integer NOT NULL DEFAULT 0,
    processor     text,
    node_id       text,
    lease_until   timestamptz,
    UNIQUE (batch_id, relpath)
);
-- The dispatch query walks this partial index in order: O(log n) per claim.
CREATE INDEX batch_files_queue ON batch_files (priority_rank, seq)
    WHERE status = 'pending';
CREATE INDEX batch_files_leases ON batch_files (lease_until)
    WHERE status = 'processing';
CREATE INDEX batch_files_node ON batch_files (node_id)
    WHERE status = 'processing';
CREATE INDEX batch_files_batch ON batch_files (batch_id, status);

CREATE TABLE counters (name text PRIMARY KEY, value bigint NOT NULL);
INSERT INTO counters (name, value) VALUES ('file_seq', 0);

CREATE TABLE uploads (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id    text NOT NULL,
    created_at timestamptz NOT NULL
);
CREATE INDEX uploads_user ON uploads (user_id, created_at);

CREATE TABLE nodes (
    node_id        text PRIMARY KEY,
    host           text NOT NULL,
    pid            integer NOT NULL,
    started_at     timestamptz NOT NULL,
    last_heartbeat timestamptz NOT NULL,
    address        text
);

-- A file that becomes due wakes every listening node, whoever made it due
-- (a node, or an operator in psql). Identical notifications within one
-- transaction are delivered once, so a 50-file registration sends one.
CREATE FUNCTION batchd_notify_work() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('batchd_work', '');
    RETURN NULL;
END
$$;
CREATE TRIGGER batch_files_due
    AFTER INSERT OR UPDATE OF status, available_at ON batch_files
    FOR EACH ROW
    WHEN (NEW.status = 'pending' AND (NEW.available_at IS NULL OR NEW.available_at <= now()))
    EXECUTE FUNCTION batchd_notify_work();

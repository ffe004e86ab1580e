-- The nodes table of issue 8 (one row here: SQLite is one node).
CREATE TABLE nodes (
    node_id        TEXT PRIMARY KEY,
    host           TEXT NOT NULL,
    pid            INTEGER NOT NULL,
    started_at     TEXT NOT NULL,
    last_heartbeat TEXT NOT NULL,
    address        TEXT
);

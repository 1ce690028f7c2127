-- The event log: events per topic with gap-free offsets, the newest offset ever assigned
-- per topic, the log's epoch, and answers kept under idempotency keys.

CREATE TABLE events (
    topic    TEXT    NOT NULL,
    "offset" INTEGER NOT NULL,
    ts_ms    INTEGER NOT NULL,
    event    TEXT    NOT NULL,
    data     BLOB    NOT NULL,
    PRIMARY KEY (topic, "offset")
);

-- One row per topic ever written. Retention never lowers head.
CREATE TABLE topic_heads (
    topic TEXT    PRIMARY KEY,
    head  INTEGER NOT NULL
);

CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE idempotency (
    scope       TEXT    NOT NULL,
    key         TEXT    NOT NULL,
    fingerprint TEXT    NOT NULL,
    status      INTEGER NOT NULL,
    body        BLOB    NOT NULL,
    created_ms  INTEGER NOT NULL,
    PRIMARY KEY (scope, key)
);

CREATE INDEX idempotency_created_ms ON idempotency (created_ms);

-- The event log: events per topic with gap-free offsets, the newest offset ever assigned
-- per topic, the log's epoch, and answers kept under idempotency keys.

CREATE TABLE events (
    topic    text   NOT NULL,
    "offset" bigint NOT NULL,
    ts_ms    bigint NOT NULL,
    event    text   NOT NULL,
    data     bytea  NOT NULL,
    PRIMARY KEY (topic, "offset")
);

-- One row per topic ever written; a commit locks the rows of its topics (in sorted order)
-- while it assigns offsets, so concurrent writers never share or skip an offset.
-- Retention never lowers head.
CREATE TABLE topic_heads (
    topic text   PRIMARY KEY,
    head  bigint NOT NULL
);

CREATE TABLE meta (
    key   text PRIMARY KEY,
    value text NOT NULL
);

CREATE TABLE idempotency (
    scope       text    NOT NULL,
    key         text    NOT NULL,
    fingerprint text    NOT NULL,
    status      integer NOT NULL,
    body        bytea   NOT NULL,
    created_ms  bigint  NOT NULL,
    PRIMARY KEY (scope, key)
);

CREATE INDEX idempotency_created_ms ON idempotency (created_ms);

-- Task rows, written in the same transaction as the events they produced. ``version`` grows
-- by one per change; a write names the version it was computed from (optimistic
-- concurrency). ``data`` is the whole task as JSON; the other columns are copies of its
-- fields that reads filter and sort on.

CREATE TABLE tasks (
    id               TEXT    PRIMARY KEY,
    owner            TEXT    NOT NULL,
    status           TEXT    NOT NULL,
    created_ms       INTEGER NOT NULL,
    updated_ms       INTEGER NOT NULL,
    lease_expires_ms INTEGER,
    holder           TEXT,
    version          INTEGER NOT NULL,
    data             BLOB    NOT NULL
);

-- One owner's tasks, newest change first (keyset pagination on updated_ms, id).
CREATE INDEX tasks_owner_updated ON tasks (owner, updated_ms, id);

-- The queue: claimable tasks, oldest change first.
CREATE INDEX tasks_queued ON tasks (updated_ms, id) WHERE status = 'queued';

-- The lease sweep: live runs by expiry.
CREATE INDEX tasks_leases ON tasks (lease_expires_ms, id)
    WHERE status IN ('running', 'interrupted') AND lease_expires_ms IS NOT NULL;

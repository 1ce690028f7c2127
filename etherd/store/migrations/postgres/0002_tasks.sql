-- Task rows, written in the same transaction as the events they produced. ``version`` grows
-- by one per change; a write names the version it was computed from (optimistic
-- concurrency). ``data`` is the whole task as JSON; the other columns are copies of its
-- fields that reads filter and sort on.
--
-- ``id`` sorts bytewise (COLLATE "C"), whatever the database's collation: the order lists
-- and cursors use is the same as on SQLite, and row locks are taken in that order.
-- A commit may hold a row with version 0 inside its transaction (a create's placeholder);
-- such a row is never committed.

CREATE TABLE tasks (
    id               text COLLATE "C" PRIMARY KEY,
    owner            text   NOT NULL,
    status           text   NOT NULL,
    created_ms       bigint NOT NULL,
    updated_ms       bigint NOT NULL,
    lease_expires_ms bigint,
    holder           text,
    version          bigint NOT NULL,
    data             bytea  NOT NULL
);

-- One owner's tasks, newest change first (keyset pagination on updated_ms, id).
CREATE INDEX tasks_owner_updated ON tasks (owner, updated_ms, id);

-- The queue: claimable tasks, oldest change first.
CREATE INDEX tasks_queued ON tasks (updated_ms, id) WHERE status = 'queued';

-- The lease sweep: live runs by expiry.
CREATE INDEX tasks_leases ON tasks (lease_expires_ms, id)
    WHERE status IN ('running', 'interrupted') AND lease_expires_ms IS NOT NULL;

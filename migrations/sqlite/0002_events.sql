-- Events: same columns as migrations/postgres/0002_events.sql. SQLite
-- serializes writers, so `seq` (AUTOINCREMENT) is already commit order and
-- `xid` is always 0. Times are integer microseconds since the Unix epoch.
CREATE TABLE events (
    seq               INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant_id         TEXT NOT NULL,
    id                TEXT NOT NULL,
    xid               INTEGER NOT NULL DEFAULT 0,
    idem              BLOB NOT NULL,
    occurred_at       INTEGER NOT NULL,
    received_at       INTEGER NOT NULL,
    event_type        TEXT NOT NULL,
    ocsf_class_uid    INTEGER NOT NULL,
    ocsf_category_uid INTEGER NOT NULL,
    actor             TEXT NOT NULL,
    action            TEXT NOT NULL,
    resource          TEXT NOT NULL,
    outcome           INTEGER NOT NULL,
    severity          INTEGER NOT NULL,
    source_ip         TEXT,
    destination_ip    TEXT,
    source_system     TEXT NOT NULL,
    service           TEXT NOT NULL,
    environment       TEXT NOT NULL,
    details           TEXT NOT NULL
);
CREATE UNIQUE INDEX events_id ON events (tenant_id, id);
CREATE UNIQUE INDEX events_idempotency ON events (tenant_id, idem);
CREATE INDEX events_occurred ON events (tenant_id, occurred_at DESC, id DESC);
CREATE INDEX events_feed ON events (tenant_id, seq);

-- Alerts and the change log: same columns as migrations/postgres/0003.
-- Times are integer microseconds; `xid` is always 0 (writers are serialized,
-- so `seq` is commit order).
CREATE TABLE alerts (
    tenant_id   TEXT NOT NULL,
    id          TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    severity    INTEGER NOT NULL,
    status      INTEGER NOT NULL,
    category    TEXT NOT NULL,
    last_seen   INTEGER NOT NULL,
    created_at  INTEGER NOT NULL,
    incident_id TEXT,
    doc         TEXT NOT NULL,
    PRIMARY KEY (tenant_id, id)
);
CREATE INDEX alerts_last_seen ON alerts (tenant_id, last_seen DESC, id DESC);
CREATE INDEX alerts_fingerprint ON alerts (tenant_id, fingerprint, last_seen DESC);

CREATE TABLE change_log (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant_id  TEXT NOT NULL,
    xid        INTEGER NOT NULL DEFAULT 0,
    stream     TEXT NOT NULL,
    subject_id TEXT NOT NULL,
    kind       TEXT NOT NULL,
    payload    TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX change_log_stream ON change_log (tenant_id, stream, seq);

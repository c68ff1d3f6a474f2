-- Incidents: same columns as migrations/postgres/0007 (times in microseconds).
CREATE TABLE incidents (
    tenant_id  TEXT NOT NULL,
    id         TEXT NOT NULL,
    version    INTEGER NOT NULL,
    status     INTEGER NOT NULL,
    severity   INTEGER NOT NULL,
    assignee   TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    doc        TEXT NOT NULL,
    PRIMARY KEY (tenant_id, id)
);
CREATE INDEX incidents_updated ON incidents (tenant_id, updated_at DESC, id DESC);

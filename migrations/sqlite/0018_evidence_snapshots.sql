-- Evidence snapshots once per event: same table as
-- migrations/postgres/0018_evidence_snapshots.sql (why is said there).
CREATE TABLE evidence_snapshots (
    tenant_id TEXT NOT NULL,
    event_id  TEXT NOT NULL,
    snapshot  TEXT NOT NULL,
    PRIMARY KEY (tenant_id, event_id)
) WITHOUT ROWID;

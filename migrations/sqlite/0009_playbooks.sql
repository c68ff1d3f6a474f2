-- Playbooks, runs and notification settings: same columns as
-- migrations/postgres/0009_playbooks.sql (times in microseconds). One process
-- serves an SQLite store, and its write transactions hold the database lock,
-- so claiming runs needs no row locks.
CREATE TABLE playbooks (
    tenant_id  TEXT NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    id         TEXT NOT NULL,
    name       TEXT NOT NULL,
    version    INTEGER NOT NULL,
    enabled    INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    doc        TEXT NOT NULL,
    PRIMARY KEY (tenant_id, id),
    UNIQUE (tenant_id, name)
);

CREATE TABLE playbook_runs (
    tenant_id         TEXT NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    id                TEXT NOT NULL,
    playbook_id       TEXT NOT NULL,
    version           INTEGER NOT NULL,
    status            INTEGER NOT NULL,
    incident_id       TEXT,
    created_at        INTEGER NOT NULL,
    updated_at        INTEGER NOT NULL,
    approval_deadline INTEGER NOT NULL,
    lease_owner       TEXT,
    lease_until       INTEGER,
    trigger_key       TEXT,
    doc               TEXT NOT NULL,
    PRIMARY KEY (tenant_id, id)
);
CREATE INDEX playbook_runs_created ON playbook_runs (tenant_id, created_at DESC, id DESC);
CREATE UNIQUE INDEX playbook_runs_trigger ON playbook_runs (tenant_id, trigger_key)
    WHERE trigger_key IS NOT NULL;
CREATE INDEX playbook_runs_runnable ON playbook_runs (lease_until) WHERE status IN (2, 4);
CREATE INDEX playbook_runs_pending ON playbook_runs (approval_deadline) WHERE status = 1;

CREATE TABLE notification_settings (
    tenant_id         TEXT PRIMARY KEY REFERENCES tenants (id) ON DELETE CASCADE,
    url               TEXT NOT NULL,
    secret            BLOB,
    secret_rotated_at INTEGER,
    updated_at        INTEGER NOT NULL
);

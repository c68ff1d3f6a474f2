-- Enforcement decisions and the per-tenant revision log: same tables and
-- columns as migrations/postgres/0008_decisions.sql. Times are integer
-- microseconds. Writers are serialized (BEGIN IMMEDIATE), so revisions are
-- assigned in commit order.
CREATE TABLE decisions (
    tenant_id  TEXT NOT NULL,
    id         TEXT NOT NULL,
    target     TEXT NOT NULL,
    scope      TEXT NOT NULL,
    kind       TEXT NOT NULL,
    origin_id  TEXT NOT NULL,
    idem       TEXT,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    revoked_at INTEGER,
    doc        TEXT NOT NULL,
    PRIMARY KEY (tenant_id, id)
);
CREATE UNIQUE INDEX decisions_idem ON decisions (tenant_id, idem) WHERE idem IS NOT NULL;
CREATE INDEX decisions_created ON decisions (tenant_id, created_at DESC, id DESC);
CREATE INDEX decisions_target ON decisions (tenant_id, target);

CREATE TABLE decision_targets (
    tenant_id      TEXT NOT NULL,
    target         TEXT NOT NULL,
    next_change_at INTEGER NOT NULL,
    state          TEXT NOT NULL,
    PRIMARY KEY (tenant_id, target)
);
CREATE INDEX decision_targets_due ON decision_targets (tenant_id, next_change_at);

CREATE TABLE decision_log (
    tenant_id  TEXT NOT NULL,
    revision   INTEGER NOT NULL,
    kind       TEXT NOT NULL,
    entry      TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, revision)
);
CREATE INDEX decision_log_created ON decision_log (tenant_id, created_at);

CREATE TABLE decision_heads (
    tenant_id      TEXT PRIMARY KEY,
    revision       INTEGER NOT NULL,
    log_floor      INTEGER NOT NULL,
    active         INTEGER NOT NULL,
    next_change_at INTEGER
);

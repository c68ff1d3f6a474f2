-- Alerts, and the per-tenant ordered change log that every watch stream reads.
--
-- An alert row keeps its filterable fields as columns and the whole alert as
-- JSON (`doc`). Every change to an alert (and later to incidents) appends one
-- change_log row in the same transaction, carrying the state after the change.
-- change_log uses the same (xid, seq) ordering as events (see 0002_events.sql),
-- so watch cursors resume with no gaps and no repeats.
CREATE TABLE alerts (
    tenant_id   UUID NOT NULL,
    id          UUID NOT NULL,
    fingerprint TEXT NOT NULL,
    severity    SMALLINT NOT NULL,
    status      SMALLINT NOT NULL,
    category    TEXT NOT NULL,
    last_seen   TIMESTAMPTZ NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL,
    incident_id UUID,
    doc         JSONB NOT NULL,
    PRIMARY KEY (tenant_id, id)
);
CREATE INDEX alerts_last_seen ON alerts (tenant_id, last_seen DESC, id DESC);
CREATE INDEX alerts_fingerprint ON alerts (tenant_id, fingerprint, last_seen DESC);

CREATE TABLE change_log (
    tenant_id  UUID NOT NULL,
    xid        XID8 NOT NULL DEFAULT pg_current_xact_id(),
    seq        BIGINT GENERATED ALWAYS AS IDENTITY,
    stream     TEXT NOT NULL,
    subject_id UUID NOT NULL,
    kind       TEXT NOT NULL,
    payload    JSONB NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, stream, xid, seq)
);

ALTER TABLE alerts ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON alerts
    USING (tenant_id = NULLIF(current_setting('picket.tenant_id', true), '')::uuid)
    WITH CHECK (tenant_id = NULLIF(current_setting('picket.tenant_id', true), '')::uuid);
ALTER TABLE change_log ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON change_log
    USING (tenant_id = NULLIF(current_setting('picket.tenant_id', true), '')::uuid)
    WITH CHECK (tenant_id = NULLIF(current_setting('picket.tenant_id', true), '')::uuid);

GRANT SELECT, INSERT, UPDATE, DELETE ON alerts, change_log TO picket_app;

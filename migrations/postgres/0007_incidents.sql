-- Incidents. The row keeps filterable fields as columns and the incident
-- (with its timeline) as JSON. `version` implements optimistic concurrency:
-- every update names the version it read. Every change appends to change_log
-- (stream 'incidents') in the same transaction.
CREATE TABLE incidents (
    tenant_id  UUID NOT NULL,
    id         UUID NOT NULL,
    version    BIGINT NOT NULL,
    status     SMALLINT NOT NULL,
    severity   SMALLINT NOT NULL,
    assignee   TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL,
    doc        JSONB NOT NULL,
    PRIMARY KEY (tenant_id, id)
);
CREATE INDEX incidents_updated ON incidents (tenant_id, updated_at DESC, id DESC);
ALTER TABLE incidents ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON incidents
    USING (tenant_id = NULLIF(current_setting('picket.tenant_id', true), '')::uuid)
    WITH CHECK (tenant_id = NULLIF(current_setting('picket.tenant_id', true), '')::uuid);
GRANT SELECT, INSERT, UPDATE, DELETE ON incidents TO picket_app;

-- Per-tenant detection rules: the tenant's own Sigma rules (sigma_yaml set),
-- and enable/disable overrides of built-in or directory rules (sigma_yaml NULL).
CREATE TABLE tenant_rules (
    tenant_id  UUID NOT NULL,
    rule_id    TEXT NOT NULL,
    title      TEXT NOT NULL,
    sigma_yaml TEXT,
    enabled    BOOLEAN NOT NULL,
    created_at TIMESTAMPTZ NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (tenant_id, rule_id)
);
ALTER TABLE tenant_rules ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON tenant_rules
    USING (tenant_id = NULLIF(current_setting('picket.tenant_id', true), '')::uuid)
    WITH CHECK (tenant_id = NULLIF(current_setting('picket.tenant_id', true), '')::uuid);
GRANT SELECT, INSERT, UPDATE, DELETE ON tenant_rules TO picket_app;

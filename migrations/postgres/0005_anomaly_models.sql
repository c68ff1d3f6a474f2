-- Fitted anomaly models per tenant and algorithm (the anomaly module's
-- versioned byte format), with when and on how many windows they were trained.
CREATE TABLE anomaly_models (
    tenant_id  UUID NOT NULL,
    algorithm  TEXT NOT NULL,
    trained_at TIMESTAMPTZ NOT NULL,
    windows    INTEGER NOT NULL,
    threshold  DOUBLE PRECISION NOT NULL,
    model      BYTEA NOT NULL,
    PRIMARY KEY (tenant_id, algorithm)
);
ALTER TABLE anomaly_models ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON anomaly_models
    USING (tenant_id = NULLIF(current_setting('picket.tenant_id', true), '')::uuid)
    WITH CHECK (tenant_id = NULLIF(current_setting('picket.tenant_id', true), '')::uuid);
GRANT SELECT, INSERT, UPDATE, DELETE ON anomaly_models TO picket_app;

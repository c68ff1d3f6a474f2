-- Signed webhooks: sources (one per sending system, named in the URL) and the
-- delivery ids already processed, for deduplication.
--
-- The signing secret cannot be stored as a hash: verifying an HMAC needs the
-- raw key. It is stored sealed (XChaCha20-Poly1305 under a key derived from the
-- server's key-hashing secret, bound to the source id); see ARCHITECTURE.md.
CREATE TABLE webhook_sources (
    tenant_id                 UUID NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    id                        UUID PRIMARY KEY,
    name                      TEXT NOT NULL UNIQUE,
    secret                    BYTEA NOT NULL,
    allow_body_only_signature BOOLEAN NOT NULL,
    created_at                TIMESTAMPTZ NOT NULL,
    secret_rotated_at         TIMESTAMPTZ NOT NULL
);
CREATE INDEX webhook_sources_tenant ON webhook_sources (tenant_id, name);

CREATE TABLE webhook_deliveries (
    tenant_id   UUID NOT NULL,
    source_id   UUID NOT NULL REFERENCES webhook_sources (id) ON DELETE CASCADE,
    delivery_id TEXT NOT NULL,
    received_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (source_id, delivery_id)
);

ALTER TABLE webhook_sources ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON webhook_sources
    USING (tenant_id = NULLIF(current_setting('picket.tenant_id', true), '')::uuid)
    WITH CHECK (tenant_id = NULLIF(current_setting('picket.tenant_id', true), '')::uuid);
ALTER TABLE webhook_deliveries ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON webhook_deliveries
    USING (tenant_id = NULLIF(current_setting('picket.tenant_id', true), '')::uuid)
    WITH CHECK (tenant_id = NULLIF(current_setting('picket.tenant_id', true), '')::uuid);
GRANT SELECT, INSERT, UPDATE, DELETE ON webhook_sources, webhook_deliveries TO picket_app;

-- A delivery names its source in the URL before the tenant is known. Like
-- picket_find_api_key, this definer-rights function returns exactly one
-- source by name and nothing else.
CREATE FUNCTION picket_find_webhook_source(p_name TEXT) RETURNS SETOF webhook_sources
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public
AS $$ SELECT * FROM webhook_sources WHERE name = p_name $$;
REVOKE ALL ON FUNCTION picket_find_webhook_source(TEXT) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION picket_find_webhook_source(TEXT) TO picket_app;

-- The operator rotates or deletes a source by id without naming its tenant;
-- this returns only the owning tenant's id.
CREATE FUNCTION picket_webhook_source_tenant(p_id UUID) RETURNS UUID
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public
AS $$ SELECT tenant_id FROM webhook_sources WHERE id = p_id $$;
REVOKE ALL ON FUNCTION picket_webhook_source_tenant(UUID) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION picket_webhook_source_tenant(UUID) TO picket_app;

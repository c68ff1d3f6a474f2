-- Foundation: platform tables (settings, tenants) and the first tenant-owned
-- table (api_keys), plus the role the application runs as.
--
-- Row-level security model: the server connects as the migrating (owner) role,
-- then every pooled connection runs `SET ROLE picket_app`. picket_app is not a
-- superuser, owns no table and has NOBYPASSRLS, so the policies below always
-- apply to it. Each tenant transaction sets `picket.tenant_id` with
-- set_config(..., true) (transaction-local); with no setting, no row matches.

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'picket_app') THEN
        CREATE ROLE picket_app NOLOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE;
    END IF;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
    NULL; -- another database on this cluster created it concurrently
END $$;

DO $$
BEGIN
    IF NOT pg_has_role(session_user, 'picket_app', 'MEMBER') THEN
        EXECUTE format('GRANT picket_app TO %I', session_user);
    END IF;
EXCEPTION WHEN OTHERS THEN
    -- a concurrent GRANT of the same membership ("tuple concurrently updated")
    IF NOT pg_has_role(session_user, 'picket_app', 'MEMBER') THEN
        RAISE;
    END IF;
END $$;

GRANT USAGE ON SCHEMA public TO picket_app;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO picket_app;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT USAGE, SELECT ON SEQUENCES TO picket_app;

-- Server-wide settings: the generated key-hashing secret, the operator token hash.
CREATE TABLE settings (
    key        TEXT PRIMARY KEY,
    value      TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- The registry of tenants (platform table: a row is a tenant, not tenant data).
CREATE TABLE tenants (
    id             UUID PRIMARY KEY,
    name           TEXT NOT NULL UNIQUE,
    display_name   TEXT NOT NULL,
    retention_days INTEGER NOT NULL DEFAULT 0,
    created_at     TIMESTAMPTZ NOT NULL
);

-- API keys: only a keyed hash of the secret is stored.
CREATE TABLE api_keys (
    id          TEXT PRIMARY KEY,
    tenant_id   UUID NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    name        TEXT NOT NULL,
    scopes      BIGINT NOT NULL,
    secret_hash BYTEA NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL,
    expires_at  TIMESTAMPTZ,
    revoked_at  TIMESTAMPTZ
);
CREATE INDEX api_keys_tenant_created ON api_keys (tenant_id, created_at DESC);

ALTER TABLE api_keys ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON api_keys
    USING (tenant_id = NULLIF(current_setting('picket.tenant_id', true), '')::uuid)
    WITH CHECK (tenant_id = NULLIF(current_setting('picket.tenant_id', true), '')::uuid);

-- Authentication must find a key before it knows the tenant. This definer-rights
-- function (owned by the migrating role, which RLS does not restrict) returns
-- exactly one key by id and nothing else.
CREATE FUNCTION picket_find_api_key(p_id TEXT) RETURNS SETOF api_keys
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public
AS $$ SELECT * FROM api_keys WHERE id = p_id $$;
REVOKE ALL ON FUNCTION picket_find_api_key(TEXT) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION picket_find_api_key(TEXT) TO picket_app;

GRANT SELECT, INSERT, UPDATE, DELETE ON settings, tenants, api_keys TO picket_app;

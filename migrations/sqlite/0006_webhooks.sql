-- Signed webhooks: same columns as migrations/postgres/0006_webhooks.sql.
-- `secret` holds the sealed signing secret, never the secret in clear.
CREATE TABLE webhook_sources (
    tenant_id                 TEXT NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    id                        TEXT PRIMARY KEY,
    name                      TEXT NOT NULL UNIQUE,
    secret                    BLOB NOT NULL,
    allow_body_only_signature INTEGER NOT NULL,
    created_at                TEXT NOT NULL,
    secret_rotated_at         TEXT NOT NULL
);
CREATE INDEX webhook_sources_tenant ON webhook_sources (tenant_id, name);

CREATE TABLE webhook_deliveries (
    tenant_id   TEXT NOT NULL,
    source_id   TEXT NOT NULL REFERENCES webhook_sources (id) ON DELETE CASCADE,
    delivery_id TEXT NOT NULL,
    received_at TEXT NOT NULL,
    PRIMARY KEY (source_id, delivery_id)
);

-- Per-tenant detection rules: same columns as migrations/postgres/0004.
CREATE TABLE tenant_rules (
    tenant_id  TEXT NOT NULL,
    rule_id    TEXT NOT NULL,
    title      TEXT NOT NULL,
    sigma_yaml TEXT,
    enabled    INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (tenant_id, rule_id)
);

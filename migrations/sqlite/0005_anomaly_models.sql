-- Fitted anomaly models: same columns as migrations/postgres/0005.
CREATE TABLE anomaly_models (
    tenant_id  TEXT NOT NULL,
    algorithm  TEXT NOT NULL,
    trained_at TEXT NOT NULL,
    windows    INTEGER NOT NULL,
    threshold  REAL NOT NULL,
    model      BLOB NOT NULL,
    PRIMARY KEY (tenant_id, algorithm)
);

-- Events: the hot ingest table. Three indexes only (primary key, idempotency,
-- audit-query order) plus the feed index; no foreign key (checked per row, it
-- costs ingest throughput; tenant deletion purges events explicitly).
--
-- Feed order: `xid` is the inserting transaction and `seq` the insert order.
-- Readers of the feed only read rows with xid below the oldest running
-- transaction (pg_snapshot_xmin), so a row can never appear behind a position a
-- reader has already passed: cursors resume with no gaps and no repeats.
CREATE TABLE events (
    tenant_id         UUID NOT NULL,
    id                UUID NOT NULL,
    xid               XID8 NOT NULL DEFAULT pg_current_xact_id(),
    seq               BIGINT GENERATED ALWAYS AS IDENTITY,
    idem              BYTEA NOT NULL,
    occurred_at       TIMESTAMPTZ NOT NULL,
    received_at       TIMESTAMPTZ NOT NULL,
    event_type        TEXT NOT NULL,
    ocsf_class_uid    INTEGER NOT NULL,
    ocsf_category_uid INTEGER NOT NULL,
    actor             TEXT NOT NULL,
    action            TEXT NOT NULL,
    resource          TEXT NOT NULL,
    outcome           SMALLINT NOT NULL,
    severity          SMALLINT NOT NULL,
    source_ip         TEXT,
    destination_ip    TEXT,
    source_system     TEXT NOT NULL,
    service           TEXT NOT NULL,
    environment       TEXT NOT NULL,
    details           JSONB NOT NULL,
    PRIMARY KEY (tenant_id, id)
);
CREATE UNIQUE INDEX events_idempotency ON events (tenant_id, idem);
CREATE INDEX events_occurred ON events (tenant_id, occurred_at DESC, id DESC);
CREATE INDEX events_feed ON events (tenant_id, xid, seq);

ALTER TABLE events ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON events
    USING (tenant_id = NULLIF(current_setting('picket.tenant_id', true), '')::uuid)
    WITH CHECK (tenant_id = NULLIF(current_setting('picket.tenant_id', true), '')::uuid);

GRANT SELECT, INSERT, UPDATE, DELETE ON events TO picket_app;

-- The audit filters of migrations/postgres/0010_event_partitions.sql: one
-- index per EventFilter field, each ending in the page order. SQLite keeps
-- one events table (no partitions): its store is one machine's, and
-- retention deletes rows as before. Idempotency stays the unique index on
-- (tenant_id, idem) of 0002_events.sql; Postgres moved it to `event_keys`
-- because a partitioned table cannot hold that index, and the two behave
-- the same (a key is rejected as long as its event is kept).
CREATE INDEX events_actor ON events (tenant_id, actor, occurred_at DESC, id DESC);
CREATE INDEX events_source_ip ON events (tenant_id, source_ip, occurred_at DESC, id DESC)
    WHERE source_ip IS NOT NULL;
CREATE INDEX events_type ON events (tenant_id, event_type, occurred_at DESC, id DESC);
-- BINARY (byte) order, the column's collation: a prefix is one index range.
CREATE INDEX events_resource ON events (tenant_id, resource, occurred_at DESC, id DESC);
CREATE INDEX events_outcome ON events (tenant_id, outcome, occurred_at DESC, id DESC);

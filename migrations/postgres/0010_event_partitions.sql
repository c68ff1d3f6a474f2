-- Events partitioned by day of `occurred_at`, idempotency in its own table,
-- one index per audit filter.
--
-- Partitions: `events_YYYYMMDD` holds [day 00:00 UTC, next day 00:00 UTC);
-- the server creates them ahead (picket_ensure_event_partitions) and
-- `events_default` takes any event outside the days created (a very late
-- event, or a store whose server has not run yet), so ingest never fails for
-- want of a partition. Creating a day that already has rows in the default
-- partition moves them into the new partition with their feed positions.
--
-- Idempotency: a unique index on a partitioned table must contain the
-- partition key, so `(tenant_id, idem)` cannot be unique on `events` any
-- more. `event_keys` (not partitioned) holds one row per accepted event; the
-- ingest statement inserts the keys first (ON CONFLICT DO NOTHING) and the
-- events of the keys it inserted, in one statement. A key lives as long as
-- its event: retention deletes both.
--
-- Feed order is unchanged: `(xid, seq)`, `seq` from the one identity
-- sequence of the partitioned table, so positions are comparable across
-- partitions and a moved row keeps its position.
--
-- Existing rows are copied into the new table (first into the default
-- partition; the server's first start moves recent days into their own).

ALTER TABLE events RENAME TO events_unpartitioned;
ALTER INDEX events_pkey RENAME TO events_unpartitioned_pkey;
ALTER INDEX events_idempotency RENAME TO events_unpartitioned_idempotency;
ALTER INDEX events_occurred RENAME TO events_unpartitioned_occurred;
ALTER INDEX events_feed RENAME TO events_unpartitioned_feed;

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
    details           JSONB NOT NULL
) PARTITION BY RANGE (occurred_at);

CREATE TABLE events_default PARTITION OF events DEFAULT;
-- Partitions are reached only through `events` (and its row-level security):
-- the schema's default privileges would grant the application role each one.
REVOKE ALL ON events_default FROM picket_app;

-- Time order (page order of QueryEvents and ExportEvents), lookups by id,
-- the feed, and one index per EventFilter field, each ending in the page
-- order so a filtered first page reads only its own rows.
CREATE INDEX events_occurred ON events (tenant_id, occurred_at DESC, id DESC);
-- Lookups by id, and a second row under an id already stored is refused
-- when it claims the same time. A unique index of a partitioned table must
-- hold the partition key, so the same id at another time is not caught
-- here; ids are server-assigned UUIDv7 and do not repeat.
CREATE UNIQUE INDEX events_id ON events (tenant_id, id, occurred_at);
CREATE INDEX events_feed ON events (tenant_id, xid, seq);
CREATE INDEX events_actor ON events (tenant_id, actor, occurred_at DESC, id DESC);
CREATE INDEX events_source_ip ON events (tenant_id, source_ip, occurred_at DESC, id DESC)
    WHERE source_ip IS NOT NULL;
CREATE INDEX events_type ON events (tenant_id, event_type, occurred_at DESC, id DESC);
-- Byte order, so a prefix is one index range whatever the database collation.
CREATE INDEX events_resource ON events (tenant_id, (resource COLLATE "C"), occurred_at DESC, id DESC);
CREATE INDEX events_outcome ON events (tenant_id, outcome, occurred_at DESC, id DESC);

ALTER TABLE events ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON events
    USING (tenant_id = NULLIF(current_setting('picket.tenant_id', true), '')::uuid)
    WITH CHECK (tenant_id = NULLIF(current_setting('picket.tenant_id', true), '')::uuid);
GRANT SELECT, INSERT, UPDATE, DELETE ON events TO picket_app;

CREATE TABLE event_keys (
    tenant_id   UUID NOT NULL,
    idem        BYTEA NOT NULL,
    id          UUID NOT NULL,
    occurred_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (tenant_id, idem)
);
-- Retention deletes a tenant's keys by event time.
CREATE INDEX event_keys_occurred ON event_keys (tenant_id, occurred_at);

ALTER TABLE event_keys ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON event_keys
    USING (tenant_id = NULLIF(current_setting('picket.tenant_id', true), '')::uuid)
    WITH CHECK (tenant_id = NULLIF(current_setting('picket.tenant_id', true), '')::uuid);
GRANT SELECT, INSERT, DELETE ON event_keys TO picket_app;

INSERT INTO event_keys (tenant_id, idem, id, occurred_at)
    SELECT tenant_id, idem, id, occurred_at FROM events_unpartitioned;
INSERT INTO events OVERRIDING SYSTEM VALUE
    SELECT tenant_id, id, xid, seq, idem, occurred_at, received_at, event_type, ocsf_class_uid,
           ocsf_category_uid, actor, action, resource, outcome, severity, source_ip, destination_ip,
           source_system, service, environment, details
    FROM events_unpartitioned;
SELECT setval(pg_get_serial_sequence('events', 'seq'),
              COALESCE((SELECT max(seq) FROM events_unpartitioned), 0) + 1, false);
DROP TABLE events_unpartitioned;

-- Creates the day partitions from `first_day` to `last_day` (inclusive) that
-- do not exist yet; returns how many it created. Rows of those days already
-- in the default partition move into the new partition, keeping their feed
-- position. Owner's rights: the server's role may not run DDL. A lock wait
-- longer than 5 s fails the call (the caller retries on its next pass)
-- rather than queue every reader of `events` behind it.
CREATE FUNCTION picket_ensure_event_partitions(first_day DATE, last_day DATE) RETURNS INTEGER
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = public SET lock_timeout = '5s'
AS $$
DECLARE
    d DATE;
    part TEXT;
    lo TIMESTAMPTZ;
    hi TIMESTAMPTZ;
    created INTEGER := 0;
BEGIN
    IF last_day - first_day > 400 THEN
        RAISE EXCEPTION 'at most 400 partitions at once';
    END IF;
    -- One creator at a time (several replicas start together).
    PERFORM pg_advisory_xact_lock(hashtextextended('picket:event_partitions', 0));
    d := first_day;
    WHILE d <= last_day LOOP
        part := 'events_' || to_char(d, 'YYYYMMDD');
        IF to_regclass(part) IS NULL THEN
            lo := d::timestamp AT TIME ZONE 'UTC';
            hi := (d + 1)::timestamp AT TIME ZONE 'UTC';
            IF EXISTS (SELECT 1 FROM events_default WHERE occurred_at >= lo AND occurred_at < hi) THEN
                ALTER TABLE events DETACH PARTITION events_default;
                EXECUTE format('CREATE TABLE %I PARTITION OF events FOR VALUES FROM (%L) TO (%L)',
                               part, lo, hi);
                EXECUTE format('REVOKE ALL ON %I FROM picket_app', part);
                INSERT INTO events OVERRIDING SYSTEM VALUE
                    SELECT * FROM events_default WHERE occurred_at >= lo AND occurred_at < hi;
                DELETE FROM events_default WHERE occurred_at >= lo AND occurred_at < hi;
                ALTER TABLE events ATTACH PARTITION events_default DEFAULT;
            ELSE
                EXECUTE format('CREATE TABLE %I PARTITION OF events FOR VALUES FROM (%L) TO (%L)',
                               part, lo, hi);
                EXECUTE format('REVOKE ALL ON %I FROM picket_app', part);
            END IF;
            created := created + 1;
        END IF;
        d := d + 1;
    END LOOP;
    RETURN created;
END
$$;
REVOKE ALL ON FUNCTION picket_ensure_event_partitions(DATE, DATE) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION picket_ensure_event_partitions(DATE, DATE) TO picket_app;

-- Drops every day partition that no tenant still keeps: a partition
-- [lo, hi) is dropped when, for each tenant with a row in it, hi is at or
-- before that tenant's retention cutoff (`tenants[i]` keeps events from
-- `cutoffs[i]` on; a tenant keeping everything passes '-infinity'). Rows of
-- tenants absent from `tenants` (deleted ones) keep nothing. Returns the
-- partitions dropped and the rows they held (the keys of those rows are the
-- caller's to delete, by tenant and time). The default partition is never
-- dropped (retention deletes its rows one by one).
CREATE FUNCTION picket_drop_event_partitions(tenants UUID[], cutoffs TIMESTAMPTZ[])
    RETURNS TABLE (part_name TEXT, part_day DATE, held_rows BIGINT)
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = public SET lock_timeout = '5s'
AS $$
DECLARE
    p RECORD;
    hi TIMESTAMPTZ;
    kept BOOLEAN;
    newest_cutoff TIMESTAMPTZ;
BEGIN
    SELECT max(c) INTO newest_cutoff FROM unnest(cutoffs) AS c;
    FOR p IN
        SELECT c.relname::text AS name, to_date(substr(c.relname, 8), 'YYYYMMDD') AS d
        FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'events'::regclass AND c.relname ~ '^events_[0-9]{8}$'
        ORDER BY 2
    LOOP
        hi := (p.d + 1)::timestamp AT TIME ZONE 'UTC';
        -- Partitions are in day order: once one is newer than every
        -- cutoff, so are the rest.
        EXIT WHEN newest_cutoff IS NULL OR hi > newest_cutoff;
        EXECUTE format(
            'SELECT EXISTS (SELECT 1 FROM unnest($1, $2) AS k(t, c) '
            'WHERE k.c < $3 AND EXISTS (SELECT 1 FROM %I e WHERE e.tenant_id = k.t))',
            p.name) USING tenants, cutoffs, hi INTO kept;
        CONTINUE WHEN kept;
        part_name := p.name;
        part_day := p.d;
        EXECUTE format('SELECT count(*) FROM %I', p.name) INTO held_rows;
        EXECUTE format('DROP TABLE %I', p.name);
        RETURN NEXT;
    END LOOP;
END
$$;
REVOKE ALL ON FUNCTION picket_drop_event_partitions(UUID[], TIMESTAMPTZ[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION picket_drop_event_partitions(UUID[], TIMESTAMPTZ[]) TO picket_app;

-- Report rollups (issue 14): per-tenant aggregates maintained from the
-- committed-event feed, off the write path, so the security summary and the
-- dashboard do not rescan raw events for every request.
--
-- `rollup_positions` holds, per tenant, the feed position (xid, seq) up to
-- which every event is counted in the rollups below; it moves in the same
-- transaction as the counts (compare-and-set on the old position, so two
-- replicas never count an event twice). A report reads the rollups and this
-- position in one snapshot and adds the raw events after it: exact at any
-- moment, whether the rollups have caught up or not.
CREATE TABLE rollup_positions (
    tenant_id  UUID PRIMARY KEY REFERENCES tenants (id) ON DELETE CASCADE,
    xid        BIGINT NOT NULL,
    seq        BIGINT NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL
);

-- Event figures per UTC hour of `occurred_at` (`hour_us`: the hour's start in
-- µs since the epoch). Columns are the event classes of storage/reports.rs.
CREATE TABLE event_rollups (
    tenant_id   UUID NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    hour_us     BIGINT NOT NULL,
    n           BIGINT NOT NULL,
    s1          BIGINT NOT NULL,
    s2          BIGINT NOT NULL,
    s3          BIGINT NOT NULL,
    s4          BIGINT NOT NULL,
    s5          BIGINT NOT NULL,
    auth        BIGINT NOT NULL,
    auth_ok     BIGINT NOT NULL,
    auth_failed BIGINT NOT NULL,
    api         BIGINT NOT NULL,
    firewall    BIGINT NOT NULL,
    quota       BIGINT NOT NULL,
    vpn_in      BIGINT NOT NULL,
    vpn_out     BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, hour_us)
);

-- VPN connects and disconnects per (actor, UTC hour): the open-connection
-- series is a floored running sum per actor, so it needs the actor.
CREATE TABLE vpn_rollups (
    tenant_id   UUID NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    actor       TEXT NOT NULL,
    hour_us     BIGINT NOT NULL,
    connects    BIGINT NOT NULL,
    disconnects BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, actor, hour_us)
);

-- Runs of VPN connects per (actor, network): connects of one network with
-- no gap longer than 30 days between consecutive ones. A connect is from a
-- new network exactly when it starts a run, so "new VPN networks in a range"
-- is a count of runs starting in it.
CREATE TABLE vpn_runs (
    tenant_id UUID NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    actor     TEXT NOT NULL,
    network   TEXT NOT NULL,
    run_start TIMESTAMPTZ NOT NULL,
    run_end   TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (tenant_id, actor, network, run_start)
);
-- The actors with a disconnect: only they can have their open connections
-- floored at zero (reports/mod.rs, the dashboard's VPN series).
CREATE INDEX vpn_rollups_disconnects ON vpn_rollups (tenant_id, hour_us) WHERE disconnects > 0;
CREATE INDEX vpn_runs_start ON vpn_runs (tenant_id, run_start);

ALTER TABLE rollup_positions ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON rollup_positions
    USING (tenant_id = NULLIF(current_setting('picket.tenant_id', true), '')::uuid)
    WITH CHECK (tenant_id = NULLIF(current_setting('picket.tenant_id', true), '')::uuid);
ALTER TABLE event_rollups ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON event_rollups
    USING (tenant_id = NULLIF(current_setting('picket.tenant_id', true), '')::uuid)
    WITH CHECK (tenant_id = NULLIF(current_setting('picket.tenant_id', true), '')::uuid);
ALTER TABLE vpn_rollups ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON vpn_rollups
    USING (tenant_id = NULLIF(current_setting('picket.tenant_id', true), '')::uuid)
    WITH CHECK (tenant_id = NULLIF(current_setting('picket.tenant_id', true), '')::uuid);
ALTER TABLE vpn_runs ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON vpn_runs
    USING (tenant_id = NULLIF(current_setting('picket.tenant_id', true), '')::uuid)
    WITH CHECK (tenant_id = NULLIF(current_setting('picket.tenant_id', true), '')::uuid);
GRANT SELECT, INSERT, UPDATE, DELETE ON rollup_positions, event_rollups, vpn_rollups, vpn_runs
    TO picket_app;

-- Dropping a day partition also takes the day out of every tenant's
-- rollups (a definer-rights function: one statement per table across
-- tenants, where the app role would need one transaction per tenant), and
-- forgets VPN runs that can no longer make a later connect known. The
-- events a large dropped partition held (over 100,000 by its statistics)
-- are read from those statistics (`reltuples`, kept by ANALYZE and
-- autovacuum) instead of counted: a count reads the whole day and took most
-- of the drop's time at 10 M events. Smaller ones are counted.
CREATE OR REPLACE FUNCTION picket_drop_event_partitions(tenants UUID[], cutoffs TIMESTAMPTZ[])
    RETURNS TABLE (part_name TEXT, part_day DATE, held_rows BIGINT)
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = public SET lock_timeout = '5s'
AS $$
DECLARE
    p RECORD;
    hi TIMESTAMPTZ;
    kept BOOLEAN;
    newest_cutoff TIMESTAMPTZ;
    lo_us BIGINT;
    hi_us BIGINT;
BEGIN
    SELECT max(c) INTO newest_cutoff FROM unnest(cutoffs) AS c;
    FOR p IN
        SELECT c.relname::text AS name, to_date(substr(c.relname, 8), 'YYYYMMDD') AS d,
               greatest(c.reltuples, 0)::bigint AS estimate
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
        IF p.estimate > 100000 THEN
            held_rows := p.estimate;
        ELSE
            -- Never analyzed (-1, read as 0) or small: count.
            EXECUTE format('SELECT count(*) FROM %I', p.name) INTO held_rows;
        END IF;
        EXECUTE format('DROP TABLE %I', p.name);
        lo_us := (EXTRACT(EPOCH FROM (p.d::timestamp AT TIME ZONE 'UTC')) * 1000000)::bigint;
        hi_us := lo_us + 86400000000;
        DELETE FROM event_rollups WHERE hour_us >= lo_us AND hour_us < hi_us;
        DELETE FROM vpn_rollups WHERE hour_us >= lo_us AND hour_us < hi_us;
        DELETE FROM vpn_runs WHERE run_end < hi - interval '30 days';
        RETURN NEXT;
    END LOOP;
END
$$;
REVOKE ALL ON FUNCTION picket_drop_event_partitions(UUID[], TIMESTAMPTZ[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION picket_drop_event_partitions(UUID[], TIMESTAMPTZ[]) TO picket_app;

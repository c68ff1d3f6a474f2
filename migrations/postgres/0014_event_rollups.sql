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

-- Report rollups: same as migrations/postgres/0014 (xid is always 0 here).
CREATE TABLE rollup_positions (
    tenant_id  TEXT PRIMARY KEY REFERENCES tenants (id) ON DELETE CASCADE,
    xid        INTEGER NOT NULL,
    seq        INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);

CREATE TABLE event_rollups (
    tenant_id   TEXT NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    hour_us     INTEGER NOT NULL,
    n           INTEGER NOT NULL,
    s1          INTEGER NOT NULL,
    s2          INTEGER NOT NULL,
    s3          INTEGER NOT NULL,
    s4          INTEGER NOT NULL,
    s5          INTEGER NOT NULL,
    auth        INTEGER NOT NULL,
    auth_ok     INTEGER NOT NULL,
    auth_failed INTEGER NOT NULL,
    api         INTEGER NOT NULL,
    firewall    INTEGER NOT NULL,
    quota       INTEGER NOT NULL,
    vpn_in      INTEGER NOT NULL,
    vpn_out     INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, hour_us)
);

CREATE TABLE vpn_rollups (
    tenant_id   TEXT NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    actor       TEXT NOT NULL,
    hour_us     INTEGER NOT NULL,
    connects    INTEGER NOT NULL,
    disconnects INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, actor, hour_us)
);

CREATE TABLE vpn_runs (
    tenant_id TEXT NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    actor     TEXT NOT NULL,
    network   TEXT NOT NULL,
    run_start INTEGER NOT NULL,
    run_end   INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, actor, network, run_start)
);
-- The actors with a disconnect: only they can have their open connections
-- floored at zero (reports/mod.rs, the dashboard's VPN series).
CREATE INDEX vpn_rollups_disconnects ON vpn_rollups (tenant_id, hour_us) WHERE disconnects > 0;
CREATE INDEX vpn_runs_start ON vpn_runs (tenant_id, run_start);

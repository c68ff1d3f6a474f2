-- Enforcement decisions (bans, allows, throttles on IPs, CIDR ranges and
-- actors) and the per-tenant revision log that WatchDecisions streams and
-- every replica's CheckAccess index follows.
--
-- decisions:        every decision as made (the whole decision as JSON in
--                   `doc`, filterable fields as columns); inactive ones are
--                   kept 30 days after they end, with their idempotency key.
-- decision_targets: per target (`scope:value`) the decisions in force and
--                   the effective state as last logged (`state`), and when
--                   time alone next changes them (`next_change_at`).
-- decision_log:     one row per change of one target, numbered by a dense
--                   per-tenant `revision`; old rows are compacted away.
-- decision_heads:   per tenant the newest revision, the compaction floor,
--                   the count of decisions in force and the earliest
--                   next_change_at. Every decision write locks the tenant's
--                   row first (SELECT … FOR UPDATE), so revisions are
--                   assigned in commit order: a reader never sees revision
--                   n+1 committed before revision n (see ARCHITECTURE.md,
--                   "Enforcement").
CREATE TABLE decisions (
    tenant_id  UUID NOT NULL,
    id         UUID NOT NULL,
    target     TEXT NOT NULL,
    scope      TEXT NOT NULL,
    kind       TEXT NOT NULL,
    origin_id  TEXT NOT NULL,
    idem       TEXT,
    created_at TIMESTAMPTZ NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL,
    revoked_at TIMESTAMPTZ,
    doc        JSONB NOT NULL,
    PRIMARY KEY (tenant_id, id)
);
CREATE UNIQUE INDEX decisions_idem ON decisions (tenant_id, idem) WHERE idem IS NOT NULL;
CREATE INDEX decisions_created ON decisions (tenant_id, created_at DESC, id DESC);
CREATE INDEX decisions_target ON decisions (tenant_id, target);

CREATE TABLE decision_targets (
    tenant_id      UUID NOT NULL,
    target         TEXT NOT NULL,
    next_change_at TIMESTAMPTZ NOT NULL,
    state          JSONB NOT NULL,
    PRIMARY KEY (tenant_id, target)
);
CREATE INDEX decision_targets_due ON decision_targets (tenant_id, next_change_at);

CREATE TABLE decision_log (
    tenant_id  UUID NOT NULL,
    revision   BIGINT NOT NULL,
    kind       TEXT NOT NULL,
    entry      JSONB NOT NULL,
    created_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (tenant_id, revision)
);
CREATE INDEX decision_log_created ON decision_log (tenant_id, created_at);

CREATE TABLE decision_heads (
    tenant_id      UUID PRIMARY KEY,
    revision       BIGINT NOT NULL,
    log_floor      BIGINT NOT NULL,
    active         BIGINT NOT NULL,
    next_change_at TIMESTAMPTZ
);

ALTER TABLE decisions ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON decisions
    USING (tenant_id = NULLIF(current_setting('picket.tenant_id', true), '')::uuid)
    WITH CHECK (tenant_id = NULLIF(current_setting('picket.tenant_id', true), '')::uuid);
ALTER TABLE decision_targets ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON decision_targets
    USING (tenant_id = NULLIF(current_setting('picket.tenant_id', true), '')::uuid)
    WITH CHECK (tenant_id = NULLIF(current_setting('picket.tenant_id', true), '')::uuid);
ALTER TABLE decision_log ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON decision_log
    USING (tenant_id = NULLIF(current_setting('picket.tenant_id', true), '')::uuid)
    WITH CHECK (tenant_id = NULLIF(current_setting('picket.tenant_id', true), '')::uuid);
ALTER TABLE decision_heads ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON decision_heads
    USING (tenant_id = NULLIF(current_setting('picket.tenant_id', true), '')::uuid)
    WITH CHECK (tenant_id = NULLIF(current_setting('picket.tenant_id', true), '')::uuid);
GRANT SELECT, INSERT, UPDATE, DELETE ON decisions, decision_targets, decision_log, decision_heads TO picket_app;

-- The expiry task and log compaction run across tenants before they know
-- which tenant has work. This definer-rights function returns, per tenant
-- with decisions, only its schedule: when its decisions next change by time
-- (NULL: never), how many are in force, its newest revision and compaction floor.
CREATE FUNCTION picket_decision_schedule()
    RETURNS TABLE (tenant_id UUID, next_change_at TIMESTAMPTZ, active BIGINT, revision BIGINT, log_floor BIGINT)
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public
AS $$ SELECT tenant_id, next_change_at, active, revision, log_floor FROM decision_heads $$;
REVOKE ALL ON FUNCTION picket_decision_schedule() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION picket_decision_schedule() TO picket_app;

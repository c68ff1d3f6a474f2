-- Response playbooks, their runs, and each tenant's notification settings.
--
-- A playbook row keeps its definition as JSON (`doc`); `version` implements
-- optimistic concurrency (UpdatePlaybook names the version it read). Shared
-- playbooks (the built-in pack, --playbooks-dir) are not stored.
--
-- A run row keeps the whole run (resolved steps, approvals, step results) as
-- JSON and the fields the engine selects on as columns. Every change is a
-- save at the version read that appends the run's state to change_log
-- (stream 'playbook_runs') in the same transaction. `lease_owner` and
-- `lease_until` say which worker executes a runnable run (APPROVED or
-- RUNNING) and until when; a run whose lease expired is taken over.
-- `trigger_key` is set on runs a trigger created: at most one run per
-- playbook and incident.
CREATE TABLE playbooks (
    tenant_id  UUID NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    id         UUID NOT NULL,
    name       TEXT NOT NULL,
    version    BIGINT NOT NULL,
    enabled    BOOLEAN NOT NULL,
    created_at TIMESTAMPTZ NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL,
    doc        JSONB NOT NULL,
    PRIMARY KEY (tenant_id, id),
    UNIQUE (tenant_id, name)
);

CREATE TABLE playbook_runs (
    tenant_id         UUID NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    id                UUID NOT NULL,
    playbook_id       UUID NOT NULL,
    version           BIGINT NOT NULL,
    status            SMALLINT NOT NULL,
    incident_id       UUID,
    created_at        TIMESTAMPTZ NOT NULL,
    updated_at        TIMESTAMPTZ NOT NULL,
    approval_deadline TIMESTAMPTZ NOT NULL,
    lease_owner       TEXT,
    lease_until       TIMESTAMPTZ,
    trigger_key       TEXT,
    doc               JSONB NOT NULL,
    PRIMARY KEY (tenant_id, id)
);
CREATE INDEX playbook_runs_created ON playbook_runs (tenant_id, created_at DESC, id DESC);
CREATE UNIQUE INDEX playbook_runs_trigger ON playbook_runs (tenant_id, trigger_key)
    WHERE trigger_key IS NOT NULL;
-- Runnable runs (APPROVED, RUNNING) by lease expiry, and pending runs by deadline.
CREATE INDEX playbook_runs_runnable ON playbook_runs (lease_until) WHERE status IN (2, 4);
CREATE INDEX playbook_runs_pending ON playbook_runs (approval_deadline) WHERE status = 1;

-- The default notification URL and the outbound signing secret, sealed like
-- webhook source secrets (never in clear).
CREATE TABLE notification_settings (
    tenant_id         UUID PRIMARY KEY REFERENCES tenants (id) ON DELETE CASCADE,
    url               TEXT NOT NULL,
    secret            BYTEA,
    secret_rotated_at TIMESTAMPTZ,
    updated_at        TIMESTAMPTZ NOT NULL
);

ALTER TABLE playbooks ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON playbooks
    USING (tenant_id = NULLIF(current_setting('picket.tenant_id', true), '')::uuid)
    WITH CHECK (tenant_id = NULLIF(current_setting('picket.tenant_id', true), '')::uuid);
ALTER TABLE playbook_runs ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON playbook_runs
    USING (tenant_id = NULLIF(current_setting('picket.tenant_id', true), '')::uuid)
    WITH CHECK (tenant_id = NULLIF(current_setting('picket.tenant_id', true), '')::uuid);
ALTER TABLE notification_settings ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON notification_settings
    USING (tenant_id = NULLIF(current_setting('picket.tenant_id', true), '')::uuid)
    WITH CHECK (tenant_id = NULLIF(current_setting('picket.tenant_id', true), '')::uuid);
GRANT SELECT, INSERT, UPDATE, DELETE ON playbooks, playbook_runs, notification_settings TO picket_app;

-- Workers claim runnable runs of every tenant before they know the tenant.
-- This definer-rights function leases at most p_limit runnable runs whose
-- lease is free or expired to p_owner until p_until, skipping rows another
-- worker is claiming, and returns only their (tenant, id).
CREATE FUNCTION picket_claim_playbook_runs(p_owner TEXT, p_until TIMESTAMPTZ, p_now TIMESTAMPTZ, p_limit INTEGER)
    RETURNS TABLE (tenant_id UUID, id UUID)
    LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = public
AS $$
    UPDATE playbook_runs r SET lease_owner = p_owner, lease_until = p_until
    FROM (SELECT c.tenant_id, c.id FROM playbook_runs c
          WHERE c.status IN (2, 4) AND (c.lease_until IS NULL OR c.lease_until < p_now)
          ORDER BY c.updated_at LIMIT p_limit
          FOR UPDATE SKIP LOCKED) AS claimed
    WHERE r.tenant_id = claimed.tenant_id AND r.id = claimed.id
    RETURNING r.tenant_id, r.id
$$;
REVOKE ALL ON FUNCTION picket_claim_playbook_runs(TEXT, TIMESTAMPTZ, TIMESTAMPTZ, INTEGER) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION picket_claim_playbook_runs(TEXT, TIMESTAMPTZ, TIMESTAMPTZ, INTEGER) TO picket_app;

-- Runs still waiting for approval at their deadline, across tenants: only
-- (tenant, id); each is then expired in its tenant's transaction.
CREATE FUNCTION picket_due_playbook_runs(p_now TIMESTAMPTZ, p_limit INTEGER)
    RETURNS TABLE (tenant_id UUID, id UUID)
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public
AS $$
    SELECT tenant_id, id FROM playbook_runs
    WHERE status = 1 AND approval_deadline <= p_now
    ORDER BY approval_deadline LIMIT p_limit
$$;
REVOKE ALL ON FUNCTION picket_due_playbook_runs(TIMESTAMPTZ, INTEGER) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION picket_due_playbook_runs(TIMESTAMPTZ, INTEGER) TO picket_app;

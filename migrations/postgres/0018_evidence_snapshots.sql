-- Evidence snapshots once per event, beside the alerts instead of inside them.
--
-- An alert keeps up to 100 evidence events, each with a snapshot of the event
-- as it was when the alert was raised (so the evidence survives retention).
-- Inside the alert document that was ~19 KB of JSON per alert in an alert
-- storm, parsed, compressed and written again on every fold, every incident
-- link and every status change, and once more into the change log each time
-- (issue 12: the alert writer, not evaluation, was what an administrator's
-- brute force waited behind). A snapshot is now written once per (tenant,
-- event), shared by every alert that names the event, and never rewritten:
-- alert documents and change-log entries carry evidence ids only, and the
-- store fills the snapshots in when it hands alerts out (get, list, watch).
-- Documents written before this keep their inline snapshots; they move here
-- the next time the alert is written.
CREATE TABLE evidence_snapshots (
    tenant_id UUID NOT NULL,
    event_id  UUID NOT NULL,
    snapshot  JSONB NOT NULL,
    PRIMARY KEY (tenant_id, event_id)
);
ALTER TABLE evidence_snapshots ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON evidence_snapshots
    USING (tenant_id = NULLIF(current_setting('picket.tenant_id', true), '')::uuid)
    WITH CHECK (tenant_id = NULLIF(current_setting('picket.tenant_id', true), '')::uuid);
GRANT SELECT, INSERT, DELETE ON evidence_snapshots TO picket_app;

-- The snapshots grow as fast as a storm's alerts; read by id, they need the
-- planner's statistics as early as the alerts do (see 0017).
CREATE OR REPLACE FUNCTION picket_analyze_busy_tables()
    RETURNS SETOF TEXT
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = public SET lock_timeout = '1s'
AS $$
DECLARE
    t RECORD;
BEGIN
    FOR t IN
        SELECT s.relname::text AS name
        FROM pg_stat_user_tables s JOIN pg_class c ON c.oid = s.relid
        WHERE s.schemaname = 'public'
          AND (s.relname ~ '^events_([0-9]{8}|default)$'
               OR s.relname IN ('event_keys', 'alerts', 'change_log', 'evidence_snapshots'))
          AND (
            (s.last_analyze IS NULL AND s.last_autoanalyze IS NULL AND s.n_live_tup > 1000)
            OR s.n_mod_since_analyze > 1000 + 0.2 * greatest(c.reltuples, 0)
          )
    LOOP
        EXECUTE format('ANALYZE %I', t.name);
        RETURN NEXT t.name;
    END LOOP;
END
$$;
REVOKE ALL ON FUNCTION picket_analyze_busy_tables() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION picket_analyze_busy_tables() TO picket_app;

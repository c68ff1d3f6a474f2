-- One busy table per call, each call its own transaction (issue 12).
--
-- `picket_analyze_busy_tables()` (0017, 0018) analyzes every busy table in
-- the one transaction of its call. The first ANALYZE to store statistics
-- writes `pg_statistic`, which gives that transaction an xid, and the
-- transaction keeps it until the last table is done: 3–4 s of a storm's
-- event partitions. The detection feed reads only below the cluster's
-- oldest running xid (`pg_snapshot_xmin`, see src/storage/postgres.rs), so
-- for those seconds no new event was readable and an administrator's brute
-- force during an alert storm was alerted seconds late. The server now calls
-- this function in a loop, one statement (one transaction) per table: an
-- xid is held only while one table's statistics are written.
--
-- Same choice of tables as 0018, the busiest first, skipping `done` (the
-- tables this round has already analyzed, so a round ends even if the
-- statistics views lag). Returns the table analyzed, or NULL when none is
-- left. A table whose lock cannot be had within a second is skipped (its
-- name returned as analyzed, its statistics left to the next round).
CREATE FUNCTION picket_analyze_busy_table(done TEXT[])
    RETURNS TEXT
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = public SET lock_timeout = '1s'
AS $$
DECLARE
    busiest TEXT;
BEGIN
    SELECT s.relname::text INTO busiest
    FROM pg_stat_user_tables s JOIN pg_class c ON c.oid = s.relid
    WHERE s.schemaname = 'public'
      AND (s.relname ~ '^events_([0-9]{8}|default)$'
           OR s.relname IN ('event_keys', 'alerts', 'change_log', 'evidence_snapshots'))
      AND s.relname::text <> ALL (coalesce(done, '{}'))
      AND (
        (s.last_analyze IS NULL AND s.last_autoanalyze IS NULL AND s.n_live_tup > 1000)
        OR s.n_mod_since_analyze > 1000 + 0.2 * greatest(c.reltuples, 0)
      )
    ORDER BY s.n_mod_since_analyze DESC, s.relname
    LIMIT 1;
    IF busiest IS NOT NULL THEN
        BEGIN
            EXECUTE format('ANALYZE %I', busiest);
        EXCEPTION WHEN lock_not_available THEN
            RAISE NOTICE 'picket: % is locked; its statistics wait for the next round', busiest;
        END;
    END IF;
    RETURN busiest;
END
$$;
REVOKE ALL ON FUNCTION picket_analyze_busy_table(TEXT[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION picket_analyze_busy_table(TEXT[]) TO picket_app;

-- The all-in-one function stays for replicas of the previous version during
-- a rolling upgrade; this version no longer calls it.

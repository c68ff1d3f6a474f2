-- Planner statistics for tables that grew faster than autovacuum analyzes
-- them: the day's event partition during a burst of ingest (a new day's
-- partition starts empty every midnight, and a new database has none), the
-- idempotency keys, alerts and the change log. With no statistics the
-- planner takes the day's partition for nearly empty and reads evidence by id
-- (`id = ANY(…)`, the alert writer) through the time index over the whole
-- range instead of the id index: 0.3–1.3 s per read instead of ~15 ms in an
-- alert storm (issue 12). Autovacuum gets there too, but only after its nap
-- and its other work; the server calls this every 30 s (Postgres only).
--
-- A table is analyzed when it holds over 1,000 rows and was never analyzed,
-- or changed by more than 1,000 rows and 20 % since its last analyze (the
-- shape of autovacuum's own threshold, which is 50 rows and 10 %). Returns
-- the tables analyzed.
CREATE FUNCTION picket_analyze_busy_tables()
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
               OR s.relname IN ('event_keys', 'alerts', 'change_log'))
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

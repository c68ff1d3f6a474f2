-- Each feed waits only for the transactions that can write it (issue 12).
--
-- The event feed and the change log order rows by `(xid, seq)` and used to
-- read only below `pg_snapshot_xmin`, the oldest transaction running anywhere
-- in the cluster (0002, 0003). So a WatchAlerts subscriber waited for every
-- ingest transaction older than the alert's (2,000 rows, 300–450 ms each in
-- an alert storm), and detection waited for the alert writer's transactions,
-- though neither can write the other's feed.
--
-- Now a transaction that writes a feed registers first, before it has an xid:
-- `picket_feed_writer(feed)` takes a shared transaction-level advisory lock
-- `(1885956868, feed)` (0x70696b04: the namespace after detection's
-- 0x70696b01–03, see src/storage/postgres.rs) and notes it in the setting
-- `picket.feed_writer_<feed>`. Feeds: 1 = events, 2 = change_log.
--
-- `picket_feed_fence(snap, feed)` is the position a reader with snapshot
-- `snap` may read up to (exclusive): the smallest xid in progress in `snap`
-- that is either registered for `feed` now or no longer in progress (it may
-- have been a writer that ended after `snap` was taken, its rows invisible to
-- `snap`); `pg_snapshot_xmax(snap)` when there is none. Why no row of `feed`
-- can later appear below it: a writer with an xid below the fence got that
-- xid before `snap` was taken (below xmax), so it registered before that too.
-- If it is in progress in `snap`, then when the locks are read it either
-- still holds its registration (so its xid is the fence or above) or has
-- ended (so the status check, made after the locks are read, stops there).
-- If it is not in progress in `snap`, it ended before, and `snap` sees its
-- rows. The locks are read once (a materialized CTE: two scans of `pg_locks`
-- would be two different moments) and before any status is checked.
--
-- A statement-level trigger on each feed table registers an application
-- writer that has not (one whose first write is to the feed) and refuses one
-- that already has an xid: its rows could land below a fence a reader has
-- passed. Rows the owner's functions move between partitions keep their
-- positions and are not new writes, so only `picket_app` is checked.

CREATE FUNCTION picket_feed_writer(feed INTEGER) RETURNS VOID
    LANGUAGE plpgsql
AS $$
BEGIN
    IF current_setting('picket.feed_writer_' || feed, true) = 'on' THEN
        RETURN;
    END IF;
    IF pg_current_xact_id_if_assigned() IS NOT NULL THEN
        RAISE EXCEPTION 'picket: a transaction must register as a writer of feed % before its first write', feed
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    PERFORM pg_advisory_xact_lock_shared(1885956868, feed);
    PERFORM set_config('picket.feed_writer_' || feed, 'on', true);
END
$$;
REVOKE ALL ON FUNCTION picket_feed_writer(INTEGER) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION picket_feed_writer(INTEGER) TO picket_app;

CREATE FUNCTION picket_feed_fence(snap pg_snapshot, feed INTEGER) RETURNS XID8
    LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    writers BIGINT[];
    x XID8;
BEGIN
    WITH l AS MATERIALIZED (
        SELECT locktype, database, classid, objid, objsubid, virtualtransaction,
               transactionid, mode, granted
        FROM pg_locks
    )
    SELECT coalesce(array_agg(t.transactionid::text::bigint), '{}') INTO writers
    FROM l AS a JOIN l AS t ON t.virtualtransaction = a.virtualtransaction
    WHERE a.locktype = 'advisory' AND a.granted
      AND a.classid = 1885956868 AND a.objid = feed AND a.objsubid = 2
      AND a.database = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND t.locktype = 'transactionid' AND t.mode = 'ExclusiveLock' AND t.granted;
    -- `pg_locks` shows 32-bit xids; an xid in progress is within 2^31 of
    -- any other, so its low 32 bits identify it.
    FOR x IN SELECT v FROM pg_snapshot_xip(snap) AS v ORDER BY v LOOP
        IF x::text::bigint % 4294967296 = ANY (writers)
           OR pg_xact_status(x) IS DISTINCT FROM 'in progress' THEN
            RETURN x;
        END IF;
    END LOOP;
    RETURN pg_snapshot_xmax(snap);
END
$$;
REVOKE ALL ON FUNCTION picket_feed_fence(pg_snapshot, INTEGER) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION picket_feed_fence(pg_snapshot, INTEGER) TO picket_app;

CREATE FUNCTION picket_feed_write_check() RETURNS TRIGGER
    LANGUAGE plpgsql
AS $$
BEGIN
    IF current_user = 'picket_app' THEN
        PERFORM picket_feed_writer(TG_ARGV[0]::integer);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER events_feed_writer BEFORE INSERT ON events
    FOR EACH STATEMENT EXECUTE FUNCTION picket_feed_write_check('1');
CREATE TRIGGER change_log_feed_writer BEFORE INSERT ON change_log
    FOR EACH STATEMENT EXECUTE FUNCTION picket_feed_write_check('2');

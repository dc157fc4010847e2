-- The cheap read of every tick. It reads only the pg_stat_activity
-- shared-memory view (no lock-manager access): client backends by database
-- and state, their oldest transaction, and whether any backend waits for a
-- heavyweight lock, and whether lockjam's role may still see other roles'
-- sessions. The outer join returns one row even on an idle server.
-- $1: lockjam's own pids, left out of every figure.
WITH activity AS (
    SELECT a.datname, a.state, a.backend_type, a.xact_start, a.wait_event_type
    FROM pg_catalog.pg_stat_activity AS a
    WHERE a.pid <> ALL ($1::pg_catalog.int4[])
)
SELECT pg_catalog.statement_timestamp() AS taken_at,
       (SELECT pg_catalog.count(*) FROM activity WHERE wait_event_type = 'Lock') AS lock_waiters,
       -- Re-checked every tick (a cached catalog lookup): a REVOKE of
       -- pg_monitor mid-run would otherwise blind lockjam silently.
       pg_catalog.pg_has_role('pg_read_all_stats', 'USAGE') AS reads_all_stats,
       pg_catalog.pg_is_in_recovery() AS in_recovery,
       g.datname, g.state, g.sessions, g.oldest_xact_start
FROM (SELECT 1) AS one
LEFT JOIN (
    SELECT COALESCE(datname::pg_catalog.text, '') AS datname,
           COALESCE(state, 'unknown') AS state,
           pg_catalog.count(*) AS sessions,
           pg_catalog.min(xact_start) AS oldest_xact_start
    FROM activity
    -- Without pg_read_all_stats, other roles' sessions show a NULL
    -- backend_type and state: counted as client sessions in state unknown.
    WHERE backend_type = 'client backend' OR backend_type IS NULL
    GROUP BY 1, 2
) AS g ON true

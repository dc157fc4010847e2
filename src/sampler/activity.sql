-- Client sessions by database and state, and their oldest transaction:
-- read every sampler.activity_interval, not every tick. It scans the
-- backends' status once through pg_stat_get_activity, without the view's
-- joins to pg_database and pg_authid; database names are joined to the
-- few grouped rows instead. The outer join returns one row on an idle
-- server.
-- The same pass answers what the probe of the tick would (probe.sql's
-- columns: the waiting pids per group, the rest repeated on every row),
-- so a tick that reads the sessions runs no probe: one scan of the
-- backends' status per sample. Groups of other backends (client = false)
-- are there for their waiters only. (Reading the waiters' sessions from
-- this scan too, through a MATERIALIZED CTE of every backend's columns,
-- was measured on PostgreSQL 15 beside 1,000 sessions, once a second:
-- 6.8-7.2 ms against 2.6 + 5.3 ms for the two statements while 100 wait,
-- but 4.1-4.8 ms against 2.6-2.9 ms while calm. Calm is the common case,
-- so waiters.sql keeps its own scan.)
-- $1: lockjam's own pids, left out of every figure.
-- A group's datname is '' when its database is gone or unknown; the row
-- with no group has none.
SELECT pg_catalog.statement_timestamp() AS taken_at,
       pg_catalog.pg_has_role('pg_read_all_stats', 'USAGE') AS reads_all_stats,
       pg_catalog.pg_is_in_recovery() AS in_recovery,
       CASE WHEN g.state IS NOT NULL THEN COALESCE(d.datname::pg_catalog.text, '') END AS datname,
       g.client, g.state, g.sessions, g.oldest_xact_start, g.lock_waiting_pids
FROM (SELECT 1) AS one
LEFT JOIN (
    SELECT a.datid,
           COALESCE(a.state, 'unknown') AS state,
           -- Without pg_read_all_stats, other roles' sessions show a NULL
           -- backend_type and state: counted as client sessions in state
           -- unknown.
           -- Another lockjam's sessions (application_name lockjam, as
           -- connect.rs sets it) are no application's either.
           COALESCE(a.backend_type = 'client backend', true)
               AND a.application_name IS DISTINCT FROM 'lockjam' AS client,
           pg_catalog.count(*) AS sessions,
           pg_catalog.min(a.xact_start) AS oldest_xact_start,
           pg_catalog.array_agg(a.pid) FILTER (WHERE a.wait_event_type = 'Lock') AS lock_waiting_pids
    FROM pg_catalog.pg_stat_get_activity(NULL) AS a
    WHERE a.pid <> ALL ($1::pg_catalog.int4[])
    GROUP BY 1, 2, 3
) AS g ON true
LEFT JOIN pg_catalog.pg_database AS d ON d.oid = g.datid

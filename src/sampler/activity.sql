-- Client sessions by database and state, and their oldest transaction:
-- read every sampler.activity_interval, not every tick. It scans the
-- backends' status once through pg_stat_get_activity, without the view's
-- joins to pg_database and pg_authid; database names are joined to the
-- few grouped rows instead. The outer join returns one row on an idle
-- server.
-- $1: lockjam's own pids, left out of every figure.
-- A group's datname is '' when its database is gone or unknown; the row
-- with no group has none.
SELECT CASE WHEN g.state IS NOT NULL THEN COALESCE(d.datname::pg_catalog.text, '') END AS datname,
       g.state, g.sessions, g.oldest_xact_start
FROM (SELECT 1) AS one
LEFT JOIN (
    SELECT a.datid,
           COALESCE(a.state, 'unknown') AS state,
           pg_catalog.count(*) AS sessions,
           pg_catalog.min(a.xact_start) AS oldest_xact_start
    FROM pg_catalog.pg_stat_get_activity(NULL) AS a
    -- Without pg_read_all_stats, other roles' sessions show a NULL
    -- backend_type and state: counted as client sessions in state unknown.
    WHERE a.pid <> ALL ($1::pg_catalog.int4[])
      AND (a.backend_type = 'client backend' OR a.backend_type IS NULL)
    GROUP BY 1, 2
) AS g ON true
LEFT JOIN pg_catalog.pg_database AS d ON d.oid = g.datid

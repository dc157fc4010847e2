-- Run only when some backend waits for a heavyweight lock. Waiters are the
-- pids with an ungranted pg_locks row: pg_stat_activity's wait_event is not
-- enough, as a waiting backend shows none for an instant between turns of
-- its wait loop (after deadlock_timeout, for one). pg_blocking_pids takes
-- the lock manager's shared state, so it is called for these pids only,
-- never for every backend. Returns the waiters and every session that
-- blocks one of them.
-- $1: lockjam's own pids; $2: how many characters of query text to keep;
-- $3: whether the server is in recovery (a constant: on a primary the
-- replay part is skipped whole).
WITH waiting AS MATERIALIZED (
    SELECT DISTINCT l.pid
    FROM pg_catalog.pg_locks AS l
    WHERE NOT l.granted AND l.pid <> ALL ($1::pg_catalog.int4[])
), replay_edges AS (
    {replay}
), replay AS (
    -- WAL replay's waits on a hot standby (see replay.sql), with the
    -- database of the object it waits for as its datname.
    SELECT e.waiter AS pid, d.datname::pg_catalog.text AS datname,
           pg_catalog.array_agg(DISTINCT e.holder)
               FILTER (WHERE e.holder IS NOT NULL AND e.holder <> ALL ($1::pg_catalog.int4[])) AS blocked_by
    FROM replay_edges AS e
    LEFT JOIN pg_catalog.pg_database AS d ON d.oid = e.database
    GROUP BY e.waiter, d.datname
), waiters AS (
    SELECT w.pid,
           COALESCE(p.blocked_by, CASE WHEN p.pid IS NULL THEN pg_catalog.pg_blocking_pids(w.pid) END,
                    '{}'::pg_catalog.int4[]) AS blocked_by
    FROM waiting AS w
    LEFT JOIN replay AS p ON p.pid = w.pid
), involved AS (
    SELECT pid FROM waiters
    UNION
    SELECT pg_catalog.unnest(blocked_by) FROM waiters
)
SELECT a.pid, COALESCE(a.datname::pg_catalog.text, p.datname) AS datname,
       a.usename::pg_catalog.text AS usename,
       a.application_name, pg_catalog.host(a.client_addr) AS client_addr,
       a.backend_type, a.state, a.wait_event_type, a.wait_event,
       a.backend_start, a.xact_start, a.query_start,
       CASE WHEN p.pid IS NOT NULL
            THEN 'WAL replay: waits to apply a lock the primary took until the standby queries holding it finish, or max_standby_streaming_delay cancels them'
            ELSE pg_catalog."left"(a.query, $2) END AS query,
       w.blocked_by
FROM involved AS i
JOIN pg_catalog.pg_stat_activity AS a ON a.pid = i.pid
LEFT JOIN waiters AS w ON w.pid = i.pid
LEFT JOIN replay AS p ON p.pid = i.pid

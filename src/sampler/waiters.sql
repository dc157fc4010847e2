-- Run only when some backend waits for a heavyweight lock. Waiters are the
-- pids with an ungranted pg_locks row: pg_stat_activity's wait_event is not
-- enough, as a waiting backend shows none for an instant between turns of
-- its wait loop (after deadlock_timeout, for one). pg_blocking_pids takes
-- the lock manager's shared state, so it is called for these pids only,
-- never for every backend. Returns the waiters and every session that
-- blocks one of them.
-- $1: lockjam's own pids; $2: how many characters of query text to keep.
WITH waiting AS MATERIALIZED (
    SELECT DISTINCT l.pid
    FROM pg_catalog.pg_locks AS l
    WHERE NOT l.granted AND l.pid <> ALL ($1::pg_catalog.int4[])
), waiters AS (
    SELECT w.pid, pg_catalog.pg_blocking_pids(w.pid) AS blocked_by
    FROM waiting AS w
), involved AS (
    SELECT pid FROM waiters
    UNION
    SELECT pg_catalog.unnest(blocked_by) FROM waiters
)
SELECT a.pid, a.datname::pg_catalog.text AS datname, a.usename::pg_catalog.text AS usename,
       a.application_name, pg_catalog.host(a.client_addr) AS client_addr,
       a.backend_type, a.state, a.wait_event_type, a.wait_event,
       a.backend_start, a.xact_start, a.query_start,
       pg_catalog."left"(a.query, $2) AS query,
       w.blocked_by
FROM involved AS i
JOIN pg_catalog.pg_stat_activity AS a ON a.pid = i.pid
LEFT JOIN waiters AS w ON w.pid = i.pid

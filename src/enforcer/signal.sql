-- Sends one signal to one pid, and only if, at this instant:
--   * this session still holds the target's leader lock;
--   * the pid is still the same session in the same transaction
--     (backend_start and xact_start), so a reused pid is never signalled;
--   * the waiter is still the same session, still waits for a lock, and
--     the pid is still among its blockers (or is the waiter itself, for
--     cancel_waiter).
-- One pid per statement: signalling a superuser raises an error, which
-- must not take other signals down with it.
-- $1 pid, $2 its backend_start, $3 its xact_start, $4 waiter pid,
-- $5 waiter backend_start, $6 'cancel' or 'terminate', $7 leader lock key.
-- {terminate} is pg_terminate_backend($1, <ms>) from PostgreSQL 14, which
-- returns once the backend has exited (and its locks are released), and
-- pg_terminate_backend($1) before 14.
WITH target AS (
    SELECT 1 FROM pg_catalog.pg_stat_activity AS a
    WHERE a.pid = $1 AND a.backend_start = $2 AND a.xact_start IS NOT DISTINCT FROM $3
), waiting AS (
    SELECT 1 FROM pg_catalog.pg_stat_activity AS w
    WHERE w.pid = $4 AND w.backend_start = $5 AND w.wait_event_type = 'Lock'
      AND ($1 = $4 OR $1 = ANY (pg_catalog.pg_blocking_pids(w.pid)))
), leader AS (
    SELECT 1 FROM pg_catalog.pg_locks AS l
    WHERE l.locktype = 'advisory' AND l.pid = pg_catalog.pg_backend_pid() AND l.granted
      AND l.classid = ($7::pg_catalog.int8 >> 32)::pg_catalog.oid
      AND l.objid = ($7::pg_catalog.int8 & 4294967295)::pg_catalog.oid
      AND l.objsubid = 1
)
SELECT EXISTS (SELECT 1 FROM leader) AS leader,
       EXISTS (SELECT 1 FROM target) AS target_found,
       EXISTS (SELECT 1 FROM waiting) AS still_blocking,
       CASE WHEN EXISTS (SELECT 1 FROM leader) AND EXISTS (SELECT 1 FROM target) AND EXISTS (SELECT 1 FROM waiting)
            THEN CASE $6::pg_catalog.text
                     WHEN 'terminate' THEN {terminate}
                     ELSE pg_catalog.pg_cancel_backend($1)
                 END
       END AS signalled

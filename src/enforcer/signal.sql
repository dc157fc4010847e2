-- Sends one signal to one pid, and only if, at this instant:
--   * this session still holds the target's leader lock;
--   * the pid is still the same session in the same transaction
--     (backend_start and xact_start), so a reused pid, or a blocker that
--     committed meanwhile, is never signalled;
--   * the waiter is still the same session and still waits for a lock;
--   * for cancel_blockers ($1 <> $4): the pid is a root blocker of the
--     waiter's wait tree: the waiter waits on it directly or through
--     sessions that themselves wait, and it waits for no lock itself (a
--     waiting session is a victim); for cancel_waiter ($1 = $4) the pid is
--     the waiter.
-- The walk up the wait tree calls pg_blocking_pids once per session in
-- it, each session once (UNION drops pids already seen), and stops at the
-- pid sought and at prepared transactions (pid 0): it is bounded by the
-- number of backends, and in practice by the few sessions a migration
-- waits on.
-- One pid per statement: signalling a superuser raises an error, which
-- must not take other signals down with it.
-- $1 pid, $2 its backend_start, $3 its xact_start, $4 waiter pid,
-- $5 waiter backend_start, $6 'cancel' or 'terminate', $7 leader lock key,
-- $8 whether the server is in recovery.
-- {terminate} is pg_terminate_backend($1, <ms>) from PostgreSQL 14, which
-- returns once the backend has exited (and its locks are released), and
-- pg_terminate_backend($1) before 14.
WITH RECURSIVE target AS (
    SELECT 1 FROM pg_catalog.pg_stat_activity AS a
    WHERE a.pid = $1 AND a.backend_start = $2 AND a.xact_start IS NOT DISTINCT FROM $3
), waiter AS (
    SELECT w.pid FROM pg_catalog.pg_stat_activity AS w
    WHERE w.pid = $4 AND w.backend_start = $5
      AND EXISTS (SELECT 1 FROM pg_catalog.pg_locks AS l WHERE l.pid = w.pid AND NOT l.granted)
), replay (waiter, holder, database) AS (
    -- On a hot standby ($8), WAL replay waits for the standby sessions
    -- holding the object it must lock, which pg_blocking_pids does not
    -- know: those holders are its blockers (see replay.sql).
    {replay}
), upstream (pid) AS (
    SELECT b.pid FROM waiter AS w
    CROSS JOIN LATERAL (
        SELECT pg_catalog.unnest(pg_catalog.pg_blocking_pids(w.pid)) AS pid
        UNION ALL
        SELECT r.holder FROM replay AS r WHERE r.waiter = w.pid
    ) AS b
    WHERE $1 <> $4
    UNION
    SELECT b.pid FROM upstream AS u
    CROSS JOIN LATERAL (
        SELECT pg_catalog.unnest(pg_catalog.pg_blocking_pids(u.pid)) AS pid
        UNION ALL
        SELECT r.holder FROM replay AS r WHERE r.waiter = u.pid
    ) AS b
    WHERE u.pid <> $1 AND u.pid <> 0
), blocking AS (
    SELECT 1 FROM waiter
    WHERE $1 = $4
       OR ($1 IN (SELECT pid FROM upstream)
           AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_locks AS l WHERE l.pid = $1 AND NOT l.granted))
), leader AS (
    SELECT 1 FROM pg_catalog.pg_locks AS l
    WHERE l.locktype = 'advisory' AND l.pid = pg_catalog.pg_backend_pid() AND l.granted
      AND l.classid = ($7::pg_catalog.int8 >> 32)::pg_catalog.oid
      AND l.objid = ($7::pg_catalog.int8 & 4294967295)::pg_catalog.oid
      AND l.objsubid = 1
)
SELECT EXISTS (SELECT 1 FROM leader) AS leader,
       EXISTS (SELECT 1 FROM target) AS target_found,
       EXISTS (SELECT 1 FROM blocking) AS still_blocking,
       -- The instant of the checks and the signal: read before the signal,
       -- since a terminate with a wait returns up to 100 ms after the
       -- backend exits.
       pg_catalog.clock_timestamp() AS at,
       CASE WHEN EXISTS (SELECT 1 FROM leader) AND EXISTS (SELECT 1 FROM target) AND EXISTS (SELECT 1 FROM blocking)
            THEN CASE $6::pg_catalog.text
                     WHEN 'terminate' THEN {terminate}
                     ELSE pg_catalog.pg_cancel_backend($1)
                 END
       END AS signalled

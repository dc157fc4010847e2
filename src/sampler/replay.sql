-- On a hot standby, WAL replay (the startup process) takes the ACCESS
-- EXCLUSIVE locks the primary took, and waits while standby sessions hold
-- the object (a recovery conflict, until max_standby_streaming_delay).
-- pg_blocking_pids knows nothing of it (it is no client backend), so its
-- blockers are the sessions holding a granted lock on the object it asks
-- for. One row per (replay's request, holder); holder NULL when none.
-- Shared by waiters.sql and the enforcer's signal.sql.
-- {in_recovery}: a boolean parameter, so that a primary skips it whole.
SELECT r.pid AS waiter, h.pid AS holder, r.database
FROM pg_catalog.pg_stat_activity AS a
JOIN pg_catalog.pg_locks AS r ON r.pid = a.pid AND NOT r.granted
LEFT JOIN pg_catalog.pg_locks AS h
       ON h.granted AND h.pid <> r.pid
      AND h.locktype = r.locktype
      AND h.database IS NOT DISTINCT FROM r.database
      AND h.relation IS NOT DISTINCT FROM r.relation
      AND h.page IS NOT DISTINCT FROM r.page
      AND h.tuple IS NOT DISTINCT FROM r.tuple
      AND h.virtualxid IS NOT DISTINCT FROM r.virtualxid
      AND h.transactionid IS NOT DISTINCT FROM r.transactionid
      AND h.classid IS NOT DISTINCT FROM r.classid
      AND h.objid IS NOT DISTINCT FROM r.objid
      AND h.objsubid IS NOT DISTINCT FROM r.objsubid
WHERE {in_recovery} AND a.backend_type = 'startup'

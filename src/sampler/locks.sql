-- Run only when some backend waits. The ungranted requests of the given
-- pids, and the granted locks they hold on objects somebody waits for: a
-- blocker that holds a conflicting lock on the waited-for object is a hard
-- blocker; one that only queues ahead for it is a soft blocker.
-- `tag` joins every locktag column, so equal tags mean the same object.
-- {waitstart} is pg_locks.waitstart on PostgreSQL 14+, NULL before.
-- $1: waiters and blockers.
WITH locks AS MATERIALIZED (
    SELECT l.pid, l.granted, l.locktype, l.mode, l.database, l.relation,
           pg_catalog.concat_ws(':', l.locktype, l.database, l.relation, l.page, l.tuple,
                                l.virtualxid, l.transactionid, l.classid, l.objid, l.objsubid) AS tag,
           {waitstart} AS waitstart
    FROM pg_catalog.pg_locks AS l
    WHERE l.pid = ANY ($1::pg_catalog.int4[])
)
SELECT k.pid, k.granted, k.locktype, k.mode, k.database, k.relation, k.tag, k.waitstart,
       d.datname::pg_catalog.text AS datname
FROM locks AS k
LEFT JOIN pg_catalog.pg_database AS d ON d.oid = k.database
WHERE NOT k.granted
   OR k.tag IN (SELECT tag FROM locks WHERE NOT granted)

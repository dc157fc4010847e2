-- Run only when an incident's waits have ended (rarely): how its waiter
-- and root blockers are now, to tell who ended it. A root still in the
-- transaction it blocked in still holds its locks; a waiter holding the
-- lock it waited for got it. The lock tag is built as in locks.sql.
-- $1: the pids; $2: the waiter's pid; $3: its lock's tag; $4: its mode.
SELECT a.pid, a.backend_start, a.xact_start, a.query_start, a.state,
       CASE WHEN a.pid = $2::pg_catalog.int4 THEN EXISTS (
           SELECT 1 FROM pg_catalog.pg_locks AS l
           WHERE l.pid = $2::pg_catalog.int4 AND l.granted AND l.mode = $4::pg_catalog.text
             AND pg_catalog.concat_ws(':', l.locktype, l.database, l.relation, l.page, l.tuple,
                                      l.virtualxid, l.transactionid, l.classid, l.objid, l.objsubid)
                 = $3::pg_catalog.text)
       END AS holds
FROM pg_catalog.pg_stat_get_activity(NULL) AS a
WHERE a.pid = ANY ($1::pg_catalog.int4[])

-- Every relation lock on the preflight's relations ($1, oids) in the
-- session's database, granted or waiting, with the session behind it. A
-- prepared transaction has no session (pid 0): its locks share their
-- virtual transaction with its own transactionid lock, whose xid names it
-- in pg_prepared_xacts, and its owner, database and prepare time stand in
-- for the session's. The preflight's own session is left out. WAITSTART is
-- the wait's start on PostgreSQL 14+, else NULL. pg_locks is read once,
-- so that both uses see one lock table.
WITH locks AS MATERIALIZED (
    SELECT * FROM pg_catalog.pg_locks
), prepared AS (
    SELECT t.virtualtransaction, x.gid, x.owner::pg_catalog.text AS owner,
           x.database::pg_catalog.text AS database, x.prepared
    FROM locks AS t
    JOIN pg_catalog.pg_prepared_xacts AS x ON x.transaction = t.transactionid
    WHERE t.locktype = 'transactionid' AND t.pid IS NULL
)
SELECT l.relation::pg_catalog.int8 AS relation,
       COALESCE(l.pid, 0) AS pid,
       l.mode::pg_catalog.text AS mode,
       l.granted,
       WAITSTART AS wait_start,
       COALESCE(a.datname::pg_catalog.text, x.database) AS datname,
       COALESCE(a.usename::pg_catalog.text, x.owner) AS usename,
       a.application_name,
       pg_catalog.host(a.client_addr) AS client_addr,
       COALESCE(a.backend_type, CASE WHEN x.gid IS NOT NULL THEN 'prepared transaction' END) AS backend_type,
       COALESCE(a.state, CASE WHEN x.gid IS NOT NULL THEN 'prepared' END) AS state,
       a.wait_event_type,
       a.wait_event,
       a.backend_start,
       COALESCE(a.xact_start, x.prepared) AS xact_start,
       a.query_start,
       pg_catalog.left(a.query, 200) AS query,
       NULL::pg_catalog.int4[] AS blocked_by,
       x.gid AS prepared_gid,
       pg_catalog.statement_timestamp() AS now
FROM locks AS l
LEFT JOIN pg_catalog.pg_stat_activity AS a ON a.pid = l.pid
LEFT JOIN prepared AS x ON l.pid IS NULL AND x.virtualtransaction = l.virtualtransaction
WHERE l.locktype = 'relation'
  AND l.database = (SELECT oid FROM pg_catalog.pg_database WHERE datname = pg_catalog.current_database())
  AND l.relation::pg_catalog.int8 = ANY ($1::pg_catalog.int8[])
  AND l.pid IS DISTINCT FROM pg_catalog.pg_backend_pid()
ORDER BY l.granted DESC, 2

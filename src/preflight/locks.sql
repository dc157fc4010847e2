-- Every relation lock on the preflight's relations ($1, oids) in the
-- session's database, granted or waiting, with the session behind it (a
-- prepared transaction has none: pid 0). The preflight's own session is
-- left out. WAITSTART is the wait's start on PostgreSQL 14+, else NULL.
SELECT l.relation::pg_catalog.int8 AS relation,
       COALESCE(l.pid, 0) AS pid,
       l.mode::pg_catalog.text AS mode,
       l.granted,
       WAITSTART AS wait_start,
       a.datname::pg_catalog.text AS datname,
       a.usename::pg_catalog.text AS usename,
       a.application_name,
       pg_catalog.host(a.client_addr) AS client_addr,
       a.backend_type,
       a.state,
       a.wait_event_type,
       a.wait_event,
       a.backend_start,
       a.xact_start,
       a.query_start,
       pg_catalog.left(a.query, 200) AS query,
       NULL::pg_catalog.int4[] AS blocked_by,
       pg_catalog.statement_timestamp() AS now
FROM pg_catalog.pg_locks AS l
LEFT JOIN pg_catalog.pg_stat_activity AS a ON a.pid = l.pid
WHERE l.locktype = 'relation'
  AND l.database = (SELECT oid FROM pg_catalog.pg_database WHERE datname = pg_catalog.current_database())
  AND l.relation::pg_catalog.int8 = ANY ($1::pg_catalog.int8[])
  AND l.pid IS DISTINCT FROM pg_catalog.pg_backend_pid()
ORDER BY l.granted DESC, 2

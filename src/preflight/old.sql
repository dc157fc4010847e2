-- Client sessions of the session's database whose transaction began
-- before $1 (seconds ago), oldest first: any of them may take a
-- conflicting lock at any moment and hold it to its end.
SELECT a.pid,
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
       NULL::pg_catalog.int4[] AS blocked_by
FROM pg_catalog.pg_stat_activity AS a
WHERE a.datname = pg_catalog.current_database()
  AND a.backend_type = 'client backend'
  AND a.pid <> pg_catalog.pg_backend_pid()
  AND a.xact_start < pg_catalog.statement_timestamp() - pg_catalog.make_interval(secs => $1::pg_catalog.float8)
ORDER BY a.xact_start
LIMIT 50

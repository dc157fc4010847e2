-- Once per connection: who and where this session is.
SELECT pg_catalog.pg_backend_pid() AS pid,
       pg_catalog.current_database()::pg_catalog.text AS dbname,
       pg_catalog.current_setting('server_version_num')::pg_catalog.int4 AS server_version,
       CURRENT_USER::pg_catalog.text AS role

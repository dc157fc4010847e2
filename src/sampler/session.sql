-- Once per connection: who and where this session is.
SELECT pg_catalog.pg_backend_pid() AS pid,
       pg_catalog.current_database()::pg_catalog.text AS dbname,
       pg_catalog.current_setting('server_version_num')::pg_catalog.int4 AS server_version,
       CURRENT_USER::pg_catalog.text AS role,
       -- The lock table's slots, the size pg_locks walks: what the probe
       -- of probe_locks.sql costs.
       pg_catalog.current_setting('max_locks_per_transaction')::pg_catalog.int8
           * (pg_catalog.current_setting('max_connections')::pg_catalog.int8
              + pg_catalog.current_setting('max_prepared_transactions')::pg_catalog.int8) AS lock_slots

-- The probe of a tick where many sessions are connected (the sampler
-- chooses, see Probe in mod.rs; not on a tick that runs activity.sql):
-- the waiting pids as waiters.sql finds
-- them, from pg_locks' ungranted rows. probe.sql copies every backend's
-- status, so its cost grows with the sessions; this one walks the lock
-- table, so its cost grows with the table's size
-- (max_locks_per_transaction × (max_connections +
-- max_prepared_transactions)) and hardly with the sessions. Both return
-- the same columns and, for a role with pg_read_all_stats, the same pids.
-- $1: lockjam's own pids, left out.
SELECT pg_catalog.statement_timestamp() AS taken_at,
       COALESCE((SELECT pg_catalog.array_agg(DISTINCT l.pid ORDER BY l.pid)
                 FROM pg_catalog.pg_locks AS l
                 WHERE NOT l.granted AND l.pid <> ALL ($1::pg_catalog.int4[])),
                '{}') AS lock_waiting_pids,
       pg_catalog.pg_has_role('pg_read_all_stats', 'USAGE') AS reads_all_stats,
       pg_catalog.pg_is_in_recovery() AS in_recovery

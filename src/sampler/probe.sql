-- The read of a tick while few sessions are connected (with many,
-- probe_locks.sql costs less; the sampler chooses, see Probe in mod.rs;
-- a tick that runs activity.sql learns the same from it and skips both), as
-- cheap as a read of all backends can be: one field of each backend's
-- status through the per-backend functions, with no row of
-- pg_stat_activity formed (half the cost of pg_stat_get_activity(NULL),
-- a fifth of the view's). It says which backends wait for a heavyweight lock
-- (their pids, in order, so that the sampler knows whether the set
-- changed), and whether lockjam's role may still see other roles'
-- sessions; sessions by state (activity.sql) are read less often.
-- Without pg_read_all_stats, other roles' wait events read as NULL, as in
-- the view.
-- $1: lockjam's own pids, left out.
SELECT pg_catalog.statement_timestamp() AS taken_at,
       COALESCE((SELECT pg_catalog.array_agg(w.pid ORDER BY w.pid)
                 FROM (SELECT pg_catalog.pg_stat_get_backend_pid(b) AS pid
                       FROM pg_catalog.pg_stat_get_backend_idset() AS b
                       WHERE pg_catalog.pg_stat_get_backend_wait_event_type(b) = 'Lock') AS w
                 WHERE w.pid <> ALL ($1::pg_catalog.int4[])),
                '{}') AS lock_waiting_pids,
       -- Re-checked every tick (a cached catalog lookup): a REVOKE of
       -- pg_monitor mid-run would otherwise blind lockjam silently.
       pg_catalog.pg_has_role('pg_read_all_stats', 'USAGE') AS reads_all_stats,
       pg_catalog.pg_is_in_recovery() AS in_recovery

//! The queries peers run for the same purpose, written by us from each
//! project's documented shape (sources named), to be timed beside
//! lockjam's own.

/// A peer's query and where its shape comes from.
pub struct Peer {
    pub name: &'static str,
    pub source: &'static str,
    pub sql: &'static str,
}

pub const PEERS: [Peer; 4] = [
    Peer {
        name: "postgres_exporter pg_locks",
        source: "prometheus-community/postgres_exporter, collector/pg_locks.go: lock counts by mode \
                 for every database, a VALUES list of modes cross-joined to pg_database",
        sql: "SELECT pg_database.datname, tmp.mode, COALESCE(count, 0) AS count
FROM (VALUES ('accesssharelock'), ('rowsharelock'), ('rowexclusivelock'), ('shareupdateexclusivelock'),
             ('sharelock'), ('sharerowexclusivelock'), ('exclusivelock'), ('accessexclusivelock'),
             ('sireadlock')) AS tmp(mode)
CROSS JOIN pg_database
LEFT JOIN (SELECT database, lower(mode) AS mode, count(*) AS count
           FROM pg_locks WHERE database IS NOT NULL
           GROUP BY database, lower(mode)) AS tmp2
       ON tmp.mode = tmp2.mode AND pg_database.oid = tmp2.database
ORDER BY 1",
    },
    Peer {
        name: "pgwatch blocking_locks",
        source: "cybertec-postgresql/pgwatch, metric `blocking_locks`: every ungranted pg_locks row joined \
                 to the granted rows on the same relation or transaction id, and to pg_stat_activity twice",
        sql: "SELECT waiting.locktype AS waiting_locktype, waiting_stm.usename::text AS waiting_user,
       coalesce(waiting.mode, 'null') AS waiting_mode,
       coalesce(waiting.relation::regclass::text, 'null') AS waiting_table,
       waiting_stm.query AS waiting_query, waiting.pid AS waiting_pid,
       other.locktype AS other_locktype, other.relation::regclass::text AS other_table,
       other_stm.query AS other_query, other.mode AS other_mode, other.pid AS other_pid,
       other_stm.usename::text AS other_user
FROM pg_catalog.pg_locks AS waiting
JOIN pg_catalog.pg_stat_activity AS waiting_stm ON waiting_stm.pid = waiting.pid
JOIN pg_catalog.pg_locks AS other
  ON (waiting.database = other.database AND waiting.relation = other.relation)
  OR waiting.transactionid = other.transactionid
JOIN pg_catalog.pg_stat_activity AS other_stm ON other_stm.pid = other.pid
WHERE NOT waiting.granted AND waiting.pid <> other.pid AND other.granted
  AND waiting_stm.datname = current_database()",
    },
    Peer {
        name: "pgwatch backends",
        source: "cybertec-postgresql/pgwatch, metric `backends`: session counts by state from one \
                 pg_stat_activity snapshot, with pg_blocking_pids() called for every client backend",
        sql: "WITH sa_snapshot AS (
    SELECT * FROM pg_stat_activity
    WHERE datname = current_database() AND backend_type = 'client backend' AND pid <> pg_backend_pid()
)
SELECT (SELECT count(*) FROM sa_snapshot) AS total,
       (SELECT count(*) FROM pg_stat_activity WHERE pid <> pg_backend_pid()) AS instance_total,
       current_setting('max_connections')::int AS max_connections,
       (SELECT count(*) FROM sa_snapshot WHERE state = 'active') AS active,
       (SELECT count(*) FROM sa_snapshot WHERE state = 'idle') AS idle,
       (SELECT count(*) FROM sa_snapshot WHERE state = 'idle in transaction') AS idleintransaction,
       (SELECT count(*) FROM sa_snapshot WHERE wait_event_type IN ('LWLock', 'Lock', 'BufferPin')) AS waiting,
       (SELECT count(*) FROM sa_snapshot WHERE cardinality(pg_blocking_pids(pid)) > 0) AS blocked,
       (SELECT extract(epoch FROM now() - backend_start)::int FROM sa_snapshot
        ORDER BY backend_start LIMIT 1) AS longest_session_seconds,
       (SELECT extract(epoch FROM now() - xact_start)::int FROM sa_snapshot
        WHERE xact_start IS NOT NULL ORDER BY xact_start LIMIT 1) AS longest_tx_seconds,
       (SELECT extract(epoch FROM now() - query_start)::int FROM sa_snapshot
        WHERE state = 'active' ORDER BY query_start LIMIT 1) AS longest_query_seconds",
    },
    Peer {
        name: "classic lock-monitoring self-join",
        source: "PostgreSQL wiki, Lock Monitoring: pg_locks joined to itself on every lock-tag column \
                 (IS NOT DISTINCT FROM), and to pg_stat_activity twice",
        sql: "SELECT blocked_locks.pid AS blocked_pid, blocked_activity.usename AS blocked_user,
       blocking_locks.pid AS blocking_pid, blocking_activity.usename AS blocking_user,
       blocked_activity.query AS blocked_statement,
       blocking_activity.query AS current_statement_in_blocking_process
FROM pg_catalog.pg_locks blocked_locks
JOIN pg_catalog.pg_stat_activity blocked_activity ON blocked_activity.pid = blocked_locks.pid
JOIN pg_catalog.pg_locks blocking_locks
  ON blocking_locks.locktype = blocked_locks.locktype
 AND blocking_locks.database IS NOT DISTINCT FROM blocked_locks.database
 AND blocking_locks.relation IS NOT DISTINCT FROM blocked_locks.relation
 AND blocking_locks.page IS NOT DISTINCT FROM blocked_locks.page
 AND blocking_locks.tuple IS NOT DISTINCT FROM blocked_locks.tuple
 AND blocking_locks.virtualxid IS NOT DISTINCT FROM blocked_locks.virtualxid
 AND blocking_locks.transactionid IS NOT DISTINCT FROM blocked_locks.transactionid
 AND blocking_locks.classid IS NOT DISTINCT FROM blocked_locks.classid
 AND blocking_locks.objid IS NOT DISTINCT FROM blocked_locks.objid
 AND blocking_locks.objsubid IS NOT DISTINCT FROM blocked_locks.objsubid
 AND blocking_locks.pid != blocked_locks.pid
JOIN pg_catalog.pg_stat_activity blocking_activity ON blocking_activity.pid = blocking_locks.pid
WHERE NOT blocked_locks.granted",
    },
];

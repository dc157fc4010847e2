//! lockjam watches PostgreSQL for lock queues and exports them to
//! Prometheus. Modules in the order data moves through them.

/// Pure: snapshot to lock graph.
pub mod analysis;
/// Audit events of policy decisions.
pub mod audit;
/// Throwaway clusters for the demo, tests and benchmarks.
pub mod cluster;
/// Configuration: file, environment and flags, validated once.
pub mod config;
/// Opening lockjam's own sessions (TLS, timeouts, read-only).
pub mod connect;
/// `lockjam demo`: incident 000 replayed on a throwaway cluster.
pub mod demo;
/// Connection strings, libpq environment defaults, TLS modes.
pub mod dsn;
/// Durations as people write them, within PostgreSQL's bounds.
pub mod duration;
/// The only code that signals backends; leader election.
pub mod enforcer;
/// The only module that knows axum and hyper.
pub mod http;
/// Incident history: the tracker and the SQLite store.
pub mod incidents;
/// The metrics contract; the only module that knows prometheus.
pub mod metrics;
/// Pure: which sessions to signal, under the safety rules.
pub mod policy;
/// `lockjam preflight`: may a migration take its lock now?
pub mod preflight;
/// The code that reads from PostgreSQL.
pub mod sampler;
/// Target tasks and the HTTP server, run together.
pub mod service;
/// Pure: which replicas of a sharded deployment watch a target.
pub mod shard;
/// Plain data of one sample.
pub mod snapshot;
/// Incident 000 staged alike for the demo, the tests and the benchmarks.
pub mod staging;
/// State shared by target tasks and HTTP.
pub mod state;
/// Pure: the lock graph as trees, for the page and `lockjam tree`.
pub mod tree;
/// How the JSON shows a session, a duration and an instant.
pub mod view;

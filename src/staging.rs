//! Incident stagings shared by `lockjam demo`, the integration tests and
//! the benchmarks, so that all three replay the same incident 000: the
//! `orders` schema and its statements, a session opener that names the
//! application, and lockjam's configuration for one target.

use std::net::SocketAddr;

use tokio_postgres::{Client, NoTls};

use crate::config::{
    Config, IncidentsConfig, LogConfig, LogFormat, SamplerConfig, ServerConfig, ShardingConfig, Target,
};
use crate::dsn::{Dsn, DsnError};
use crate::policy::Policy;

/// Customers and `orders` with `rows` orders and the foreign key incident
/// 000's migration drops.
pub fn orders_schema(rows: u64) -> String {
    format!(
        "CREATE TABLE customers (id bigint PRIMARY KEY, name text NOT NULL);
         INSERT INTO customers SELECT g, 'customer ' || g FROM generate_series(1, 1000) AS g;
         CREATE TABLE orders (
             id bigint PRIMARY KEY,
             customer_id bigint NOT NULL CONSTRAINT orders_customer_id_fkey REFERENCES customers,
             total numeric(12, 2) NOT NULL,
             status text NOT NULL,
             created_at timestamptz NOT NULL);
         INSERT INTO orders SELECT g, 1 + g % 1000, (g % 997) * 1.25,
             (ARRAY['new', 'paid', 'shipped'])[1 + g % 3], now() - g * interval '1 minute'
         FROM generate_series(1, {rows}) AS g;
         CREATE INDEX ON orders (customer_id);"
    )
}

/// Incident 000's long read: it holds ACCESS SHARE on `orders` for an hour.
pub const LONG_READ: &str = "SELECT pg_sleep(3600), count(*) AS orders, sum(total) AS revenue FROM orders";
/// Incident 000's migration: ACCESS EXCLUSIVE on `orders` (and SHARE ROW
/// EXCLUSIVE on `customers`).
pub const DROP_CONSTRAINT: &str = "ALTER TABLE orders DROP CONSTRAINT orders_customer_id_fkey";
/// The application's query that queues behind the migration.
pub(crate) const APP_QUERY: &str =
    "SELECT id, total FROM orders WHERE customer_id = $1 ORDER BY created_at DESC LIMIT 20";

/// A session to `dsn` named `application_name` (quoted, so any name works);
/// its connection runs on a task of its own.
pub async fn connect(dsn: &str, application_name: &str) -> Result<Client, tokio_postgres::Error> {
    let name = application_name.replace('\\', "\\\\").replace('\'', "\\'");
    let (client, connection) = tokio_postgres::connect(&format!("{dsn} application_name='{name}'"), NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

/// lockjam's configuration for these (name, DSN) targets, with the
/// default cadence, plain HTTP on `listen`, warnings only in the log and
/// incident history in memory (a throwaway cluster's history is thrown
/// away with it).
pub fn config(targets: &[(&str, &str)], listen: SocketAddr, policy: Policy) -> Result<Config, DsnError> {
    Ok(Config {
        server: ServerConfig::plain(listen),
        sampler: SamplerConfig::default(),
        targets: targets
            .iter()
            .map(|(name, dsn)| {
                Ok(Target {
                    name: name.to_string(),
                    dsn: Dsn::parse(dsn)?,
                    default_user: None,
                })
            })
            .collect::<Result<_, DsnError>>()?,
        log: LogConfig {
            format: LogFormat::Text,
            level: "warn".into(),
        },
        policy,
        incidents: IncidentsConfig {
            path: None,
            ..IncidentsConfig::default()
        },
        sharding: ShardingConfig::default(),
        notes: Vec::new(),
    })
}

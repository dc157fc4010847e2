//! `lockjam demo`: incident 000 replayed with real sessions on a throwaway
//! cluster, with lockjam watching. A long read holds ACCESS SHARE on
//! `orders`, `ALTER TABLE orders DROP CONSTRAINT` waits behind it for ACCESS
//! EXCLUSIVE, and the application's SELECTs queue behind the ALTER. The demo
//! prints what lockjam sees, ends the read as the operator of incident 001
//! did, shows the queue draining, and cleans up.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;
use tokio_postgres::Client;

use crate::analysis::LockGraph;
use crate::cluster::{Cluster, ClusterError, ClusterOptions};
use crate::policy::Policy;
use crate::service::{Service, ServiceError};
use crate::staging::{self, APP_QUERY, DROP_CONSTRAINT, LONG_READ};

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error(transparent)]
    Service(#[from] ServiceError),
    #[error("demo session failed: {0}")]
    Session(String),
    #[error("the demo was interrupted")]
    Interrupted,
}

#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub listen: SocketAddr,
    /// Application queries that arrive while the migration waits.
    pub queries: usize,
    /// How long the incident lasts before the long read is cancelled.
    pub hold: Duration,
}

/// Orders in the demo's table: enough that a read takes a moment.
const ORDERS: u64 = 50_000;

fn session_error(e: impl std::fmt::Display) -> DemoError {
    DemoError::Session(e.to_string())
}

async fn connect(dsn: &str, application_name: &str) -> Result<Client, DemoError> {
    staging::connect(dsn, application_name).await.map_err(session_error)
}

/// Runs the demo; Ctrl-C ends it early, cleaning up all the same.
pub async fn run(options: DemoOptions) -> Result<(), DemoError> {
    println!("lockjam demo: incident 000 (a migration queued behind a long read) replayed with real sessions\n");
    let cluster = tokio::task::spawn_blocking(|| Cluster::start(&ClusterOptions::default()))
        .await
        .map_err(session_error)??;
    println!(
        "  started a throwaway cluster: {} on 127.0.0.1:{}",
        cluster.version(),
        cluster.port()
    );
    let outcome = tokio::select! {
        outcome = scenario(&cluster, &options) => outcome,
        _ = tokio::signal::ctrl_c() => Err(DemoError::Interrupted),
    };
    if matches!(outcome, Err(DemoError::Interrupted)) {
        println!("\n  interrupted: cleaning up");
    }
    tokio::task::spawn_blocking(move || drop(cluster))
        .await
        .map_err(session_error)?;
    println!("  stopped and removed the throwaway cluster");
    outcome
}

async fn scenario(cluster: &Cluster, options: &DemoOptions) -> Result<(), DemoError> {
    let dsn = cluster.dsn("shop");
    let admin = connect(&cluster.dsn("postgres"), "demo").await?;
    admin
        .batch_execute("CREATE DATABASE shop")
        .await
        .map_err(session_error)?;
    let owner = connect(&dsn, "demo").await?;
    owner
        .batch_execute(&format!(
            "CREATE ROLE analyst LOGIN; {} GRANT SELECT ON orders, customers TO analyst;",
            staging::orders_schema(ORDERS)
        ))
        .await
        .map_err(session_error)?;
    println!("  created database shop: customers (1,000 rows), orders (50,000 rows) with orders_customer_id_fkey");

    let service = start_service(&dsn, options.listen).await?;
    let addr = service.local_addr();
    println!("  lockjam is watching it: http://{addr}/metrics and http://{addr}/api/v1/snapshot\n");
    let shared = service.shared().clone();
    let result = replay(cluster, &dsn, options, &shared, &owner).await;
    service.stop().await;
    result
}

async fn start_service(dsn: &str, listen: SocketAddr) -> Result<Service, DemoError> {
    let mut config = staging::config(&[("demo", dsn)], listen, Policy::default()).map_err(session_error)?;
    match Service::start(&config).await {
        Err(ServiceError::Bind { addr, .. }) => {
            println!("  {addr} is taken; lockjam listens on a free port instead");
            config.server.listen = SocketAddr::from(([127, 0, 0, 1], 0));
            Ok(Service::start(&config).await?)
        }
        other => Ok(other?),
    }
}

async fn replay(
    cluster: &Cluster,
    dsn: &str,
    options: &DemoOptions,
    shared: &Arc<crate::state::SharedState>,
    owner: &Client,
) -> Result<(), DemoError> {
    let clock = Clock(Instant::now());
    let incident = start_incident(cluster, dsn, &clock).await?;
    let app_queries = queue_app_queries(dsn, options, shared, &clock).await?;
    let root = graph(shared)
        .and_then(|g| g.blockers.iter().find(|b| b.is_root).map(|b| b.pid))
        .unwrap_or(incident.analyst_pid);
    println!(
        "\n{} ending the incident: cancelling root blocker pid {root}, as the operator of incident 001 did by hand",
        clock.stamp()
    );
    owner
        .query_one("SELECT pg_cancel_backend($1)", &[&root])
        .await
        .map_err(session_error)?;
    report_ending(incident, app_queries, options, shared, &clock).await;
    println!(
        "\nWhat lockjam exported is the same on /metrics, e.g. lockjam_lock_queue_depth and lockjam_blocked_sessions."
    );
    println!("Run it against your own database: lockjam run --dsn 'host=... user=lockjam dbname=postgres'");
    Ok(())
}

/// Time since the replay began, as each line of the demo shows it.
struct Clock(Instant);

impl Clock {
    fn stamp(&self) -> String {
        format!("[{:5.1}s]", self.0.elapsed().as_secs_f64())
    }
}

/// The incident's two sessions, running.
struct Incident {
    /// The long read and the migration, each with what it is.
    sessions: JoinSet<(&'static str, Result<(), tokio_postgres::Error>)>,
    analyst_pid: i32,
    migration_started: Instant,
}

/// The analyst's long read, then, a second later, the migration.
async fn start_incident(cluster: &Cluster, dsn: &str, clock: &Clock) -> Result<Incident, DemoError> {
    let mut sessions = JoinSet::new();
    let analyst = connect(
        &format!("host=127.0.0.1 port={} user=analyst dbname=shop", cluster.port()),
        "psql",
    )
    .await?;
    let analyst_pid: i32 = analyst
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .map_err(session_error)?
        .get(0);
    println!(
        "{} an analyst starts a long report on orders (pid {analyst_pid}):\n          {LONG_READ}",
        clock.stamp()
    );
    sessions.spawn(async move { ("long read", analyst.simple_query(LONG_READ).await.map(|_| ())) });
    tokio::time::sleep(Duration::from_secs(1)).await;

    let migration = connect(dsn, "django migrate").await?;
    println!(
        "{} the deploy runs its migration, which needs ACCESS EXCLUSIVE on orders:\n          {DROP_CONSTRAINT}",
        clock.stamp()
    );
    let migration_started = Instant::now();
    sessions.spawn(async move { ("migration", migration.simple_query(DROP_CONSTRAINT).await.map(|_| ())) });
    Ok(Incident {
        sessions,
        analyst_pid,
        migration_started,
    })
}

/// The site's queries, spread over `options.hold`, each queuing behind
/// the migration, with what lockjam sees printed every second.
async fn queue_app_queries(
    dsn: &str,
    options: &DemoOptions,
    shared: &crate::state::SharedState,
    clock: &Clock,
) -> Result<JoinSet<Result<(), tokio_postgres::Error>>, DemoError> {
    let mut app_sessions = Vec::new();
    for _ in 0..options.queries {
        app_sessions.push(connect(dsn, "web").await?);
    }
    println!(
        "{} the site keeps sending queries on orders; each now queues behind the migration\n",
        clock.stamp()
    );
    let mut app_queries = JoinSet::new();
    let watch_until = Instant::now() + options.hold;
    let mut next_print = Instant::now();
    let spacing = options.hold / (options.queries.max(1) as u32 + 1);
    for (i, client) in app_sessions.into_iter().enumerate() {
        app_queries.spawn(async move {
            let customer = (i as i64 % 1000) + 1;
            client.query(APP_QUERY, &[&customer]).await.map(|_| ())
        });
        tokio::time::sleep(spacing).await;
        if Instant::now() >= next_print {
            print_view(&clock.stamp(), shared);
            next_print = Instant::now() + Duration::from_secs(1);
        }
    }
    while Instant::now() < watch_until {
        print_view(&clock.stamp(), shared);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Ok(app_queries)
}

/// How the incident ended: the migration, the long read, the site's
/// queries, and the queue as lockjam last saw it.
async fn report_ending(
    mut incident: Incident,
    mut app_queries: JoinSet<Result<(), tokio_postgres::Error>>,
    options: &DemoOptions,
    shared: &crate::state::SharedState,
    clock: &Clock,
) {
    let mut completed = 0;
    while let Some(done) = app_queries.join_next().await {
        if matches!(done, Ok(Ok(()))) {
            completed += 1;
        }
    }
    while let Some(done) = incident.sessions.join_next().await {
        if let Ok((what, result)) = done {
            match (what, result) {
                ("migration", Ok(())) => println!(
                    "{} the migration got its lock and finished after {:.1}s",
                    clock.stamp(),
                    incident.migration_started.elapsed().as_secs_f64()
                ),
                ("long read", Err(e)) => println!(
                    "{} the long read ended: {}",
                    clock.stamp(),
                    e.as_db_error().map_or(e.to_string(), |d| d.message().to_string())
                ),
                (what, Err(e)) => println!("{} {what} failed: {e}", clock.stamp()),
                _ => {}
            }
        }
    }
    println!(
        "{} {completed} of {} queued application queries completed",
        clock.stamp(),
        options.queries
    );
    let drained = Instant::now() + Duration::from_secs(5);
    loop {
        let depth = graph(shared).map(|g| g.queues.iter().map(|q| q.depth).sum::<u64>());
        if depth == Some(0) || Instant::now() > drained {
            print_view(&clock.stamp(), shared);
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn graph(shared: &crate::state::SharedState) -> Option<Arc<LockGraph>> {
    shared.target("demo").and_then(|t| t.status().graph)
}

fn print_view(stamp: &str, shared: &crate::state::SharedState) {
    let Some(graph) = graph(shared) else {
        println!("{stamp} lockjam: no sample yet");
        return;
    };
    if graph.queues.is_empty() && graph.waiters.is_empty() {
        println!("{stamp} lockjam sees no lock waits");
        return;
    }
    let blocked: u64 = graph.databases.values().map(|d| d.blocked_sessions).sum();
    for queue in &graph.queues {
        println!(
            "{stamp} lockjam: queue on {} ({}): {} sessions wait behind pid {}, which has waited {:.1}s; {blocked} blocked in all",
            queue.relation,
            queue.mode,
            queue.depth,
            queue.head_pid,
            queue.head_wait.as_secs_f64()
        );
    }
    for root in graph.blockers.iter().filter(|b| b.is_root) {
        let session = root.session.as_ref();
        let field = |f: fn(&crate::snapshot::Session) -> Option<String>| session.and_then(f).unwrap_or_default();
        println!(
            "{stamp}          root blocker pid {} ({}@{}, {}, transaction {:.1}s old): {}",
            root.pid,
            field(|s| s.usename.clone()),
            field(|s| s.application_name.clone()),
            field(|s| s.state.clone()),
            root.transaction_age.unwrap_or_default().as_secs_f64(),
            field(|s| s.query.clone())
        );
    }
}

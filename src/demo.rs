//! `lockjam demo`: incident 000 replayed with real sessions on a throwaway
//! cluster, with lockjam watching. A long read holds ACCESS SHARE on
//! `orders`, `ALTER TABLE orders DROP CONSTRAINT` waits behind it for ACCESS
//! EXCLUSIVE, and the application's SELECTs queue behind the ALTER. The demo
//! prints what lockjam sees, ends the read as the operator of incident 001
//! did, shows the queue draining, and cleans up.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;
use tokio_postgres::Client;

use crate::analysis::LockGraph;
use crate::cluster::{Cluster, ClusterError, ClusterOptions};
use crate::config::Config;
use crate::policy::{Policy, Rule};
use crate::service::{Service, ServiceError};
use crate::staging::{self, APP_QUERY, DROP_CONSTRAINT, LONG_READ};
use crate::state::SharedState;

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
    println!(
        "lockjam demo: incident 000 (a migration queued behind a long read) replayed twice with real sessions: \
         watched, then cured\n"
    );
    // Ctrl-C is caught from the start: one that comes while the cluster
    // starts waits for it to have started, then removes it.
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    let mut starting = tokio::task::spawn_blocking(|| Cluster::start(&ClusterOptions::default()));
    let cluster = tokio::select! {
        started = &mut starting => started.map_err(session_error)??,
        _ = &mut interrupted => {
            println!("\n  interrupted: removing the cluster being started");
            if let Ok(Ok(cluster)) = starting.await {
                tokio::task::spawn_blocking(move || drop(cluster)).await.map_err(session_error)?;
            }
            return Err(DemoError::Interrupted);
        }
    };
    println!(
        "  started a throwaway cluster: {} on 127.0.0.1:{}",
        cluster.version(),
        cluster.port()
    );
    let outcome = tokio::select! {
        outcome = scenario(&cluster, &options) => outcome,
        _ = &mut interrupted => Err(DemoError::Interrupted),
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
    // Both acts' lockjam keep their incidents in one store, thrown away
    // with the demo.
    let state = tempfile::Builder::new()
        .prefix("lockjam-demo-")
        .tempdir()
        .map_err(session_error)?;
    let store = state.path().join("incidents.sqlite");

    println!("\nAct 1: the queue forms, and lockjam shows it (policy off)\n");
    let (mut service, mut config) = start_service(&dsn, options.listen, Policy::default(), &store).await?;
    let addr = service.local_addr();
    println!("  lockjam is watching; open its page now: http://{addr}/ (served until the demo ends)\n");
    let shared = service.shared().clone();
    if let Err(error) = act_one(cluster, &dsn, options, &shared, &owner).await {
        service.stop().await;
        return Err(error);
    }

    if let Err(error) = owner.batch_execute(RESTORE_CONSTRAINT).await {
        service.stop().await;
        return Err(session_error(error));
    }
    println!("\n  put orders_customer_id_fkey back, for the same migration in act 2");
    let policy = Policy::acting(vec![Rule::unblock_migrations(CURE_AFTER)]);
    println!(
        "\nAct 2: the same incident, with lockjam's policy live (lockjam run --cancel-blockers-after {}):\n  \
         lockjam cancels what blocks an ACCESS EXCLUSIVE waiter once it has waited {}\n",
        crate::duration::show(CURE_AFTER),
        crate::duration::show(CURE_AFTER)
    );
    // As `kill -HUP` would: the page stays served on the same address.
    config.policy = policy;
    if let Err(error) = service.reload(&config).await {
        service.stop().await;
        return Err(error.into());
    }
    let shared = service.shared().clone();
    let act = act_two(cluster, &dsn, options, &shared).await;
    if act.is_ok() {
        show_history(&shared).await;
    }
    service.stop().await;
    act?;
    println!("\nWhere to look, on your own database:");
    println!("  the page            http://{addr}/ (lockjam run serves it on its listen address)");
    println!("  lockjam tree        the same trees in a terminal, with only pg_monitor: lockjam tree --dsn '...'");
    println!("  lockjam incidents   the history (kept in [incidents] path)");
    println!(
        "  /metrics            lockjam_lock_queue_depth, lockjam_blocked_sessions, ... for Prometheus and Grafana"
    );
    println!(
        "  the cure            lockjam run --dsn 'host=... user=lockjam dbname=postgres' --cancel-blockers-after 30s"
    );
    Ok(())
}

/// How long the migration waits in act 2 before lockjam cancels its root.
const CURE_AFTER: Duration = Duration::from_secs(3);

/// Act 1 dropped the constraint; act 2 drops it again.
const RESTORE_CONSTRAINT: &str =
    "ALTER TABLE orders ADD CONSTRAINT orders_customer_id_fkey FOREIGN KEY (customer_id) REFERENCES customers";

/// lockjam on `listen` (a free port if that is taken), and the
/// configuration it runs, for act 2's reload.
async fn start_service(
    dsn: &str,
    listen: SocketAddr,
    policy: Policy,
    store: &Path,
) -> Result<(Service, Config), DemoError> {
    let mut config = staging::config(&[("demo", dsn)], listen, policy).map_err(session_error)?;
    config.incidents.path = Some(store.to_path_buf());
    match Service::start(&config).await {
        Err(ServiceError::Bind { addr, .. }) => {
            println!("  {addr} is taken; lockjam listens on a free port instead");
            config.server.listen = SocketAddr::from(([127, 0, 0, 1], 0));
            let service = Service::start(&config).await?;
            Ok((service, config))
        }
        other => Ok((other?, config)),
    }
}

/// The queue forms; lockjam shows it, as a tree once it is long; the
/// operator cancels the root by hand, as in incident 001.
async fn act_one(
    cluster: &Cluster,
    dsn: &str,
    options: &DemoOptions,
    shared: &Arc<SharedState>,
    owner: &Client,
) -> Result<(), DemoError> {
    let clock = Clock(Instant::now());
    let incident = start_incident(cluster, dsn, &clock).await?;
    let app_queries = queue_app_queries(dsn, options.queries, options.hold, shared, &clock).await?;
    println!("\n{} lockjam tree (the page shows the same):\n", clock.stamp());
    print_tree(shared);
    let root = graph(shared)
        .and_then(|g| g.blockers.iter().find(|b| b.is_root).map(|b| b.pid))
        .unwrap_or(incident.analyst_pid);
    println!(
        "{} ending act 1 by hand: cancelling root blocker pid {root}, as the operator of incident 001 did",
        clock.stamp()
    );
    owner
        .query_one("SELECT pg_cancel_backend($1)", &[&root])
        .await
        .map_err(session_error)?;
    report_ending(incident, app_queries, options.queries, shared, &clock).await;
    Ok(())
}

/// The same incident; lockjam's policy cancels the root once the
/// migration has waited [`CURE_AFTER`].
async fn act_two(
    cluster: &Cluster,
    dsn: &str,
    options: &DemoOptions,
    shared: &Arc<SharedState>,
) -> Result<(), DemoError> {
    let clock = Clock(Instant::now());
    let incident = start_incident(cluster, dsn, &clock).await?;
    let spread = CURE_AFTER / 2;
    let app_queries = queue_app_queries(dsn, options.queries, spread, shared, &clock).await?;
    println!("\n{} lockjam tree, with what the policy does next:\n", clock.stamp());
    print_tree(shared);
    // lockjam acts on its own; should it not (it always has), the demo
    // ends the read itself rather than wait for ever.
    let acted = tokio::time::timeout(CURE_AFTER + Duration::from_secs(20), async {
        loop {
            if let Some(event) = shared.events.newest_first().into_iter().last() {
                return event;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    match acted {
        Ok(event) => println!(
            "{} lockjam, rule {}: {} root blocker pid {} ({}), {}: {}",
            clock.stamp(),
            event.rule,
            match event.signal {
                "terminate" => "terminated",
                _ => "cancelled",
            },
            event.signalled_pid,
            event
                .blocker
                .as_ref()
                .and_then(|b| b.session.application_name.clone())
                .unwrap_or_default(),
            event.outcome,
            event.reason
        ),
        Err(_) => {
            println!(
                "{} lockjam did not act; the demo cancels the read itself",
                clock.stamp()
            );
            let owner = connect(dsn, "demo").await?;
            owner
                .query_one("SELECT pg_cancel_backend($1)", &[&incident.analyst_pid])
                .await
                .map_err(session_error)?;
        }
    }
    report_ending(incident, app_queries, options.queries, shared, &clock).await;
    Ok(())
}

/// Both acts' incidents, as `lockjam incidents` prints them, once act 2's
/// has closed.
async fn show_history(shared: &SharedState) {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut found = Vec::new();
    while Instant::now() < deadline {
        found = shared.incidents.list(None, None, 10).unwrap_or_default();
        if found.len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("\nlockjam's history (lockjam incidents), newest first:\n");
    print!("{}", crate::incidents::table(&found));
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
    queries: usize,
    hold: Duration,
    shared: &SharedState,
    clock: &Clock,
) -> Result<JoinSet<Result<(), tokio_postgres::Error>>, DemoError> {
    let mut app_sessions = Vec::new();
    for _ in 0..queries {
        app_sessions.push(connect(dsn, "web").await?);
    }
    println!(
        "{} the site keeps sending queries on orders; each now queues behind the migration\n",
        clock.stamp()
    );
    let mut app_queries = JoinSet::new();
    let watch_until = Instant::now() + hold;
    // From a second on: lockjam's first sample of the queue.
    let mut next_print = Instant::now() + Duration::from_secs(1);
    let spacing = hold / (queries.max(1) as u32 + 1);
    for (i, client) in app_sessions.into_iter().enumerate() {
        app_queries.spawn(async move {
            let customer = (i as i64 % 1000) + 1;
            client.query(APP_QUERY, &[&customer]).await.map(|_| ())
        });
        tokio::time::sleep(spacing).await;
        if Instant::now() >= next_print {
            print_view(&clock.stamp(), shared);
            next_print += Duration::from_secs(1);
        }
    }
    while Instant::now() < watch_until {
        tokio::time::sleep_until(next_print.min(watch_until).into()).await;
        if Instant::now() >= next_print {
            print_view(&clock.stamp(), shared);
            next_print += Duration::from_secs(1);
        }
    }
    Ok(app_queries)
}

/// How the incident ended: the migration, the long read, the site's
/// queries, and the queue as lockjam last saw it.
async fn report_ending(
    mut incident: Incident,
    mut app_queries: JoinSet<Result<(), tokio_postgres::Error>>,
    queries: usize,
    shared: &SharedState,
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
        "{} {completed} of {queries} queued application queries completed",
        clock.stamp()
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

fn graph(shared: &SharedState) -> Option<Arc<LockGraph>> {
    shared.target("demo").and_then(|t| t.status().graph)
}

/// The target's trees, as `lockjam tree` prints them.
fn print_tree(shared: &SharedState) {
    if let Some(target) = shared.target("demo") {
        let style = crate::tree::Style {
            colour: std::io::IsTerminal::is_terminal(&std::io::stdout()),
        };
        print!(
            "{}",
            crate::tree::render_target("demo", &target.status(), &target.policy, style)
        );
    }
}

/// One line: each queue lockjam sees, its head and its roots.
fn print_view(stamp: &str, shared: &SharedState) {
    let Some(graph) = graph(shared) else {
        println!("{stamp} lockjam: no sample yet");
        return;
    };
    if graph.queues.is_empty() && graph.waiters.is_empty() {
        println!("{stamp} lockjam sees no lock waits");
        return;
    }
    let roots: Vec<String> = graph
        .blockers
        .iter()
        .filter(|b| b.is_root)
        .map(|b| b.pid.to_string())
        .collect();
    for queue in &graph.queues {
        println!(
            "{stamp} lockjam: {} sessions queue on {} behind pid {} (waiting {:.1}s for {}), root blocker pid {}",
            queue.depth,
            queue.relation,
            queue.head_pid,
            queue.head_wait.as_secs_f64(),
            queue.mode,
            roots.join(", ")
        );
    }
}

//! The service: one task per target (sample → analyse → metrics and shared
//! state, on an adaptive cadence, with backoff while the database is away)
//! and the HTTP server, stopped together.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use crate::analysis::{analyze, ended_waits, LockGraph};
use crate::audit;
use crate::config::{Config, IncidentsConfig, LogConfig, SamplerConfig};
use crate::connect::ConnectError;
use crate::enforcer::{Enforcer, Sent};
use crate::http::{ConnectionLimits, HttpError, TlsReloader};
use crate::incidents::store::{Retention, Store};
use crate::incidents::{Criteria, Ending, Tracker};
use crate::policy::{decide, next_deadline, Memory, Policy, Verdict, MAX_SNAPSHOT_AGE};
use crate::preflight::Preflight;
use crate::sampler::{SampleError, Sampler, ServerIdentity};
use crate::snapshot::Snapshot;
use crate::state::{LastSample, SharedState, TargetRecord};

/// Longest wait between two attempts on a target that is down.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("cannot listen on {addr}: {source}; choose another address with --listen or LOCKJAM_LISTEN")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Target(#[from] ConnectError),
    #[error(transparent)]
    Http(#[from] HttpError),
    /// Targets that reach one server: every such group, each a
    /// [`SampleError::SameServer`].
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    SameServer(Vec<SampleError>),
}

/// A running lockjam: target tasks and the HTTP server.
pub struct Service {
    addr: SocketAddr,
    /// What a reload cannot change: the configured address and logging.
    listen: SocketAddr,
    limits: ConnectionLimits,
    log: LogConfig,
    incidents: IncidentsConfig,
    shared: Arc<SharedState>,
    tls: Option<TlsReloader>,
    targets: TargetTasks,
    server_shutdown: watch::Sender<bool>,
    server: JoinHandle<()>,
}

/// One task per target, stopped together.
struct TargetTasks {
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

impl TargetTasks {
    async fn stop(&mut self) {
        let _ = self.shutdown.send(true);
        while self.tasks.join_next().await.is_some() {}
    }
}

/// A sampler and, with the policy on, an enforcer per target: everything
/// about targets that can fail, made before anything starts or changes.
struct Prepared {
    samplers: Vec<Sampler>,
    enforcers: Vec<Option<Enforcer>>,
}

impl Prepared {
    /// Refuses two targets that reach one server: each would report every
    /// database of it, and count the other's sessions. Targets are asked
    /// side by side, each within its connect and statement timeouts; one
    /// that cannot be reached now is checked when it first connects.
    async fn check_servers(&mut self, config: &Config) -> Result<(), ServiceError> {
        let limit = config.sampler.connect_timeout + config.sampler.statement_timeout;
        let mut asking = JoinSet::new();
        for (index, mut sampler) in self.samplers.drain(..).enumerate() {
            asking.spawn(async move {
                let identity = tokio::time::timeout(limit, sampler.identify()).await;
                (index, sampler, identity.ok().and_then(Result::ok))
            });
        }
        let mut answers = Vec::new();
        while let Some(answer) = asking.join_next().await {
            answers.push(answer.expect("identifying a server does not panic"));
        }
        answers.sort_by_key(|(index, _, _)| *index);
        let mut identities = Vec::new();
        for (_, sampler, identity) in answers {
            self.samplers.push(sampler);
            identities.push(identity);
        }
        // Each server, with every target that reached it, in the order of
        // the configuration.
        let mut servers: Vec<(ServerIdentity, Vec<String>)> = Vec::new();
        for (target, identity) in config.targets.iter().zip(identities) {
            let Some(identity) = identity else { continue };
            match servers.iter_mut().find(|(known, _)| known.same_server(&identity)) {
                Some((_, names)) => names.push(target.name.clone()),
                None => servers.push((identity, vec![target.name.clone()])),
            }
        }
        let shared: Vec<SampleError> = servers
            .into_iter()
            .filter(|(_, names)| names.len() > 1)
            .map(|(identity, targets)| SampleError::SameServer { targets, identity })
            .collect();
        if shared.is_empty() {
            Ok(())
        } else {
            Err(ServiceError::SameServer(shared))
        }
    }

    fn new(config: &Config) -> Result<Prepared, ServiceError> {
        let samplers = config
            .targets
            .iter()
            .map(|target| Sampler::new(target, &config.sampler))
            .collect::<Result<Vec<_>, _>>()?;
        let session_settings = config.sampler.sessions();
        let enforcers = config
            .targets
            .iter()
            .map(|target| {
                config
                    .policy
                    .enabled
                    .then(|| Enforcer::new(target, session_settings))
                    .transpose()
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Prepared { samplers, enforcers })
    }

    /// Declares the targets in the shared state and starts their tasks.
    fn start(self, config: &Config, shared: &Arc<SharedState>) -> TargetTasks {
        let policy = Arc::new(config.policy.clone());
        shared.replace_targets(
            config
                .targets
                .iter()
                .map(|t| {
                    // The sampler's connector was made from the same target
                    // and settings, so this one cannot fail where it did not.
                    let preflight = Preflight::new(t, config.sampler.sessions()).ok();
                    TargetRecord::new(&t.name, config.sampler.interval, policy.clone(), preflight)
                })
                .collect(),
        );
        if config.policy.enabled {
            for target in &config.targets {
                shared.metrics.register_policy(&target.name, &config.policy);
            }
        }
        let (shutdown, _) = watch::channel(false);
        let mut tasks = JoinSet::new();
        for ((target, sampler), enforcer) in config.targets.iter().zip(self.samplers).zip(self.enforcers) {
            let watch = Watch::new(
                &target.name,
                config.sampler.clone(),
                sampler,
                enforcer.map(|enforcer| (enforcer, config.policy.clone())),
                criteria(&config.incidents),
                shared.clone(),
            );
            tasks.spawn(watch.run(shutdown.subscribe()));
        }
        TargetTasks { shutdown, tasks }
    }
}

impl ServiceError {
    /// Whether the configuration is at fault (a file that is no PEM, a DSN
    /// that cannot be used), so that no restart can help: exit status 2.
    pub fn is_configuration(&self) -> bool {
        match self {
            ServiceError::Bind { .. } => false,
            ServiceError::Target(ConnectError::Dsn { .. } | ConnectError::Tls { .. }) => true,
            ServiceError::Target(_) => false,
            ServiceError::Http(_) => true,
            ServiceError::SameServer(_) => true,
        }
    }
}

/// Everything [`Service::start`] checks before it connects or listens:
/// certificates and keys parse, each target's TLS settings and DSN can be
/// used. `check-config` runs it, so that whatever it accepts, `run` does.
pub fn preflight(config: &Config) -> Result<(), ServiceError> {
    Prepared::new(config)?;
    config.server.tls().as_ref().map(TlsReloader::load).transpose()?;
    Ok(())
}

impl Service {
    /// Binds the listener and starts sampling every target. A target that
    /// cannot be reached is no error: it is retried with backoff.
    pub async fn start(config: &Config) -> Result<Service, ServiceError> {
        let mut prepared = Prepared::new(config)?;
        prepared.check_servers(config).await?;
        let tls = config.server.tls().as_ref().map(TlsReloader::load).transpose()?;
        let listener = tokio::net::TcpListener::bind(config.server.listen)
            .await
            .map_err(|source| ServiceError::Bind {
                addr: config.server.listen,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| ServiceError::Bind {
            addr: config.server.listen,
            source,
        })?;
        let store = Store::open(config.incidents.path.as_deref(), retention(&config.incidents));
        let shared = Arc::new(SharedState::new(Vec::new(), config.server.auth.clone(), store));
        let targets = prepared.start(config, &shared);
        let (server_shutdown, mut stop) = watch::channel(false);
        let server = tokio::spawn(crate::http::serve(
            listener,
            shared.clone(),
            tls.clone(),
            config.server.limits(),
            async move {
                let _ = stop.wait_for(|stopped| *stopped).await;
            },
        ));
        tracing::info!(
            listen = %addr,
            https = tls.is_some(),
            credentials = config.server.auth.is_required(),
            targets = config.targets.len(),
            "lockjam is serving {}",
            crate::http::ROUTES.join(", ")
        );
        for note in &config.notes {
            tracing::info!("{note}");
        }
        Ok(Service {
            addr,
            listen: config.server.listen,
            limits: config.server.limits(),
            log: config.log.clone(),
            incidents: config.incidents.clone(),
            shared,
            tls,
            targets,
            server_shutdown,
            server,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn shared(&self) -> &Arc<SharedState> {
        &self.shared
    }

    /// Applies a new configuration without dropping the listener: targets,
    /// sampler settings, the policy, credentials and the HTTPS certificate.
    /// Everything that can fail is tried first: on an error nothing has
    /// changed. What needs a restart (the listen address, turning HTTPS on
    /// or off, logging) is named in a warning and left as it was.
    pub async fn reload(&mut self, config: &Config) -> Result<(), ServiceError> {
        let mut prepared = Prepared::new(config)?;
        prepared.check_servers(config).await?;
        match (&self.tls, &config.server.tls()) {
            (Some(reloader), Some(files)) => reloader.reload(files)?,
            (None, None) => {}
            _ => tracing::warn!("turning HTTPS on or off takes a restart; serving as before"),
        }
        if config.server.listen != self.listen {
            tracing::warn!(
                listen = %self.listen,
                "server.listen changed to {}: that takes a restart; still listening on the old address",
                config.server.listen
            );
        }
        if config.server.limits() != self.limits {
            tracing::warn!("server.header_timeout and server.max_connections take a restart; serving as before");
        }
        if config.incidents.path != self.incidents.path || retention(&config.incidents) != retention(&self.incidents) {
            tracing::warn!("incidents.path, keep_days and keep_count take a restart; the store stays as it was");
        }
        if config.log != self.log {
            tracing::warn!("log settings changed: they take effect at the next restart");
        }
        self.targets.stop().await;
        self.shared.set_auth(config.server.auth.clone());
        self.targets = prepared.start(config, &self.shared);
        tracing::info!(
            targets = config.targets.len(),
            policy = config.policy.enabled,
            "configuration reloaded"
        );
        Ok(())
    }

    /// Runs until SIGTERM or Ctrl-C, reloading on each SIGHUP the
    /// configuration `load` returns; a configuration that fails to load or
    /// to apply is logged and the one in force stays.
    pub async fn run<E: std::fmt::Display>(mut self, mut load: impl FnMut() -> Result<Config, E>) {
        let mut hangups = hangup_signals();
        let shutdown = shutdown_signal();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                Some(()) = hangups.recv() => {
                    tracing::info!("SIGHUP: reloading the configuration");
                    let outcome = match load() {
                        Ok(config) => self.reload(&config).await.map_err(|e| crate::connect::error_chain(&e)),
                        Err(e) => Err(e.to_string()),
                    };
                    if let Err(e) = outcome {
                        tracing::error!("configuration reload rejected, the previous one stays in force: {e}");
                    }
                }
            }
        }
        tracing::info!("shutting down");
        self.stop().await;
    }

    /// Stops sampling, finishes in-flight requests and closes every session.
    pub async fn stop(mut self) {
        self.targets.stop().await;
        let _ = self.server_shutdown.send(true);
        let _ = self.server.await;
    }
}

/// SIGHUPs, as a channel (none where there are no such signals).
fn hangup_signals() -> tokio::sync::mpsc::Receiver<()> {
    let (sender, receiver) = tokio::sync::mpsc::channel(1);
    #[cfg(unix)]
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(mut hangup) => {
            tokio::spawn(async move {
                while hangup.recv().await.is_some() {
                    if sender.send(()).await.is_err() {
                        break;
                    }
                }
            });
        }
        Err(e) => tracing::warn!("cannot listen for SIGHUP ({e}): reload by restarting"),
    }
    #[cfg(not(unix))]
    drop(sender);
    receiver
}

fn retention(config: &IncidentsConfig) -> Retention {
    Retention {
        keep_days: config.keep_days,
        keep_count: config.keep_count,
    }
}

fn criteria(config: &IncidentsConfig) -> Criteria {
    Criteria {
        min_wait: config.min_wait,
        modes: config.modes.clone(),
    }
}

/// One sample of a target outside the service (`lockjam tree`): what
/// HTTP would show of it.
pub async fn sample_once(sampler: &mut Sampler) -> Result<LastSample, SampleError> {
    let deadline = sampler.deadline();
    let snapshot = match tokio::time::timeout(deadline, sampler.sample()).await {
        Ok(sampled) => sampled?,
        Err(_) => {
            sampler.reset();
            return Err(SampleError::Timeout {
                target: sampler.target_name().to_string(),
                limit: deadline,
            });
        }
    };
    let mut graph = analyze(&snapshot);
    graph.own_pids = sampler.own_pids();
    Ok(LastSample {
        last_good: Some(std::time::Instant::now()),
        graph: Some(Arc::new(graph)),
        last_error: None,
        server_version: sampler.server_version(),
        warnings: sampler.warnings().to_vec(),
        leader: None,
    })
}

/// The next delay after `failures` consecutive failed samples: the calm
/// interval, doubling, at most [`MAX_BACKOFF`].
pub fn backoff(failures: u32, interval: Duration) -> Duration {
    let factor = 1u32 << failures.saturating_sub(1).min(16);
    (interval * factor).min(MAX_BACKOFF.max(interval))
}

/// One target's task: samples at its cadence, publishes each graph, runs
/// the policy on it, and backs off while the target is down.
struct Watch {
    name: String,
    settings: SamplerConfig,
    sampler: Sampler,
    policy: Option<(Enforcer, Policy)>,
    memory: Memory,
    tracker: Tracker,
    /// Closed incidents on their way to the store.
    closing: JoinSet<()>,
    shared: Arc<SharedState>,
    record: Arc<TargetRecord>,
    previous: Option<Arc<LockGraph>>,
    failures: u32,
    announced: bool,
    in_recovery: bool,
}

impl Watch {
    fn new(
        name: &str,
        settings: SamplerConfig,
        mut sampler: Sampler,
        policy: Option<(Enforcer, Policy)>,
        criteria: Criteria,
        shared: Arc<SharedState>,
    ) -> Watch {
        let watching_only = !policy.as_ref().is_some_and(|(_, p)| p.enabled);
        sampler.reuse_waiting_reads(watching_only && settings.fast_interval.is_none());
        let record = shared
            .target(name)
            .expect("a target's state is declared before its task starts");
        let tracker = match shared.take_tracker(name) {
            Some(mut tracker) => {
                tracker.set_criteria(criteria);
                tracker
            }
            None => Tracker::new(name, criteria),
        };
        Watch {
            name: name.to_string(),
            settings,
            sampler,
            policy,
            memory: Memory::default(),
            tracker,
            closing: JoinSet::new(),
            shared,
            record,
            previous: None,
            failures: 0,
            announced: false,
            in_recovery: false,
        }
    }

    /// Samples until `shutdown`: a tick starts one cadence after the
    /// previous one started; a retry one backoff step after the failure,
    /// however long the failed sample took.
    async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        loop {
            let started = Instant::now();
            let outcome = tokio::select! {
                outcome = tokio::time::timeout(self.sampler.deadline(), self.sampler.sample()) => outcome,
                _ = shutdown.wait_for(|stopped| *stopped) => break,
            };
            let took = started.elapsed();
            let result = outcome.unwrap_or_else(|_| {
                self.sampler.reset();
                Err(SampleError::Timeout {
                    target: self.name.clone(),
                    limit: self.sampler.deadline(),
                })
            });
            let result = result.and_then(|snapshot| self.one_target_per_server().map(|()| snapshot));
            let wake = match result {
                Ok(snapshot) => self.sampled(&snapshot, started, took).await,
                Err(error) => self.failed(&error, took),
            };
            tokio::select! {
                _ = tokio::time::sleep_until(wake) => {}
                _ = shutdown.wait_for(|stopped| *stopped) => break,
            }
            while self.closing.try_join_next().is_some() {}
        }
        while self.closing.join_next().await.is_some() {}
        self.shared.keep_tracker(&self.name, self.tracker);
    }

    /// A target that came up after start on a server another target
    /// already watches fails every sample, saying so: it was not refused at
    /// start only because it could not be reached then.
    fn one_target_per_server(&mut self) -> Result<(), SampleError> {
        let Some(identity) = self.sampler.server_identity().cloned() else {
            return Ok(());
        };
        match self.shared.claim_server(&self.name, &identity) {
            None => Ok(()),
            Some(other) => {
                self.sampler.reset();
                Err(SampleError::SameServer {
                    targets: vec![other, self.name.clone()],
                    identity,
                })
            }
        }
    }

    /// Publishes a good sample and runs the policy on it; returns when to
    /// sample next.
    async fn sampled(&mut self, snapshot: &Snapshot, started: Instant, took: Duration) -> Instant {
        let name = self.name.as_str();
        let mut graph = analyze(snapshot);
        graph.own_pids = self.sampler.own_pids();
        graph
            .own_pids
            .extend(self.policy.as_ref().and_then(|(enforcer, _)| enforcer.pid()));
        let graph = Arc::new(graph);
        let ended = self
            .previous
            .as_deref()
            .map(|p| ended_waits(p, &graph))
            .unwrap_or_default();
        self.shared.metrics.record_sample(
            name,
            &graph,
            &ended,
            took,
            crate::metrics::Caps {
                relations: self.settings.max_relations,
                databases: self.settings.max_databases,
            },
        );
        self.record.record_success(
            graph.clone(),
            self.sampler.server_version(),
            self.sampler.warnings(),
            started.into_std(),
        );
        let (leader, events) = match self.policy.as_mut() {
            Some((enforcer, policy)) => {
                let (leads, events) =
                    enforce(name, policy, enforcer, &mut self.memory, &graph, started, &self.shared).await;
                (Some(leads), events)
            }
            None => (None, Vec::new()),
        };
        self.record.record_leader(leader);
        let (opened, ended) = self.tracker.observe(&graph, &events);
        for datname in opened {
            self.shared.metrics.register_incidents(name, &datname);
        }
        for ending in ended {
            self.close(ending).await;
        }
        let name = self.name.as_str();
        if !self.announced {
            announce_policy(
                name,
                self.policy.as_ref().map_or(&Policy::default(), |(_, p)| p),
                leader,
            );
            self.announced = true;
        }
        if graph.in_recovery != self.in_recovery {
            self.in_recovery = graph.in_recovery;
            if let Some((_, policy)) = self.policy.as_ref().filter(|(_, p)| p.enabled) {
                announce_standby(name, policy, self.in_recovery);
            }
        }
        if self.failures > 0 || self.previous.is_none() {
            tracing::info!(
                target = name,
                server_version = self.sampler.server_version(),
                failed_attempts = self.failures,
                "sampling"
            );
        }
        self.failures = 0;
        let cadence = match self.settings.fast_interval {
            Some(fast) if !graph.waiters.is_empty() => fast,
            _ => self.settings.interval,
        };
        let deadline = match (&self.policy, leader) {
            (Some((_, policy)), Some(true)) => next_deadline(&graph, policy, &self.memory),
            _ => None,
        };
        let wake = match deadline {
            Some(at) => (started + cadence).min(on_local_clock(at, &graph, started)),
            None => started + cadence,
        };
        self.previous = Some(graph);
        wake
    }

    /// Reports a failed sample; returns when to try again.
    fn failed(&mut self, error: &SampleError, took: Duration) -> Instant {
        self.failures += 1;
        let delay = backoff(self.failures, self.settings.interval);
        tracing::warn!(
            target = self.name.as_str(),
            attempt = self.failures,
            retry_in = %humantime::format_duration(delay),
            "sample failed: {error}"
        );
        self.shared.metrics.record_failure(&self.name, took);
        self.record.record_failure(error.to_string());
        if let Some(last_seen) = self.previous.as_ref().map(|graph| graph.taken_at) {
            for ending in self.tracker.target_down(last_seen) {
                self.store(ending, None);
            }
        }
        Instant::now() + delay
    }

    /// An incident's waits ended: one look at its sessions tells how (a
    /// failed look leaves the outcome to what lockjam itself did), then it
    /// is stored, counted and logged off the sampling path.
    async fn close(&mut self, ending: Ending) {
        let now = if ending.needs_a_look() {
            let pids = ending.pids();
            let look = self.sampler.look_at_ended(&pids, ending.waited_for());
            match tokio::time::timeout(self.sampler.deadline(), look).await {
                Ok(Ok(rows)) => Some(rows),
                Ok(Err(e)) => {
                    tracing::warn!(target = self.name.as_str(), "cannot tell how an incident ended: {e}");
                    None
                }
                Err(_) => {
                    // As after a sample that overran: fresh sessions next.
                    self.sampler.reset();
                    tracing::warn!(
                        target = self.name.as_str(),
                        "cannot tell how an incident ended: the look took longer than {:?}",
                        self.sampler.deadline()
                    );
                    None
                }
            }
        } else {
            None
        };
        self.store(ending, now);
    }

    fn store(&mut self, ending: Ending, now: Option<Vec<crate::incidents::SessionNow>>) {
        let closed_at = ending.closed_at();
        let incident = ending.finish(now.as_deref());
        let shared = self.shared.clone();
        self.closing.spawn_blocking(move || {
            let incident = shared.incidents.record(incident, closed_at);
            shared.metrics.record_incident(
                &incident.target,
                &incident.datname,
                incident.outcome.as_str(),
                incident.duration(),
            );
            crate::incidents::log_closed(&incident);
        });
    }
}

/// How long after a policy deadline the sample for it starts, so that it
/// sees the deadline passed on the server's clock.
const DEADLINE_MARGIN: Duration = Duration::from_millis(2);

/// The moment on this machine's clock of `at` on the server's. `graph`
/// was taken at `graph.taken_at` by the server's clock and its sample
/// began at `started` by ours; the statement of the sample due at `at`
/// starts as long after its own beginning, so the offset between the
/// clocks and the round trip cancel out.
fn on_local_clock(at: std::time::SystemTime, graph: &LockGraph, started: Instant) -> Instant {
    started + at.duration_since(graph.taken_at).unwrap_or_default() + DEADLINE_MARGIN
}

/// Runs the policy on a fresh graph: only the leader decides and signals,
/// and every decision becomes a counter increment and an audit event.
/// Returns whether this instance leads, and the events of its decisions.
async fn enforce(
    name: &str,
    policy: &Policy,
    enforcer: &mut Enforcer,
    memory: &mut Memory,
    graph: &LockGraph,
    sampled: Instant,
    shared: &SharedState,
) -> (bool, Vec<audit::AuditEvent>) {
    let leader = enforcer.lead().await;
    shared.metrics.set_policy_leader(name, leader);
    if !leader {
        return (false, Vec::new());
    }
    let mut events = Vec::new();
    // Times in events and the memory are on the server's clock.
    let server_now = || graph.taken_at + sampled.elapsed();
    let plan = decide(graph, policy, memory, server_now());
    for deadlock in &plan.deadlocks {
        let waiter = &deadlock.waiter;
        tracing::warn!(
            target = name,
            rule = %deadlock.rule,
            waiter_pid = waiter.session.pid,
            "waiter pid {} ({} on {}, waiting {:.1}s) is in a deadlock cycle with no root blocker to signal; \
             PostgreSQL's deadlock detector ends it after deadlock_timeout",
            waiter.session.pid,
            waiter.lock.mode,
            audit::one_line(&waiter.lock.relation_label()),
            waiter.wait.as_secs_f64()
        );
        memory.record_deadlock(deadlock);
    }
    for decision in plan.decisions {
        // A decision is carried out while its sample is fresh, or not at
        // all: the next sample decides again on what is true then.
        if decision.verdict == Verdict::Send && sampled.elapsed() > MAX_SNAPSHOT_AGE {
            tracing::warn!(
                target = name,
                "policy decisions dropped: their sample is {:.1}s old; the next sample decides again",
                sampled.elapsed().as_secs_f64()
            );
            break;
        }
        let sent = match decision.verdict {
            Verdict::Withhold(outcome) => Sent {
                outcome,
                detail: None,
                at: None,
            },
            Verdict::Send => enforcer.signal(&decision).await,
        };
        let now = sent.at.unwrap_or_else(server_now);
        memory.record(&decision, sent.outcome, now);
        shared
            .metrics
            .record_policy_signal(name, &decision.rule, decision.signal.as_str(), sent.outcome.as_str());
        let event = audit::event(name, &decision, sent.outcome, sent.detail, now);
        audit::log(&event);
        shared.events.push(event.clone());
        events.push(event);
    }
    (true, events)
}

/// The start-up INFO lines of a target's policy: its mode, whether this
/// instance leads, and each rule in one line.
fn announce_policy(name: &str, policy: &Policy, leader: Option<bool>) {
    let leads = match leader {
        None => "",
        Some(true) if policy.dry_run => ", this instance leads (holds the advisory lock) and logs what it would do",
        Some(true) => ", this instance leads (holds the advisory lock) and acts",
        Some(false) => ", another instance leads: this one watches and takes over if it goes",
    };
    tracing::info!(
        target = name,
        "policy {}{leads}; {} rule(s); protected from every rule: {}",
        policy.mode(),
        policy.rules.len(),
        policy.protections().describe()
    );
    if policy.enabled {
        for (index, rule) in policy.rules.iter().enumerate() {
            tracing::info!(target = name, "policy {}. {}", index + 1, rule.describe());
        }
    }
}

/// Says what the policy does on a hot standby, when a target turns out to
/// be one (or is promoted).
fn announce_standby(name: &str, policy: &Policy, in_recovery: bool) {
    let on_standby: Vec<&str> = policy
        .rules
        .iter()
        .filter(|rule| rule.on_standby)
        .map(|rule| rule.name.as_str())
        .collect();
    match (in_recovery, on_standby.is_empty()) {
        (true, true) => tracing::info!(
            target = name,
            "the server is a hot standby: the policy does not act here, as no rule sets on_standby; PostgreSQL \
             cancels the standby queries that hold up replay after max_standby_streaming_delay"
        ),
        (true, false) => tracing::info!(
            target = name,
            "the server is a hot standby: only rule(s) `{}` act here (on_standby = true)",
            on_standby.join("`, `")
        ),
        (false, _) => tracing::info!(target = name, "the server is out of recovery: every rule acts"),
    }
}

/// Completes on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = terminate => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_the_interval_to_thirty_seconds() {
        let steps: Vec<u64> = (1..=7).map(|n| backoff(n, Duration::from_secs(1)).as_secs()).collect();
        assert_eq!(steps, vec![1, 2, 4, 8, 16, 30, 30]);
        assert_eq!(backoff(100, Duration::from_secs(1)), Duration::from_secs(30));
    }
}

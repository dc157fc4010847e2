//! The service: one task per target (sample → analyse → metrics and shared
//! state, on an adaptive cadence, with backoff while the database is away)
//! and the HTTP server, stopped together.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::analysis::{analyze, ended_waits, LockGraph};
use crate::audit;
use crate::config::{Config, SamplerConfig, Target};
use crate::connect::{ConnectError, SessionSettings};
use crate::enforcer::Enforcer;
use crate::policy::{decide, Memory, Policy};
use crate::sampler::{SampleError, Sampler};
use crate::state::{SharedState, TargetState};

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
}

/// A running lockjam: target tasks and the HTTP server.
pub struct Service {
    addr: SocketAddr,
    shared: Arc<SharedState>,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

impl Service {
    /// Binds the listener and starts sampling every target. A target that
    /// cannot be reached is no error: it is retried with backoff.
    pub async fn start(config: &Config) -> Result<Service, ServiceError> {
        let samplers = config
            .targets
            .iter()
            .map(|target| Sampler::new(target, &config.sampler))
            .collect::<Result<Vec<_>, _>>()?;
        let session_settings = SessionSettings::of(&config.sampler);
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
        let shared = Arc::new(SharedState::new(
            config
                .targets
                .iter()
                .map(|t| TargetState::new(&t.name, config.sampler.interval))
                .collect(),
        ));
        if config.policy.enabled {
            for target in &config.targets {
                shared.metrics.register_policy(&target.name, &config.policy);
            }
        }
        let (shutdown, _) = watch::channel(false);
        let mut tasks = JoinSet::new();
        for ((target, sampler), enforcer) in config.targets.iter().zip(samplers).zip(enforcers) {
            tasks.spawn(watch_target(
                target.clone(),
                config.sampler.clone(),
                sampler,
                enforcer.map(|enforcer| (enforcer, config.policy.clone())),
                shared.clone(),
                shutdown.subscribe(),
            ));
        }
        let app = crate::http::router(shared.clone());
        let mut stop = shutdown.subscribe();
        tasks.spawn(async move {
            let serving = axum::serve(listener, app).with_graceful_shutdown(async move {
                let _ = stop.wait_for(|stopped| *stopped).await;
            });
            if let Err(e) = serving.await {
                tracing::error!("HTTP server failed: {e}");
            }
        });
        tracing::info!(
            listen = %addr,
            targets = config.targets.len(),
            "lockjam is serving /metrics, /healthz, /readyz and /api/v1/snapshot"
        );
        Ok(Service {
            addr,
            shared,
            shutdown,
            tasks,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn shared(&self) -> &Arc<SharedState> {
        &self.shared
    }

    /// Runs until `signal` completes, then stops gracefully.
    pub async fn run_until(self, signal: impl Future<Output = ()>) {
        signal.await;
        tracing::info!("shutting down");
        self.stop().await;
    }

    /// Stops sampling, finishes in-flight requests and closes every session.
    pub async fn stop(mut self) {
        let _ = self.shutdown.send(true);
        while self.tasks.join_next().await.is_some() {}
    }
}

/// The next delay after `failures` consecutive failed samples: the calm
/// interval, doubling, at most [`MAX_BACKOFF`].
pub fn backoff(failures: u32, interval: Duration) -> Duration {
    let factor = 1u32 << failures.saturating_sub(1).min(16);
    (interval * factor).min(MAX_BACKOFF.max(interval))
}

async fn watch_target(
    target: Target,
    settings: SamplerConfig,
    mut sampler: Sampler,
    mut policy: Option<(Enforcer, Policy)>,
    shared: Arc<SharedState>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut memory = Memory::default();
    let name = target.name.as_str();
    let state = shared.target(name).expect("every target has a state");
    let mut previous: Option<Arc<LockGraph>> = None;
    let mut failures = 0u32;
    loop {
        let started = Instant::now();
        let outcome = tokio::select! {
            outcome = tokio::time::timeout(sampler.deadline(), sampler.sample()) => outcome,
            _ = shutdown.wait_for(|stopped| *stopped) => break,
        };
        let took = started.elapsed();
        let result = outcome.unwrap_or_else(|_| {
            sampler.reset();
            Err(SampleError::Timeout {
                target: name.to_string(),
                limit: sampler.deadline(),
            })
        });
        // A tick starts one cadence after the previous one started; a retry
        // starts one backoff step after the failure, however long the failed
        // sample took.
        let wake = match result {
            Ok(snapshot) => {
                let graph = Arc::new(analyze(&snapshot));
                let ended = previous.as_deref().map(|p| ended_waits(p, &graph)).unwrap_or_default();
                shared
                    .metrics
                    .record_sample(name, &graph, &ended, took, settings.max_relations);
                state.record_success(
                    graph.clone(),
                    sampler.server_version(),
                    sampler.warnings(),
                    started.into_std(),
                );
                if let Some((enforcer, policy)) = policy.as_mut() {
                    enforce(name, policy, enforcer, &mut memory, &graph, started, &shared).await;
                }
                if failures > 0 || previous.is_none() {
                    tracing::info!(
                        target = name,
                        server_version = sampler.server_version(),
                        failed_attempts = failures,
                        "sampling"
                    );
                }
                failures = 0;
                let waiting = !graph.waiters.is_empty();
                previous = Some(graph);
                started
                    + if waiting {
                        settings.fast_interval
                    } else {
                        settings.interval
                    }
            }
            Err(error) => {
                failures += 1;
                let delay = backoff(failures, settings.interval);
                tracing::warn!(
                    target = name,
                    attempt = failures,
                    retry_in = %humantime::format_duration(delay),
                    "sample failed: {error}"
                );
                shared.metrics.record_failure(name, took);
                state.record_failure(error.to_string());
                Instant::now() + delay
            }
        };
        tokio::select! {
            _ = tokio::time::sleep_until(wake) => {}
            _ = shutdown.wait_for(|stopped| *stopped) => break,
        }
    }
}

/// Runs the policy on a fresh graph: only the leader decides and signals,
/// and every decision becomes a counter increment and an audit event.
async fn enforce(
    name: &str,
    policy: &Policy,
    enforcer: &mut Enforcer,
    memory: &mut Memory,
    graph: &LockGraph,
    sampled: Instant,
    shared: &SharedState,
) {
    let leader = enforcer.lead().await;
    shared.metrics.set_policy_leader(name, leader);
    if !leader {
        return;
    }
    for decision in decide(graph, policy, memory, graph.taken_at + sampled.elapsed()) {
        let (outcome, detail) = match decision.verdict {
            Some(verdict) => (verdict, None),
            None => enforcer.signal(&decision).await,
        };
        // Ages in the event and the memory are on the server's clock.
        let now = graph.taken_at + sampled.elapsed();
        memory.record(&decision, outcome, now);
        shared
            .metrics
            .record_policy_action(name, &decision.rule, decision.signal.as_str(), outcome.as_str());
        let event = audit::event(name, &decision, outcome, detail, now);
        audit::log(&event);
        shared.events.push(event);
    }
}

/// Completes on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
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

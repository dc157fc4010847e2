//! The metrics contract (README.md, "Metrics"): the only module that knows prometheus
//! types. Each sample replaces a target's series as a whole, under one
//! lock, so a scrape sees one sample or the next, never half of each, and
//! no series outlives the sample that last set it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use prometheus::{Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry, TextEncoder};

use crate::analysis::{EndedWait, LockGraph, Queue};
use crate::policy::{Outcome, Policy, Signal};

/// Label value that collects the relation series past `max_relations`.
pub(crate) const OTHER_RELATIONS: &str = "_other";
/// Label value that collects the databases past `max_databases`.
pub(crate) const OTHER_DATABASES: &str = "_other";

/// The `datname` label of each database of a sample: its name for the
/// `max_databases` that matter most (those with lock waits, or a wait that
/// just ended; then those named in the previous sample, so that a name
/// does not come and go with a session; then those with the most
/// sessions; then by name), [`OTHER_DATABASES`] for the rest.
pub(crate) struct DatabaseLabels {
    named: HashSet<String>,
}

impl DatabaseLabels {
    pub(crate) fn of(
        graph: &LockGraph,
        ended: &[EndedWait],
        max_databases: usize,
        before: Option<&HashSet<String>>,
    ) -> DatabaseLabels {
        let mut sessions: HashMap<&str, u64> = HashMap::new();
        for group in &graph.activity {
            *sessions.entry(group.datname.as_str()).or_default() += group.sessions;
        }
        for datname in graph.databases.keys() {
            sessions.entry(datname.as_str()).or_default();
        }
        for wait in ended {
            sessions.entry(wait.datname.as_str()).or_default();
        }
        let mut ranked: Vec<(&str, u64)> = sessions.into_iter().collect();
        ranked.sort_by(|a, b| {
            let waits = |d: &str| graph.databases.get(d).is_some_and(waits_in) || ended.iter().any(|w| w.datname == d);
            let named = |d: &str| before.is_some_and(|named| named.contains(d));
            waits(b.0)
                .cmp(&waits(a.0))
                .then(named(b.0).cmp(&named(a.0)))
                .then(b.1.cmp(&a.1))
                .then(a.0.cmp(b.0))
        });
        DatabaseLabels {
            named: ranked
                .into_iter()
                .take(max_databases)
                .map(|(d, _)| d.to_string())
                .collect(),
        }
    }

    pub(crate) fn label<'a>(&self, datname: &'a str) -> &'a str {
        if self.named.contains(datname) {
            datname
        } else {
            OTHER_DATABASES
        }
    }
}

/// Whether anyone in the database waits for a lock, or blocks someone:
/// only then does it have the lock gauges (a calm database costs its
/// session series alone).
fn waits_in(figures: &crate::analysis::DatabaseLocks) -> bool {
    figures.blocked_sessions > 0 || figures.root_blockers > 0 || !figures.waiters.is_empty()
}

/// Buckets of `lockjam_sample_duration_seconds`: samples take milliseconds.
const SAMPLE_BUCKETS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];
/// Buckets of `lockjam_lock_wait_seconds`: waits are seen at the sampling
/// cadence (1 s by default; a `fast_interval` as short as 250 ms is still
/// resolved) and matter from seconds to many minutes.
/// Incident lengths: a second (`min_wait`) to hours.
const INCIDENT_BUCKETS: &[f64] = &[1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0];
const WAIT_BUCKETS: &[f64] = &[0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0, 1800.0];

/// One labelled gauge family and, per target, the label sets it holds.
struct Family {
    gauge: GaugeVec,
    held: HashMap<String, HashSet<Vec<String>>>,
}

impl Family {
    fn new(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> Family {
        let gauge = GaugeVec::new(Opts::new(name, help), labels).expect("metric definitions are valid");
        registry
            .register(Box::new(gauge.clone()))
            .expect("metric names are unique");
        Family {
            gauge,
            held: HashMap::new(),
        }
    }

    /// Sets the target's series to exactly `values` (target label first,
    /// then the rest) and removes the ones this sample did not set.
    fn replace(&mut self, target: &str, values: impl IntoIterator<Item = (Vec<String>, f64)>) {
        let mut now = HashSet::new();
        for (mut labels, value) in values {
            labels.insert(0, target.to_string());
            let refs: Vec<&str> = labels.iter().map(String::as_str).collect();
            self.gauge.with_label_values(&refs).set(value);
            now.insert(labels);
        }
        let before = self.held.insert(target.to_string(), now.clone()).unwrap_or_default();
        for stale in before.difference(&now) {
            let refs: Vec<&str> = stale.iter().map(String::as_str).collect();
            let _ = self.gauge.remove_label_values(&refs);
        }
    }
}

struct Families {
    up: GaugeVec,
    last_sample: GaugeVec,
    sample_duration: HistogramVec,
    lock_wait: HistogramVec,
    sessions: Family,
    transaction_max_age: Family,
    lock_waiters: Family,
    lock_wait_max: Family,
    blocked_sessions: Family,
    root_blockers: Family,
    root_blocker_max_age: Family,
    chain_max_depth: Family,
    queue_depth: Family,
    queue_head_wait: Family,
    relation_waiters: Family,
    policy_signals: IntCounterVec,
    policy_leader: GaugeVec,
    incidents: IntCounterVec,
    incident_duration: HistogramVec,
    /// Per target, the databases of its incident series.
    incident_databases: HashMap<String, HashSet<String>>,
    /// Per target, the databases of its wait histograms and the rules of
    /// its policy counters: what [`Metrics::forget_target`] removes.
    wait_databases: HashMap<String, HashSet<String>>,
    /// Per target, the databases the last sample named in `datname`.
    named_databases: HashMap<String, HashSet<String>>,
    policy_rules: HashMap<String, HashSet<String>>,
}

impl Families {
    /// The gauge families a sample replaces as a whole: every series that
    /// describes a target's databases.
    fn database_families(&mut self) -> [&mut Family; 11] {
        [
            &mut self.sessions,
            &mut self.transaction_max_age,
            &mut self.lock_waiters,
            &mut self.lock_wait_max,
            &mut self.blocked_sessions,
            &mut self.root_blockers,
            &mut self.root_blocker_max_age,
            &mut self.chain_max_depth,
            &mut self.queue_depth,
            &mut self.queue_head_wait,
            &mut self.relation_waiters,
        ]
    }
}

pub struct Metrics {
    registry: Registry,
    families: Mutex<Families>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// A queue series after the `max_relations` cap.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct QueueSeries {
    pub datname: String,
    pub relation: String,
    pub mode: String,
    pub depth: u64,
    pub head_wait: Duration,
}

/// Merges queues that share labels (their depths add up, the head wait is
/// the longest), keeps the `max_relations` deepest series and sums the rest
/// into `relation="_other"` per database and mode.
pub(crate) fn cap_queue_series(queues: &[Queue], max_relations: usize) -> Vec<QueueSeries> {
    let mut merged: BTreeMap<(String, String, String), (u64, Duration)> = BTreeMap::new();
    for queue in queues {
        let entry = merged
            .entry((queue.datname.clone(), queue.relation.clone(), queue.mode.clone()))
            .or_default();
        entry.0 += queue.depth;
        entry.1 = entry.1.max(queue.head_wait);
    }
    let mut series: Vec<QueueSeries> = merged
        .into_iter()
        .map(|((datname, relation, mode), (depth, head_wait))| QueueSeries {
            datname,
            relation,
            mode,
            depth,
            head_wait,
        })
        .collect();
    // Deepest first; ties by name, so the choice is stable between samples.
    series.sort_by(|a, b| {
        b.depth
            .cmp(&a.depth)
            .then_with(|| (&a.datname, &a.relation, &a.mode).cmp(&(&b.datname, &b.relation, &b.mode)))
    });
    if series.len() <= max_relations {
        return series;
    }
    let rest = series.split_off(max_relations);
    let mut other: BTreeMap<(String, String), (u64, Duration)> = BTreeMap::new();
    for s in rest {
        let entry = other.entry((s.datname, s.mode)).or_default();
        entry.0 += s.depth;
        entry.1 = entry.1.max(s.head_wait);
    }
    series.extend(
        other
            .into_iter()
            .map(|((datname, mode), (depth, head_wait))| QueueSeries {
                datname,
                relation: OTHER_RELATIONS.into(),
                mode,
                depth,
                head_wait,
            }),
    );
    series
}

/// Sessions waiting on one relation, after the `max_relations` cap.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RelationWaiters {
    pub datname: String,
    pub relation: String,
    pub waiters: u64,
}

/// Keeps the `max_relations` relations with the most waiters (ties by
/// name, so the choice is stable between samples) and sums the rest into
/// `relation="_other"` per database.
pub(crate) fn cap_relation_waiters(graph: &LockGraph, max_relations: usize) -> Vec<RelationWaiters> {
    let mut series: Vec<RelationWaiters> = graph
        .databases
        .iter()
        .flat_map(|(datname, figures)| {
            figures
                .relation_waiters
                .iter()
                .map(|(relation, waiters)| RelationWaiters {
                    datname: datname.clone(),
                    relation: relation.clone(),
                    waiters: *waiters,
                })
        })
        .collect();
    series.sort_by(|a, b| {
        b.waiters
            .cmp(&a.waiters)
            .then_with(|| (&a.datname, &a.relation).cmp(&(&b.datname, &b.relation)))
    });
    if series.len() <= max_relations {
        return series;
    }
    let mut other: BTreeMap<String, u64> = BTreeMap::new();
    for s in series.split_off(max_relations) {
        *other.entry(s.datname).or_default() += s.waiters;
    }
    series.extend(other.into_iter().map(|(datname, waiters)| RelationWaiters {
        datname,
        relation: OTHER_RELATIONS.into(),
        waiters,
    }));
    series
}

fn seconds(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

/// Registers the gauge families a sample replaces as a whole, in the order
/// of [`Families::database_families`].
fn register_database_families(registry: &Registry) -> [Family; 11] {
    let family = |name: &str, help: &str, labels: &[&str]| Family::new(registry, name, help, labels);
    let by_db = ["target", "datname"];
    let by_queue = ["target", "datname", "relation", "mode"];
    [
        family(
            "lockjam_sessions",
            "Client backends by database and state.",
            &["target", "datname", "state"],
        ),
        family(
            "lockjam_transaction_max_age_seconds",
            "Age of the oldest open transaction per database and state.",
            &["target", "datname", "state"],
        ),
        family(
            "lockjam_lock_waiters",
            "Sessions waiting for a heavyweight lock, by requested lock type and mode.",
            &["target", "datname", "locktype", "mode"],
        ),
        family("lockjam_lock_wait_max_seconds", "Longest current lock wait.", &by_db),
        family(
            "lockjam_blocked_sessions",
            "Sessions waiting, directly or transitively, behind a root blocker.",
            &by_db,
        ),
        family(
            "lockjam_root_blockers",
            "Sessions that block others and wait on no one.",
            &by_db,
        ),
        family(
            "lockjam_root_blocker_max_age_seconds",
            "Age of the oldest transaction among root blockers.",
            &by_db,
        ),
        family(
            "lockjam_blocking_chain_max_depth",
            "Wait edges in the longest wait chain (1: waiters directly behind a root blocker).",
            &by_db,
        ),
        family(
            "lockjam_lock_queue_depth",
            "Sessions queued behind a queue head waiting for mode on relation.",
            &by_queue,
        ),
        family(
            "lockjam_lock_queue_head_wait_seconds",
            "How long the queue head has waited.",
            &by_queue,
        ),
        family(
            "lockjam_relation_lock_waiters",
            "Sessions waiting for a lock on relation, or for a tuple or page lock of it: where queries are stuck.",
            &["target", "datname", "relation"],
        ),
    ]
}

impl Families {
    /// Observes the waits that ended. A database's wait histogram exists,
    /// at 0, from the first sample that sees a lock wait in it, so that
    /// Prometheus' `increase()` counts the wait when it ends instead of
    /// taking it as the series' starting value (a wait is observed when a
    /// later sample no longer sees it); a calm database has none, and a
    /// dropped database's histogram goes with it.
    fn record_waits_ended(&mut self, target: &str, graph: &LockGraph, ended: &[EndedWait], labels: &DatabaseLabels) {
        let databases = self.wait_databases.entry(target.to_string()).or_default();
        for (datname, figures) in &graph.databases {
            let label = labels.label(datname);
            if waits_in(figures) && !datname.is_empty() && databases.insert(label.to_string()) {
                self.lock_wait.with_label_values(&[target, label]);
            }
        }
        for wait in ended {
            let label = labels.label(&wait.datname);
            databases.insert(label.to_string());
            self.lock_wait
                .with_label_values(&[target, label])
                .observe(seconds(wait.wait));
        }
        if let Some(existing) = &graph.existing_databases {
            let lock_wait = &self.lock_wait;
            databases.retain(|datname| {
                let keep = datname == OTHER_DATABASES || existing.contains(datname);
                if !keep {
                    let _ = lock_wait.remove_label_values(&[target, datname]);
                }
                keep
            });
        }
    }

    /// Sessions and their oldest transactions, by database and state.
    fn record_sessions(&mut self, target: &str, graph: &LockGraph, labels: &DatabaseLabels) {
        let taken_at = graph.taken_at;
        let mut groups: BTreeMap<(String, String), (u64, Option<SystemTime>)> = BTreeMap::new();
        for g in &graph.activity {
            let entry = groups
                .entry((labels.label(&g.datname).to_string(), g.state.clone()))
                .or_default();
            entry.0 += g.sessions;
            entry.1 = match (entry.1, g.oldest_xact_start) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        self.sessions.replace(
            target,
            groups
                .iter()
                .map(|((datname, state), (sessions, _))| (vec![datname.clone(), state.clone()], *sessions as f64)),
        );
        self.transaction_max_age.replace(
            target,
            groups.iter().filter_map(|((datname, state), (_, oldest))| {
                let age = taken_at.duration_since((*oldest)?).unwrap_or_default();
                Some((vec![datname.clone(), state.clone()], seconds(age)))
            }),
        );
    }

    /// The lock figures: per database where someone waits, per queue and
    /// per relation.
    fn record_locks(&mut self, target: &str, graph: &LockGraph, caps: Caps, labels: &DatabaseLabels) {
        // Counts add up, ages and depths take the largest, where several
        // databases share the `_other` label.
        let mut per_db: BTreeMap<String, crate::analysis::DatabaseLocks> = BTreeMap::new();
        for (datname, figures) in graph.databases.iter().filter(|(_, f)| waits_in(f)) {
            let into = per_db.entry(labels.label(datname).to_string()).or_default();
            into.lock_wait_max = into.lock_wait_max.max(figures.lock_wait_max);
            into.blocked_sessions += figures.blocked_sessions;
            into.root_blockers += figures.root_blockers;
            into.root_blocker_max_age = into.root_blocker_max_age.max(figures.root_blocker_max_age);
            into.chain_max_depth = into.chain_max_depth.max(figures.chain_max_depth);
            for (key, count) in &figures.waiters {
                *into.waiters.entry(key.clone()).or_default() += count;
            }
        }
        let values = |value: fn(&crate::analysis::DatabaseLocks) -> f64| {
            per_db
                .iter()
                .map(move |(datname, figures)| (vec![datname.clone()], value(figures)))
                .collect::<Vec<_>>()
        };
        self.lock_wait_max.replace(target, values(|d| seconds(d.lock_wait_max)));
        self.blocked_sessions
            .replace(target, values(|d| d.blocked_sessions as f64));
        self.root_blockers.replace(target, values(|d| d.root_blockers as f64));
        self.root_blocker_max_age
            .replace(target, values(|d| seconds(d.root_blocker_max_age)));
        self.chain_max_depth
            .replace(target, values(|d| d.chain_max_depth as f64));
        self.lock_waiters.replace(
            target,
            per_db.iter().flat_map(|(datname, figures)| {
                figures.waiters.iter().map(move |((locktype, mode), count)| {
                    (vec![datname.clone(), locktype.clone(), mode.clone()], *count as f64)
                })
            }),
        );
        let relabelled: Vec<Queue> = graph
            .queues
            .iter()
            .map(|q| Queue {
                datname: labels.label(&q.datname).to_string(),
                ..q.clone()
            })
            .collect();
        let queues = cap_queue_series(&relabelled, caps.relations);
        let queue_labels = |q: &QueueSeries| vec![q.datname.clone(), q.relation.clone(), q.mode.clone()];
        self.queue_depth
            .replace(target, queues.iter().map(|q| (queue_labels(q), q.depth as f64)));
        self.queue_head_wait
            .replace(target, queues.iter().map(|q| (queue_labels(q), seconds(q.head_wait))));
        let mut relations: BTreeMap<(String, String), u64> = BTreeMap::new();
        for r in cap_relation_waiters(graph, caps.relations) {
            *relations
                .entry((labels.label(&r.datname).to_string(), r.relation))
                .or_default() += r.waiters;
        }
        self.relation_waiters.replace(
            target,
            relations
                .into_iter()
                .map(|((datname, relation), waiters)| (vec![datname, relation], waiters as f64)),
        );
    }
}

/// The caps on a target's series.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Caps {
    pub relations: usize,
    pub databases: usize,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let gauge = |name: &str, help: &str| {
            let gauge = GaugeVec::new(Opts::new(name, help), &["target"]).expect("valid");
            registry.register(Box::new(gauge.clone())).expect("unique");
            gauge
        };
        let histogram = |name: &str, help: &str, labels: &[&str], buckets: &[f64]| {
            let histogram =
                HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets.to_vec()), labels).expect("valid");
            registry.register(Box::new(histogram.clone())).expect("unique");
            histogram
        };
        let policy_signals = IntCounterVec::new(
            Opts::new(
                "lockjam_policy_actions_total",
                "Policy decisions by rule, signal (cancel or terminate) and outcome.",
            ),
            &["target", "rule", "action", "outcome"],
        )
        .expect("valid");
        registry.register(Box::new(policy_signals.clone())).expect("unique");
        let incidents = IntCounterVec::new(
            Opts::new(
                "lockjam_incidents_total",
                "Incidents (lock queues past [incidents] min_wait) that closed, by how they ended.",
            ),
            &["target", "datname", "outcome"],
        )
        .expect("valid");
        registry.register(Box::new(incidents.clone())).expect("unique");
        let [sessions, transaction_max_age, lock_waiters, lock_wait_max, blocked_sessions, root_blockers, root_blocker_max_age, chain_max_depth, queue_depth, queue_head_wait, relation_waiters] =
            register_database_families(&registry);
        let families = Families {
            up: gauge(
                "lockjam_up",
                "1 if the last sample of the target succeeded, 0 if it failed.",
            ),
            last_sample: gauge(
                "lockjam_last_sample_timestamp_seconds",
                "Unix time of the last successful sample.",
            ),
            sample_duration: histogram(
                "lockjam_sample_duration_seconds",
                "Time one sample took, successful or not.",
                &["target"],
                SAMPLE_BUCKETS,
            ),
            lock_wait: histogram(
                "lockjam_lock_wait_seconds",
                "Lengths of lock waits that ended, each observed once, as last seen.",
                &["target", "datname"],
                WAIT_BUCKETS,
            ),
            sessions,
            transaction_max_age,
            lock_waiters,
            lock_wait_max,
            blocked_sessions,
            root_blockers,
            root_blocker_max_age,
            chain_max_depth,
            queue_depth,
            queue_head_wait,
            relation_waiters,
            policy_signals,
            policy_leader: gauge(
                "lockjam_policy_leader",
                "1 where this instance holds the target's leader lock and may enforce the policy.",
            ),
            incidents,
            incident_duration: histogram(
                "lockjam_incident_duration_seconds",
                "Lengths of closed incidents, from the first waiter's wait start to the sample that saw the queue gone.",
                &["target", "datname"],
                INCIDENT_BUCKETS,
            ),
            incident_databases: HashMap::new(),
            wait_databases: HashMap::new(),
            named_databases: HashMap::new(),
            policy_rules: HashMap::new(),
        };
        Metrics {
            registry,
            families: Mutex::new(families),
        }
    }

    fn families(&self) -> std::sync::MutexGuard<'_, Families> {
        // A panic while holding the lock leaves plain numbers behind, still
        // fit to serve.
        self.families.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Replaces the target's series with those of a successful sample.
    pub(crate) fn record_sample(
        &self,
        target: &str,
        graph: &LockGraph,
        ended: &[EndedWait],
        took: Duration,
        caps: Caps,
    ) {
        let mut guard = self.families();
        let f = &mut *guard;
        let labels = DatabaseLabels::of(graph, ended, caps.databases, f.named_databases.get(target));
        f.named_databases.insert(target.to_string(), labels.named.clone());
        f.up.with_label_values(&[target]).set(1.0);
        f.last_sample
            .with_label_values(&[target])
            .set(unix_seconds(graph.taken_at));
        f.sample_duration.with_label_values(&[target]).observe(seconds(took));
        f.record_waits_ended(target, graph, ended, &labels);
        f.record_sessions(target, graph, &labels);
        f.record_locks(target, graph, caps, &labels);
    }

    /// A failed sample: `lockjam_up` drops to 0 and the target's database
    /// series go away rather than show stale figures.
    pub(crate) fn record_failure(&self, target: &str, took: Duration) {
        let mut guard = self.families();
        let f = &mut *guard;
        f.up.with_label_values(&[target]).set(0.0);
        f.sample_duration.with_label_values(&[target]).observe(seconds(took));
        for family in f.database_families() {
            family.replace(target, std::iter::empty());
        }
    }

    /// Counts one policy decision.
    pub(crate) fn record_policy_signal(&self, target: &str, rule: &str, signal: &str, outcome: &str) {
        self.families()
            .policy_signals
            .with_label_values(&[target, rule, signal, outcome])
            .inc();
    }

    /// Declares every counter the policy can increment on `target` at 0,
    /// as Prometheus advises for label values known in advance: a counter
    /// born at 1 would hide its first increment from `increase()`, and an
    /// alert on the first `permission_denied` would never fire.
    pub(crate) fn register_policy(&self, target: &str, policy: &Policy) {
        let mut families = self.families();
        for rule in &policy.rules {
            families
                .policy_rules
                .entry(target.to_string())
                .or_default()
                .insert(rule.name.clone());
            for signal in Signal::ALL {
                for outcome in Outcome::ALL {
                    families
                        .policy_signals
                        .with_label_values(&[target, &rule.name, signal.as_str(), outcome.as_str()]);
                }
            }
        }
    }

    pub(crate) fn set_policy_leader(&self, target: &str, leader: bool) {
        self.families()
            .policy_leader
            .with_label_values(&[target])
            .set(if leader { 1.0 } else { 0.0 });
    }

    /// Declares a target before its first sample: `lockjam_up` is 0 until
    /// a sample succeeds, so an alert on it fires for a target never reached.
    pub(crate) fn register_target(&self, target: &str) {
        self.families().up.with_label_values(&[target]).set(0.0);
    }

    /// Removes every series of `target`, counters and histograms included:
    /// a configuration reload that drops or restarts a target starts its
    /// series afresh, as a restart would.
    pub(crate) fn forget_target(&self, target: &str) {
        let mut guard = self.families();
        let f = &mut *guard;
        for family in f.database_families() {
            family.replace(target, std::iter::empty());
            family.held.remove(target);
        }
        for gauge in [&f.up, &f.last_sample, &f.policy_leader] {
            let _ = gauge.remove_label_values(&[target]);
        }
        let _ = f.sample_duration.remove_label_values(&[target]);
        f.named_databases.remove(target);
        for datname in f.wait_databases.remove(target).unwrap_or_default() {
            let _ = f.lock_wait.remove_label_values(&[target, &datname]);
        }
        for datname in f.incident_databases.remove(target).unwrap_or_default() {
            for outcome in crate::incidents::Outcome::ALL {
                let _ = f.incidents.remove_label_values(&[target, &datname, outcome.as_str()]);
            }
            let _ = f.incident_duration.remove_label_values(&[target, &datname]);
        }
        for rule in f.policy_rules.remove(target).unwrap_or_default() {
            for signal in Signal::ALL {
                for outcome in Outcome::ALL {
                    let _ = f
                        .policy_signals
                        .remove_label_values(&[target, &rule, signal.as_str(), outcome.as_str()]);
                }
            }
        }
    }

    /// Declares a database's incident series at 0 when its first incident
    /// opens, so that `increase()` counts the close.
    pub(crate) fn register_incidents(&self, target: &str, datname: &str) {
        let mut families = self.families();
        let known = families.incident_databases.entry(target.to_string()).or_default();
        if !known.insert(datname.to_string()) {
            return;
        }
        for outcome in crate::incidents::Outcome::ALL {
            families
                .incidents
                .with_label_values(&[target, datname, outcome.as_str()]);
        }
        families.incident_duration.with_label_values(&[target, datname]);
    }

    /// Counts a closed incident.
    pub(crate) fn record_incident(&self, target: &str, datname: &str, outcome: &str, duration: Duration) {
        self.register_incidents(target, datname);
        let families = self.families();
        families.incidents.with_label_values(&[target, datname, outcome]).inc();
        families
            .incident_duration
            .with_label_values(&[target, datname])
            .observe(duration.as_secs_f64());
    }

    /// The Prometheus text exposition of the last samples.
    pub fn render(&self) -> String {
        let families = self.families();
        let gathered = self.registry.gather();
        drop(families);
        let mut buffer = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&gathered, &mut buffer) {
            tracing::error!("cannot encode metrics: {e}");
        }
        String::from_utf8(buffer).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(relations: usize) -> Caps {
        Caps {
            relations,
            databases: 100,
        }
    }
    use crate::analysis::analyze;
    use crate::snapshot::{ActivityGroup, Snapshot};

    fn queue(relation: &str, mode: &str, depth: u64, wait: u64) -> Queue {
        Queue {
            head_pid: depth as i32,
            datname: "app".into(),
            relation: relation.into(),
            mode: mode.into(),
            depth,
            head_wait: Duration::from_secs(wait),
        }
    }

    #[test]
    fn relation_series_past_the_cap_sum_into_other() {
        let queues = vec![
            queue("public.a", "AccessExclusiveLock", 5, 1),
            queue("public.b", "AccessExclusiveLock", 9, 2),
            queue("public.c", "AccessExclusiveLock", 1, 7),
            queue("public.d", "AccessExclusiveLock", 2, 3),
            queue("public.b", "AccessExclusiveLock", 1, 4),
        ];
        let capped = cap_queue_series(&queues, 2);
        let shown: Vec<(&str, u64, u64)> = capped
            .iter()
            .map(|s| (s.relation.as_str(), s.depth, s.head_wait.as_secs()))
            .collect();
        assert_eq!(shown, vec![("public.b", 10, 4), ("public.a", 5, 1), ("_other", 3, 7)]);
        assert_eq!(cap_queue_series(&queues, 20).len(), 4);
    }

    #[test]
    fn relation_waiters_past_the_cap_sum_into_other_per_database() {
        let mut graph = analyze(&Snapshot::calm(SystemTime::UNIX_EPOCH, Vec::new()));
        for (datname, relation, waiters) in [
            ("app", "public.a", 3),
            ("app", "public.b", 9),
            ("app", "public.c", 1),
            ("shop", "public.a", 3),
            ("shop", "public.d", 2),
        ] {
            graph
                .databases
                .entry(datname.into())
                .or_default()
                .relation_waiters
                .insert(relation.into(), waiters);
        }
        let shown = |max| {
            cap_relation_waiters(&graph, max)
                .into_iter()
                .map(|r| format!("{}/{}={}", r.datname, r.relation, r.waiters))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            shown(2),
            vec!["app/public.b=9", "app/public.a=3", "app/_other=1", "shop/_other=5"]
        );
        assert_eq!(shown(5).len(), 5);
        let metrics = Metrics::new();
        metrics.record_sample("db1", &graph, &[], Duration::from_millis(1), caps(2));
        let text = metrics.render();
        assert!(
            text.contains("lockjam_relation_lock_waiters{datname=\"shop\",relation=\"_other\",target=\"db1\"} 5"),
            "{text}"
        );
    }

    #[test]
    fn series_of_a_sample_replace_the_previous_ones() {
        let metrics = Metrics::new();
        let taken_at = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let activity = |state: &str| {
            vec![ActivityGroup {
                datname: "app".into(),
                state: state.into(),
                sessions: 3,
                oldest_xact_start: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(990)),
            }]
        };
        let mut groups = activity("active");
        groups.push(ActivityGroup {
            datname: String::new(),
            state: "starting".into(),
            sessions: 1,
            oldest_xact_start: None,
        });
        let first = analyze(&Snapshot::calm(taken_at, groups));
        metrics.record_sample("db1", &first, &[], Duration::from_millis(2), caps(20));
        let text = metrics.render();
        assert!(
            text.contains("lockjam_sessions{datname=\"app\",state=\"active\",target=\"db1\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("lockjam_transaction_max_age_seconds{datname=\"app\",state=\"active\",target=\"db1\"} 10")
        );
        // A calm database costs its session series alone: no lock gauge,
        // no wait histogram.
        assert!(!text.contains("lockjam_blocked_sessions{"), "{text}");
        assert!(!text.contains("lockjam_lock_wait_seconds_count{"), "{text}");
        assert!(
            !text.contains("lockjam_lock_wait_seconds_count{datname=\"\""),
            "no histogram for sessions not yet in a database: {text}"
        );
        let second = analyze(&Snapshot::calm(taken_at, activity("idle")));
        metrics.record_sample("db1", &second, &[], Duration::from_millis(2), caps(20));
        let text = metrics.render();
        assert!(!text.contains("state=\"active\""), "stale series removed: {text}");
        assert!(text.contains("lockjam_up{target=\"db1\"} 1"));
        metrics.record_failure("db1", Duration::from_millis(5));
        let text = metrics.render();
        assert!(text.contains("lockjam_up{target=\"db1\"} 0"));
        assert!(
            !text.contains("lockjam_sessions{"),
            "no stale figures while down: {text}"
        );
        assert!(text.contains("lockjam_last_sample_timestamp_seconds{target=\"db1\"} 1000"));
    }

    #[test]
    fn a_dropped_database_s_histogram_goes_with_it() {
        let metrics = Metrics::new();
        let groups = |names: &[&str]| {
            names
                .iter()
                .map(|datname| ActivityGroup {
                    datname: datname.to_string(),
                    state: "idle".into(),
                    sessions: 1,
                    oldest_xact_start: None,
                })
                .collect::<Vec<_>>()
        };
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        // A wait in tmp ended: its histogram exists from then on.
        let ended = [EndedWait {
            datname: "tmp".into(),
            wait: Duration::from_secs(3),
        }];
        metrics.record_sample(
            "db1",
            &analyze(&Snapshot::calm(at, groups(&["app", "tmp"]))),
            &ended,
            Duration::ZERO,
            caps(20),
        );
        let histograms = |text: &str, datname: &str| {
            text.lines()
                .filter(|l| l.starts_with("lockjam_lock_wait_seconds") && l.contains(&format!("datname=\"{datname}\"")))
                .count()
        };
        assert_eq!(histograms(&metrics.render(), "tmp"), 15);
        // tmp has no session any more, but exists: its histogram stays.
        metrics.record_sample(
            "db1",
            &analyze(&Snapshot::calm(at, groups(&["app"]))),
            &[],
            Duration::ZERO,
            caps(20),
        );
        assert_eq!(histograms(&metrics.render(), "tmp"), 15);
        // The sample that read the server's databases finds it dropped.
        let dropped = Snapshot {
            existing_databases: Some(vec!["app".into(), "postgres".into()]),
            ..Snapshot::calm(at, groups(&["app"]))
        };
        metrics.record_sample("db1", &analyze(&dropped), &[], Duration::ZERO, caps(20));
        let text = metrics.render();
        assert_eq!(histograms(&text, "tmp"), 0, "{text}");
        assert_eq!(histograms(&text, "app"), 0, "app never had a wait: {text}");
    }

    #[test]
    fn policy_counters_start_at_zero_for_every_rule_signal_and_outcome() {
        let metrics = Metrics::new();
        let mut two_rules = Policy::acting(vec![crate::policy::Rule::unblock_migrations(Duration::from_secs(2))]);
        two_rules.rules.push(crate::policy::Rule {
            name: "second".into(),
            ..two_rules.rules[0].clone()
        });
        metrics.register_policy("db1", &two_rules);
        metrics.record_policy_signal("db1", "second", "cancel", "success");
        let text = metrics.render();
        let counters: Vec<&str> = text
            .lines()
            .filter(|line| line.starts_with("lockjam_policy_actions_total{"))
            .collect();
        assert_eq!(counters.len(), 2 * 2 * 8, "{text}");
        assert_eq!(counters.iter().filter(|line| line.ends_with(" 0")).count(), 31);
        assert!(text.contains(
            "lockjam_policy_actions_total{action=\"cancel\",outcome=\"success\",rule=\"second\",target=\"db1\"} 1"
        ));
        assert!(text.contains(
            "lockjam_policy_actions_total{action=\"terminate\",outcome=\"permission_denied\",rule=\"unblock-migrations\",target=\"db1\"} 0"
        ));
    }

    #[test]
    fn a_forgotten_target_leaves_no_series_and_others_keep_theirs() {
        let metrics = Metrics::new();
        let taken_at = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let graph = analyze(&Snapshot::calm(
            taken_at,
            vec![ActivityGroup {
                datname: "app".into(),
                state: "active".into(),
                sessions: 1,
                oldest_xact_start: None,
            }],
        ));
        let policy = Policy::acting(vec![crate::policy::Rule::unblock_migrations(Duration::from_secs(2))]);
        for target in ["gone", "kept"] {
            metrics.register_target(target);
            metrics.register_policy(target, &policy);
            metrics.record_sample(target, &graph, &[], Duration::from_millis(2), caps(20));
            metrics.set_policy_leader(target, true);
        }
        let series_of = |text: &str, target: &str| {
            let label = format!("target=\"{target}\"");
            text.lines().filter(|l| l.contains(&label)).count()
        };
        let before = metrics.render();
        // up, last sample, leader; 14 sample-duration lines; 16 policy
        // counters; 1 sessions gauge (a calm database).
        assert_eq!(series_of(&before, "gone"), 34, "{before}");
        metrics.forget_target("gone");
        let after = metrics.render();
        assert_eq!(series_of(&after, "gone"), 0, "{after}");
        assert_eq!(series_of(&after, "kept"), 34, "{after}");
    }

    #[test]
    fn a_named_database_keeps_its_name_while_another_grows() {
        let metrics = Metrics::new();
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let sample = |a: u64, b: u64| {
            analyze(&Snapshot::calm(
                at,
                vec![
                    ActivityGroup {
                        datname: "a".into(),
                        state: "idle".into(),
                        sessions: a,
                        oldest_xact_start: None,
                    },
                    ActivityGroup {
                        datname: "b".into(),
                        state: "idle".into(),
                        sessions: b,
                        oldest_xact_start: None,
                    },
                ],
            ))
        };
        let one = Caps {
            relations: 20,
            databases: 1,
        };
        metrics.record_sample("db1", &sample(5, 1), &[], Duration::ZERO, one);
        let text = metrics.render();
        assert!(
            text.contains("lockjam_sessions{datname=\"a\",state=\"idle\",target=\"db1\"} 5"),
            "{text}"
        );
        assert!(
            text.contains("lockjam_sessions{datname=\"_other\",state=\"idle\",target=\"db1\"} 1"),
            "{text}"
        );
        // b outgrows a: a keeps its name, so that no series comes and goes
        // with a session.
        metrics.record_sample("db1", &sample(5, 6), &[], Duration::ZERO, one);
        let text = metrics.render();
        assert!(
            text.contains("lockjam_sessions{datname=\"a\",state=\"idle\",target=\"db1\"} 5"),
            "{text}"
        );
        assert!(
            text.contains("lockjam_sessions{datname=\"_other\",state=\"idle\",target=\"db1\"} 6"),
            "{text}"
        );
    }
}

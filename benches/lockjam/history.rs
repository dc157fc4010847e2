//! Part 5: the incident history. 10,000 incidents in the SQLite store (the
//! default `keep_count`): the file's size, the time to record one (on its
//! blocking thread, never on the sampling path), `lockjam incidents`
//! reading them; and what tracking adds to a sample (the pure tracker,
//! beside the analysis every sample runs).

use std::time::{Duration, Instant, SystemTime};

use lockjam::analysis::analyze;
use lockjam::audit::HeldLock;
use lockjam::incidents::store::{Retention, Store};
use lockjam::incidents::{Criteria, DecisionSeen, Incident, Outcome, RootSeen, Tracker};
use lockjam::snapshot::{LockRow, Session, Snapshot};
use lockjam::view::SessionView;

use crate::common::{spread, table, Scale, Stats};

/// A query as the sampler keeps it: 200 characters.
fn query(seed: usize) -> String {
    let mut text = format!("SELECT /* request {seed} */ o.id, o.total, c.email FROM orders o JOIN customers c ON ");
    while text.len() < 200 {
        text.push_str("c.id = o.customer_id AND ");
    }
    text.truncate(200);
    text
}

fn session(pid: i32, application: &str, now: SystemTime, seed: usize) -> Session {
    Session {
        pid,
        datname: Some("app".into()),
        usename: Some("web".into()),
        application_name: Some(application.into()),
        client_addr: Some("10.0.12.34".into()),
        backend_type: Some("client backend".into()),
        state: Some("active".into()),
        wait_event_type: Some("Lock".into()),
        wait_event: Some("relation".into()),
        backend_start: Some(now - Duration::from_secs(3600)),
        xact_start: Some(now - Duration::from_secs(60 + pid as u64 % 100)),
        query_start: Some(now - Duration::from_secs(30)),
        query: Some(query(seed)),
        blocked_by: None,
    }
}

/// An incident as a queue behind a migration leaves it: two roots, two
/// decisions, three stuck relations, every query 200 characters.
fn incident(n: usize, now: SystemTime) -> Incident {
    let root = |pid: i32| RootSeen {
        session: SessionView::of(pid, Some(&session(pid, "analyst", now, n + pid as usize)), now),
        holds: Some(HeldLock {
            locktype: "relation".into(),
            relation: "public.orders".into(),
            mode: "AccessShareLock".into(),
        }),
        first_seen: lockjam::view::rfc3339(now),
    };
    let decision = |outcome: &'static str| DecisionSeen {
        time: lockjam::view::rfc3339(now),
        rule: "unblock-migrations".into(),
        rule_action: "cancel_blockers",
        action: "cancel",
        outcome,
        signalled_pid: 1001,
        reason: "the root blocker has blocked a migration for 5.0s".into(),
    };
    Incident {
        id: 0,
        target: "db-main".into(),
        datname: "app".into(),
        relation: "public.orders".into(),
        locktype: "relation".into(),
        mode: "AccessExclusiveLock".into(),
        opened_at: lockjam::view::rfc3339(now - Duration::from_secs(12)),
        closed_at: lockjam::view::rfc3339(now),
        duration_seconds: 12.0,
        waiter: SessionView::of(2002, Some(&session(2002, "migrate", now, n)), now),
        waits: 1,
        roots: vec![root(1001), root(1002)],
        roots_seen: 2,
        peak_behind: 183,
        peak_blocked_sessions: 184,
        peak_chain_depth: 2,
        stuck_relations: vec![
            "public.orders".into(),
            "public.customers".into(),
            "public.order_items".into(),
        ],
        decisions: vec![decision("dry_run"), decision("success")],
        decisions_taken: 2,
        outcome: Outcome::BlockerSignalled,
        waiter_got_lock: Some(true),
    }
}

/// A graph of incident 000 with `selects` reads behind the ALTER.
fn queue(selects: i32, now: SystemTime) -> lockjam::analysis::LockGraph {
    let lock = |pid: i32, granted: bool, mode: &str| LockRow {
        pid,
        granted,
        locktype: "relation".into(),
        mode: mode.into(),
        tag: "relation:16384:16400".into(),
        datname: Some("app".into()),
        relation: Some("public.orders".into()),
        wait_start: (!granted).then(|| now - Duration::from_secs(10)),
    };
    let mut sessions = vec![session(10, "analyst", now, 0)];
    let mut alter = session(20, "migrate", now, 1);
    alter.blocked_by = Some(vec![10]);
    sessions.push(alter);
    let mut locks = vec![
        lock(10, true, "AccessShareLock"),
        lock(20, false, "AccessExclusiveLock"),
    ];
    for pid in 100..100 + selects {
        let mut select = session(pid, "web", now, pid as usize);
        select.blocked_by = Some(vec![20]);
        sessions.push(select);
        locks.push(lock(pid, false, "AccessShareLock"));
    }
    analyze(&Snapshot {
        taken_at: now,
        activity: Vec::new(),
        sessions,
        locks,
        existing_databases: None,
        in_recovery: false,
    })
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

pub fn all(scale: Scale) -> String {
    let count = scale.pick(10_000, 200);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("incidents.sqlite");
    let store = Store::open(
        Some(&path),
        Retention {
            keep_days: 30,
            keep_count: 10_000,
        },
    );
    let start = SystemTime::now() - Duration::from_secs(count as u64 * 60);
    let mut record = Vec::with_capacity(count);
    for n in 0..count {
        let closed = start + Duration::from_secs(n as u64 * 60);
        let incident = incident(n, closed);
        let began = Instant::now();
        let stored = store.record(incident, closed);
        record.push(micros(began.elapsed()));
        assert!(stored.id > 0, "the store took incident {n}");
    }
    // Past keep_count: each write also deletes the oldest.
    let mut beyond = Vec::new();
    for n in count..count + scale.pick(200, 20) {
        let closed = start + Duration::from_secs(n as u64 * 60);
        let began = Instant::now();
        store.record(incident(n, closed), closed);
        beyond.push(micros(began.elapsed()));
    }
    let kept = store.list(None, None, usize::MAX).unwrap().len();
    drop(store);
    let bytes: u64 = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|entry| entry.unwrap().metadata().unwrap().len())
        .sum();
    let per_incident = serde_json::to_string(&incident(0, start)).unwrap().len();

    let cli = |args: &[&str]| -> Vec<f64> {
        (0..scale.pick(10, 2))
            .map(|_| {
                let began = Instant::now();
                let output = std::process::Command::new(env!("CARGO_BIN_EXE_lockjam"))
                    .args(["incidents", "--store", path.to_str().unwrap()])
                    .args(args)
                    .output()
                    .unwrap();
                assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
                began.elapsed().as_secs_f64() * 1000.0
            })
            .collect()
    };
    let table_100 = cli(&[]);
    let json_1000 = cli(&["--limit", "1000", "--json"]);
    let since_day = cli(&["--since", "24h", "--limit", "1000"]);

    // What tracking adds to a sample: the tracker on a standing queue of
    // 200, against the analysis of the same snapshot.
    let now = SystemTime::now();
    let graph = queue(200, now);
    let mut tracker = Tracker::new(
        "db-main",
        Criteria {
            min_wait: Duration::from_secs(1),
            modes: vec!["AccessExclusiveLock".into()],
        },
    );
    tracker.observe(&graph, &[]);
    let rounds = scale.pick(2000, 20);
    let observe: Vec<f64> = (0..rounds)
        .map(|_| {
            let began = Instant::now();
            std::hint::black_box(tracker.observe(std::hint::black_box(&graph), &[]));
            micros(began.elapsed())
        })
        .collect();
    let snapshot_graph: Vec<f64> = (0..rounds)
        .map(|_| {
            let began = Instant::now();
            std::hint::black_box(queue(200, now));
            micros(began.elapsed())
        })
        .collect();

    let (r, b, o, a) = (
        Stats::of(&record),
        Stats::of(&beyond),
        Stats::of(&observe),
        Stats::of(&snapshot_graph),
    );
    let rows = vec![
        vec![
            format!("record one incident (store of up to {count})"),
            format!("{:.0} µs", r.median),
            format!("{:.0} µs", r.p99),
            format!("{:.0} µs", r.max),
        ],
        vec![
            "record one past keep_count (the oldest deleted)".into(),
            format!("{:.0} µs", b.median),
            format!("{:.0} µs", b.p99),
            format!("{:.0} µs", b.max),
        ],
        vec![
            "tracker, one sample of a standing queue of 200".into(),
            format!("{:.1} µs", o.median),
            format!("{:.1} µs", o.p99),
            format!("{:.1} µs", o.max),
        ],
        vec![
            "for scale: building that sample's graph (snapshot + analysis)".into(),
            format!("{:.0} µs", a.median),
            format!("{:.0} µs", a.p99),
            format!("{:.0} µs", a.max),
        ],
    ];
    format!(
        "{count} incidents of the shape a migration's queue leaves (two roots, two decisions, three\n\
         stuck relations, every query 200 characters: {per_incident} bytes of JSON each) recorded into\n\
         one store with the default retention (`keep_count = 10000`), then {} more past it.\n\
         Recording runs on a blocking thread after the sample, never inside it; what a sample\n\
         itself gains is the tracker.\n\n{}\n\
         The store (file and WAL) holds {kept} incidents in {:.1} MB ({:.0} bytes per incident).\n\
         `lockjam incidents --store FILE` (a new process each time, wall time, {} runs): the\n\
         newest 100 as a table {}; the newest 1,000 as JSON {}; `--since 24h --limit 1000`\n\
         {}.\n",
        beyond.len(),
        table(&["operation", "median", "p99", "max"], &rows),
        bytes as f64 / 1e6,
        bytes as f64 / kept as f64,
        table_100.len(),
        spread(&table_100, 1, " ms"),
        spread(&json_1000, 1, " ms"),
        spread(&since_day, 1, " ms"),
    )
}

//! Where closed incidents go: one SQLite file (rusqlite, with SQLite
//! built in), written by this process only, kept by age and count. A file
//! that cannot be opened or written is one WARN, and lockjam goes on with
//! the incidents it could not write kept in memory: history is worth
//! less than monitoring.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OpenFlags, OptionalExtension};

use super::Incident;

/// Incidents kept in memory when the file cannot take them.
const MEMORY_CAPACITY: usize = 1000;
/// How long a write waits for the file's lock (another process holding
/// it) before it gives up: a sample never waits on the file.
const BUSY_TIMEOUT: Duration = Duration::from_millis(250);

const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS incidents (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        target TEXT NOT NULL,
        datname TEXT NOT NULL,
        relation TEXT NOT NULL,
        mode TEXT NOT NULL,
        outcome TEXT NOT NULL,
        opened_at REAL NOT NULL,
        closed_at REAL NOT NULL,
        body TEXT NOT NULL
    );
    CREATE INDEX IF NOT EXISTS incidents_by_closed_at ON incidents (closed_at);
";

/// Retention: incidents closed longer ago than `keep_days` go, and beyond
/// the newest `keep_count` (0: no limit).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Retention {
    pub keep_days: u32,
    pub keep_count: u64,
}

/// What the store answers with: incidents as JSON, newest first.
pub type Found = Vec<serde_json::Value>;

pub struct Store {
    path: Option<PathBuf>,
    retention: Retention,
    inner: Mutex<Inner>,
}

struct Inner {
    file: Option<Connection>,
    /// Incidents the file did not take (or all of them, with no file),
    /// newest last, with ids counting down from -1.
    memory: VecDeque<(Incident, f64)>,
    next_memory_id: i64,
    /// Whether the last write failed, so that a failing file is one WARN
    /// per streak, not one per incident.
    failing: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("incident store {path}: {message}")]
    File { path: String, message: String },
}

fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64()
}

fn open_file(path: &Path) -> rusqlite::Result<Connection> {
    let file = Connection::open(path)?;
    file.busy_timeout(BUSY_TIMEOUT)?;
    file.pragma_update(None, "journal_mode", "WAL")?;
    // In WAL mode, NORMAL syncs at checkpoints, not at every commit: a
    // power cut may lose the last incidents written, never corrupt the
    // file, and a write costs a fraction of a millisecond instead of an
    // fsync (BENCHMARKS.md, part 5).
    file.pragma_update(None, "synchronous", "NORMAL")?;
    file.execute_batch(SCHEMA)?;
    Ok(file)
}

impl Store {
    /// The store at `path` (`None`: memory only). A file that cannot be
    /// opened is a WARN naming it and what to do; the store then keeps
    /// memory only.
    pub fn open(path: Option<&Path>, retention: Retention) -> Store {
        let file = path.and_then(|path| match open_file(path) {
            Ok(file) => Some(file),
            Err(e) => {
                tracing::warn!(
                    path = %path.display(),
                    "cannot open the incident store: {e}; incidents are kept in memory only (the last {MEMORY_CAPACITY}) \
                     until a restart: make the file writable by lockjam, move a damaged one aside, or set [incidents] \
                     path to another file (\"\" for memory only)"
                );
                None
            }
        });
        let store = Store {
            path: path.map(Path::to_path_buf),
            retention,
            inner: Mutex::new(Inner {
                file,
                memory: VecDeque::new(),
                next_memory_id: -1,
                failing: false,
            }),
        };
        store.prune(SystemTime::now());
        store
    }

    /// Whether incidents are written to a file.
    pub fn is_persistent(&self) -> bool {
        self.lock().file.is_some()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Stores a closed incident and returns it with its id.
    pub fn record(&self, mut incident: Incident, closed_at: SystemTime) -> Incident {
        let closed = unix_seconds(closed_at);
        let mut inner = self.lock();
        let written = inner.file.as_ref().map(|file| {
            let body = serde_json::to_string(&incident).unwrap_or_default();
            file.execute(
                "INSERT INTO incidents (target, datname, relation, mode, outcome, opened_at, closed_at, body)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    incident.target,
                    incident.datname,
                    incident.relation,
                    incident.mode,
                    incident.outcome.as_str(),
                    closed - incident.duration_seconds,
                    closed,
                    body
                ],
            )
            .map(|_| file.last_insert_rowid())
        });
        match written {
            Some(Ok(id)) => {
                incident.id = id;
                if inner.failing {
                    inner.failing = false;
                    tracing::info!(path = %self.path_text(), "the incident store takes writes again");
                }
                drop(inner);
                self.prune(closed_at);
                return incident;
            }
            Some(Err(e)) if !inner.failing => {
                inner.failing = true;
                tracing::warn!(
                    path = %self.path_text(),
                    "cannot write an incident to the store: {e}; it is kept in memory (the last \
                     {MEMORY_CAPACITY}): check the file's permissions and free space"
                );
            }
            Some(Err(_)) => {}
            None => {}
        }
        incident.id = inner.next_memory_id;
        inner.next_memory_id -= 1;
        inner.memory.push_back((incident.clone(), closed));
        while inner.memory.len() > MEMORY_CAPACITY {
            inner.memory.pop_front();
        }
        incident
    }

    fn path_text(&self) -> String {
        self.path
            .as_deref()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    }

    /// Deletes what retention lets go.
    pub fn prune(&self, now: SystemTime) {
        let oldest = unix_seconds(now) - f64::from(self.retention.keep_days) * 86_400.0;
        let keep = self.retention.keep_count;
        let mut inner = self.lock();
        if let Some(file) = inner.file.as_ref() {
            let pruned = file
                .execute("DELETE FROM incidents WHERE closed_at < ?1", params![oldest])
                .and_then(|_| match keep {
                    0 => Ok(0),
                    // Ids are given in order and never twice, so the
                    // newest `keep` are those above max(id) - keep: one
                    // index lookup, where an OFFSET would walk `keep` rows
                    // on every write.
                    keep => file.execute(
                        "DELETE FROM incidents WHERE id <= (SELECT max(id) FROM incidents) - ?1",
                        params![i64::try_from(keep).unwrap_or(i64::MAX)],
                    ),
                });
            if let Err(e) = pruned {
                tracing::warn!(path = %self.path_text(), "cannot apply the incident store's retention: {e}");
            }
        }
        inner.memory.retain(|(_, closed)| *closed >= oldest);
        if keep > 0 {
            while inner.memory.len() as u64 > keep {
                inner.memory.pop_front();
            }
        }
    }

    /// Incidents closed at or after `since` (all with `None`), of `target`
    /// (all with `None`), newest first, at most `limit`.
    pub fn list(&self, target: Option<&str>, since: Option<SystemTime>, limit: usize) -> Result<Found, StoreError> {
        let since = since.map_or(f64::NEG_INFINITY, unix_seconds);
        let inner = self.lock();
        let mut found: Vec<(f64, serde_json::Value)> = inner
            .memory
            .iter()
            .filter(|(i, closed)| *closed >= since && target.map_or(true, |t| t == i.target))
            .map(|(i, closed)| (*closed, serde_json::to_value(i).unwrap_or_default()))
            .collect();
        if let Some(file) = inner.file.as_ref() {
            found.extend(list_file(file, target, since, limit).map_err(|e| self.error(e))?);
        }
        found.sort_by(|a, b| b.0.total_cmp(&a.0));
        Ok(found.into_iter().take(limit).map(|(_, body)| body).collect())
    }

    /// One incident by id.
    pub fn get(&self, id: i64) -> Result<Option<serde_json::Value>, StoreError> {
        let inner = self.lock();
        if let Some((incident, _)) = inner.memory.iter().find(|(i, _)| i.id == id) {
            return Ok(serde_json::to_value(incident).ok());
        }
        match inner.file.as_ref() {
            Some(file) => get_file(file, id).map_err(|e| self.error(e)),
            None => Ok(None),
        }
    }

    fn error(&self, e: rusqlite::Error) -> StoreError {
        StoreError::File {
            path: self.path_text(),
            message: e.to_string(),
        }
    }
}

fn list_file(
    file: &Connection,
    target: Option<&str>,
    since: f64,
    limit: usize,
) -> rusqlite::Result<Vec<(f64, serde_json::Value)>> {
    let mut statement = file.prepare_cached(
        "SELECT closed_at, id, body FROM incidents
         WHERE closed_at >= ?1 AND (?2 IS NULL OR target = ?2)
         ORDER BY closed_at DESC, id DESC LIMIT ?3",
    )?;
    let rows = statement.query_map(params![since, target, limit as i64], |row| {
        let closed: f64 = row.get(0)?;
        let id: i64 = row.get(1)?;
        let body: String = row.get(2)?;
        Ok((closed, with_id(&body, id)))
    })?;
    rows.collect()
}

fn get_file(file: &Connection, id: i64) -> rusqlite::Result<Option<serde_json::Value>> {
    file.query_row("SELECT body FROM incidents WHERE id = ?1", params![id], |row| {
        row.get::<_, String>(0)
    })
    .optional()
    .map(|body| body.map(|body| with_id(&body, id)))
}

/// A stored body with its row's id (the body was written before the id
/// was known).
fn with_id(body: &str, id: i64) -> serde_json::Value {
    let mut value: serde_json::Value = serde_json::from_str(body).unwrap_or(serde_json::Value::Null);
    if let Some(object) = value.as_object_mut() {
        object.insert("id".into(), id.into());
    }
    value
}

/// Reads a store written by `lockjam run`, for `lockjam incidents`: never
/// creates or changes the file.
pub fn read_only(path: &Path) -> Result<Store, StoreError> {
    if !path.exists() {
        return Err(StoreError::File {
            path: path.display().to_string(),
            message: "no such file: `lockjam run` writes it at [incidents] path once an incident closes".into(),
        });
    }
    let file = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .and_then(|file| {
            file.busy_timeout(BUSY_TIMEOUT)?;
            file.query_row("SELECT count(*) FROM incidents", [], |_| Ok(()))?;
            Ok(file)
        })
        .map_err(|e| StoreError::File {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
    Ok(Store {
        path: Some(path.to_path_buf()),
        retention: Retention {
            keep_days: u32::MAX,
            keep_count: 0,
        },
        inner: Mutex::new(Inner {
            file: Some(file),
            memory: VecDeque::new(),
            next_memory_id: -1,
            failing: false,
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::incidents::Outcome;
    use crate::view::SessionView;

    const DAY: u64 = 86_400;

    fn at(seconds: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_800_000_000 + seconds)
    }

    fn incident(target: &str) -> Incident {
        Incident {
            id: 0,
            target: target.into(),
            datname: "app".into(),
            relation: "public.orders".into(),
            locktype: "relation".into(),
            mode: "AccessExclusiveLock".into(),
            opened_at: String::new(),
            closed_at: String::new(),
            duration_seconds: 3.5,
            waiter: SessionView::of(20, None, at(0)),
            waits: 1,
            roots: Vec::new(),
            roots_seen: 0,
            peak_behind: 5,
            peak_blocked_sessions: 6,
            peak_chain_depth: 2,
            stuck_relations: vec!["public.orders".into()],
            decisions: Vec::new(),
            decisions_taken: 0,
            outcome: Outcome::BlockerFinished,
            waiter_got_lock: None,
        }
    }

    fn ids(found: &Found) -> Vec<i64> {
        found.iter().map(|i| i["id"].as_i64().unwrap()).collect()
    }

    fn retention(keep_days: u32, keep_count: u64) -> Retention {
        Retention { keep_days, keep_count }
    }

    #[test]
    fn incidents_survive_a_reopen_newest_first_and_filtered() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("incidents.sqlite");
        let store = Store::open(Some(&path), retention(30_000, 0));
        assert!(store.is_persistent());
        for (n, target) in ["a", "b", "a"].iter().enumerate() {
            let stored = store.record(incident(target), at(n as u64 * 60));
            assert_eq!(stored.id, n as i64 + 1);
        }
        drop(store);
        let store = Store::open(Some(&path), retention(30_000, 0));
        assert_eq!(ids(&store.list(None, None, 100).unwrap()), [3, 2, 1]);
        assert_eq!(ids(&store.list(Some("a"), None, 100).unwrap()), [3, 1]);
        assert_eq!(ids(&store.list(None, Some(at(60)), 100).unwrap()), [3, 2]);
        assert_eq!(ids(&store.list(None, None, 1).unwrap()), [3]);
        let one = store.get(2).unwrap().unwrap();
        assert_eq!(one["target"], "b");
        assert_eq!(one["peak_behind"], 5);
        assert_eq!(store.get(4).unwrap(), None);
        // The reader `lockjam incidents` uses sees the same.
        let reader = read_only(&path).unwrap();
        assert_eq!(ids(&reader.list(None, None, 100).unwrap()), [3, 2, 1]);
    }

    #[test]
    fn retention_deletes_by_age_and_by_count_and_ids_are_never_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("incidents.sqlite");
        let store = Store::open(Some(&path), retention(2, 3));
        // Closed 5, 4, 3, 1 and 0 days before "now" (the last record).
        for days_ago in [5, 4, 3, 1, 0] {
            store.record(incident("a"), at(10 * DAY - days_ago * DAY));
        }
        // Age keeps those closed within 2 days of the newest write (ids 4
        // and 5); the count alone would have kept 3.
        assert_eq!(ids(&store.list(None, None, 100).unwrap()), [5, 4]);
        let stored = store.record(incident("a"), at(10 * DAY));
        assert_eq!(stored.id, 6, "an id is never given twice");
        let store = Store::open(Some(&path), retention(30, 2));
        assert_eq!(
            ids(&store.list(None, None, 100).unwrap()),
            [6, 5],
            "a lower count applies on open"
        );
    }

    #[test]
    fn a_damaged_file_leaves_the_history_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("incidents.sqlite");
        std::fs::write(
            &path,
            b"this is not a SQLite database, and never was; it is long enough to have a header",
        )
        .unwrap();
        let store = Store::open(Some(&path), retention(30, 10));
        assert!(!store.is_persistent());
        let first = store.record(incident("a"), at(0));
        let second = store.record(incident("a"), at(1));
        assert_eq!((first.id, second.id), (-1, -2));
        assert_eq!(ids(&store.list(None, None, 100).unwrap()), [-2, -1]);
        assert_eq!(store.get(-1).unwrap().unwrap()["target"], "a");
        // The file is left as it was, for someone to look at.
        assert!(std::fs::read(&path)
            .unwrap()
            .starts_with(b"this is not a SQLite database"));
        let error = read_only(&path).err().unwrap().to_string();
        assert!(
            error.starts_with(&format!("incident store {}: ", path.display())),
            "{error}"
        );
    }

    #[test]
    fn an_unopenable_path_leaves_the_history_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a-file");
        std::fs::write(&file, b"").unwrap();
        // A directory that cannot exist: its parent is a file.
        let store = Store::open(Some(&file.join("incidents.sqlite")), retention(30, 10));
        assert!(!store.is_persistent());
        assert_eq!(store.record(incident("a"), at(0)).id, -1);
        let missing = read_only(&dir.path().join("missing.sqlite")).err().unwrap().to_string();
        assert!(missing.contains("no such file"), "{missing}");
    }

    #[test]
    fn a_locked_file_costs_a_write_at_most_the_busy_timeout_and_recovers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("incidents.sqlite");
        let store = Store::open(Some(&path), retention(30, 0));
        assert_eq!(store.record(incident("a"), at(0)).id, 1);
        // Another process holds the write lock.
        let other = Connection::open(&path).unwrap();
        other.execute_batch("BEGIN EXCLUSIVE").unwrap();
        let stored = store.record(incident("a"), at(1));
        assert_eq!(stored.id, -1, "kept in memory while the file is locked");
        other.execute_batch("ROLLBACK").unwrap();
        assert_eq!(store.record(incident("a"), at(2)).id, 2);
        assert_eq!(ids(&store.list(None, None, 100).unwrap()), [2, -1, 1]);
    }

    #[test]
    fn memory_only_keeps_the_newest() {
        let store = Store::open(None, retention(30, 0));
        for n in 0..(MEMORY_CAPACITY as u64 + 5) {
            store.record(incident("a"), at(n));
        }
        let found = store.list(None, None, 2000).unwrap();
        assert_eq!(found.len(), MEMORY_CAPACITY);
        assert_eq!(found[0]["id"], -(MEMORY_CAPACITY as i64 + 5));
    }
}

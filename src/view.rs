//! How lockjam's JSON (`/api/v1/snapshot` and the audit events of
//! `/api/v1/events`) shows a session, a duration and an instant: one set
//! of field names for both. Query texts arrive cut by the sampler's SQL
//! (`QUERY_TEXT_LENGTH`) and are not cut again here.

use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::snapshot::Session;

/// A session as the JSON shows it; every field but `pid` is `null` for a
/// prepared transaction (pid 0), which has no session.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SessionView {
    pub pid: i32,
    pub datname: Option<String>,
    pub usename: Option<String>,
    pub application_name: Option<String>,
    pub client_addr: Option<String>,
    pub backend_type: Option<String>,
    pub state: Option<String>,
    pub wait_event_type: Option<String>,
    pub wait_event: Option<String>,
    /// RFC 3339, server clock: with the pid, who the session is.
    pub backend_start: Option<String>,
    /// RFC 3339, server clock: which of its transactions.
    pub xact_start: Option<String>,
    pub transaction_age_seconds: Option<f64>,
    pub query: Option<String>,
}

impl SessionView {
    /// Session `pid` as seen at `now` (the server's clock).
    pub fn of(pid: i32, session: Option<&Session>, now: SystemTime) -> SessionView {
        let text = |get: fn(&Session) -> &Option<String>| session.and_then(|s| get(s).clone());
        SessionView {
            pid,
            datname: text(|s| &s.datname),
            usename: text(|s| &s.usename),
            application_name: text(|s| &s.application_name),
            client_addr: text(|s| &s.client_addr),
            backend_type: text(|s| &s.backend_type),
            state: text(|s| &s.state),
            wait_event_type: text(|s| &s.wait_event_type),
            wait_event: text(|s| &s.wait_event),
            backend_start: session.and_then(|s| s.backend_start).map(rfc3339),
            xact_start: session.and_then(|s| s.xact_start).map(rfc3339),
            transaction_age_seconds: age_seconds(now, session.and_then(|s| s.xact_start)),
            query: text(|s| &s.query),
        }
    }
}

/// Seconds, rounded to the millisecond.
pub fn seconds(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0).round() / 1000.0
}

/// Seconds from `since` to `now`, rounded to the millisecond.
pub(crate) fn age_seconds(now: SystemTime, since: Option<SystemTime>) -> Option<f64> {
    since.map(|t| seconds(now.duration_since(t).unwrap_or_default()))
}

/// RFC 3339 with milliseconds, UTC.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

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

/// A query text with every password in it replaced by `***`: the literal
/// after the word `password` (`ALTER ROLE app PASSWORD 'x'`, `CREATE USER
/// MAPPING ... OPTIONS (password 'x')`), quoted or dollar-quoted, or the
/// value after `password=` in a connection string inside a literal
/// (`dblink_connect('... password=x')`). A literal the sampler's cut left
/// open is redacted to the end. Query texts reach the JSON, the log and
/// the incident store only through this.
pub fn redact_passwords(query: &str) -> String {
    const WORD: &str = "password";
    let bytes = query.as_bytes();
    let mut out = String::with_capacity(query.len());
    let mut i = 0;
    while i < bytes.len() {
        let is_word = bytes.len() - i >= WORD.len()
            && query.is_char_boundary(i + WORD.len())
            && query[i..i + WORD.len()].eq_ignore_ascii_case(WORD)
            && (i == 0 || !is_identifier_byte(bytes[i - 1]))
            && bytes.get(i + WORD.len()).map_or(true, |b| !is_identifier_byte(*b));
        if !is_word {
            let c = query[i..].chars().next().expect("on a char boundary");
            out.push(c);
            i += c.len_utf8();
            continue;
        }
        out.push_str(&query[i..i + WORD.len()]);
        i += WORD.len();
        // Spaces and one `=` between the word and its value.
        let mut j = i;
        while j < bytes.len() && bytes[j].is_ascii_whitespace() {
            j += 1;
        }
        if j < bytes.len() && bytes[j] == b'=' {
            j += 1;
            while j < bytes.len() && bytes[j].is_ascii_whitespace() {
                j += 1;
            }
        }
        out.push_str(&query[i..j]);
        i = j;
        match bytes.get(i) {
            Some(b'\'') => {
                // 'it''s' counts as one literal.
                let mut end = i + 1;
                loop {
                    match bytes.get(end) {
                        None => break,
                        Some(b'\'') if bytes.get(end + 1) == Some(&b'\'') => end += 2,
                        Some(b'\'') => {
                            end += 1;
                            break;
                        }
                        Some(_) => end += 1,
                    }
                }
                out.push_str("'***'");
                i = end;
            }
            // A parameter ($1) holds no text; a dollar-quoted literal
            // ($$x$$, $tag$x$tag$) does.
            Some(b'$') if bytes.get(i + 1).is_some_and(u8::is_ascii_digit) => {}
            Some(b'$') => {
                let tag_len = bytes[i + 1..].iter().take_while(|b| is_identifier_byte(**b)).count();
                if bytes.get(i + 1 + tag_len) == Some(&b'$') {
                    let tag = &query[i..i + tag_len + 2];
                    let body = i + tag.len();
                    let end = query[body..].find(tag).map_or(query.len(), |at| body + at + tag.len());
                    out.push_str(tag);
                    out.push_str("***");
                    out.push_str(tag);
                    i = end;
                } else {
                    out.push_str("***");
                    i = query.len();
                }
            }
            Some(_) => {
                let end = query[i..]
                    .find(|c: char| c.is_whitespace() || matches!(c, '\'' | '"' | ')' | ',' | ';'))
                    .map_or(query.len(), |at| i + at);
                if end > i {
                    out.push_str("***");
                }
                i = end;
            }
            None => {}
        }
    }
    out
}

fn is_identifier_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

#[cfg(test)]
mod tests {
    use super::redact_passwords;

    #[test]
    fn passwords_are_redacted_wherever_a_query_holds_one() {
        for (query, shown) in [
            ("ALTER ROLE app PASSWORD 'hunter2'", "ALTER ROLE app PASSWORD '***'"),
            (
                "alter user app with encrypted password 'it''s' valid until 'x'",
                "alter user app with encrypted password '***' valid until 'x'",
            ),
            (
                "CREATE ROLE r LOGIN PASSWORD 'SCRAM-SHA-256$4096:abc$def'",
                "CREATE ROLE r LOGIN PASSWORD '***'",
            ),
            (
                "CREATE USER MAPPING FOR u SERVER s OPTIONS (user 'u', password 'p4ss')",
                "CREATE USER MAPPING FOR u SERVER s OPTIONS (user 'u', password '***')",
            ),
            (
                "SELECT dblink_connect('host=db password=s3cret dbname=x')",
                "SELECT dblink_connect('host=db password=*** dbname=x')",
            ),
            ("ALTER ROLE app PASSWORD $$hunter2$$", "ALTER ROLE app PASSWORD $$***$$"),
            (
                "ALTER ROLE app PASSWORD $q$hunter2$q$;",
                "ALTER ROLE app PASSWORD $q$***$q$;",
            ),
            (
                "UPDATE users SET password = $1 WHERE id = $2",
                "UPDATE users SET password = $1 WHERE id = $2",
            ),
            (
                "UPDATE users SET Password='x' WHERE id = 1",
                "UPDATE users SET Password='***' WHERE id = 1",
            ),
            // Cut by the sampler inside the literal: redacted to the end.
            (
                "ALTER ROLE app PASSWORD 'hunter2 and more tha",
                "ALTER ROLE app PASSWORD '***'",
            ),
            ("ALTER ROLE app PASSWORD", "ALTER ROLE app PASSWORD"),
            ("ALTER ROLE app PASSWORD NULL", "ALTER ROLE app PASSWORD ***"),
            // Other words are left alone.
            (
                "SELECT password_encryption, passwords FROM t",
                "SELECT password_encryption, passwords FROM t",
            ),
            ("SELECT 'ünïcode' AS pässword", "SELECT 'ünïcode' AS pässword"),
        ] {
            assert_eq!(redact_passwords(query), shown, "{query}");
        }
    }
}

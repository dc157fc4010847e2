//! The page in a real browser: Debian's headless Chromium loads lockjam's
//! `/` during a replayed incident 000 and the test reads what a person
//! sees (the DOM's text after the page's script ran), then again after the
//! policy cleared the queue. `LOCKJAM_UPDATE_SCREENSHOT=1` writes the
//! screenshot taken in the middle of the incident to `docs/page.png`.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use lockjam::cluster::ClusterOptions;
use lockjam::policy::{Policy, Rule};

use crate::scenes::{migration_behind_long_read, LONG_READ};
use crate::support::{wait_until, TestEnv};

/// The browser: `LOCKJAM_CHROMIUM`, else Debian's `chromium`.
fn chromium() -> String {
    std::env::var("LOCKJAM_CHROMIUM").unwrap_or_else(|_| "chromium".into())
}

/// Chromium, headless, with a profile of its own, run on `url` with
/// `args`; its stdout. The page gets `budget` of virtual time to fetch and
/// draw.
fn headless(url: &str, args: &[&str]) -> String {
    let profile = tempfile::tempdir().unwrap();
    let output = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--hide-scrollbars",
            "--virtual-time-budget=2500",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .arg(url)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {}: {e}; install Debian's chromium (scripts/install-deps.sh --test-tools) \
                 or set LOCKJAM_CHROMIUM",
                chromium()
            )
        });
    assert!(
        output.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("UTF-8")
}

/// The page as its script left it: the DOM, serialized.
async fn dom(url: &str) -> String {
    let url = url.to_string();
    tokio::task::spawn_blocking(move || headless(&url, &["--dump-dom"]))
        .await
        .unwrap()
}

/// What a person reads on the page: the text of `<main>` and the header,
/// tags dropped and entities decoded, block elements on lines of their own.
fn seen(dom: &str) -> String {
    let body = &dom[dom.find("<body").expect("a body")..];
    let mut text = String::new();
    let mut rest = body;
    while let Some(open) = rest.find('<') {
        text.push_str(&rest[..open]);
        let close = rest[open..].find('>').map_or(rest.len(), |i| open + i + 1);
        let tag = &rest[open..close];
        let name: String = tag
            .trim_start_matches(['<', '/'])
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric())
            .collect();
        if matches!(
            name.as_str(),
            "li" | "p" | "div" | "h2" | "h3" | "h4" | "tr" | "summary" | "pre" | "section" | "header"
        ) {
            text.push('\n');
        } else if name == "td" || name == "th" {
            text.push_str(" | ");
        }
        if name == "script" && !tag.starts_with("</") {
            let end = rest[close..].find("</script>").map_or(rest.len(), |i| close + i);
            rest = &rest[end..];
            continue;
        }
        rest = &rest[close..];
    }
    text.push_str(rest);
    text.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&nbsp;", " ")
        .replace("&amp;", "&")
}

fn line_with<'a>(text: &'a str, needle: &str) -> &'a str {
    text.lines()
        .find(|line| line.contains(needle))
        .unwrap_or_else(|| panic!("no line with {needle:?} on the page:\n{text}"))
}

/// The head's wait as the page shows it: "... · waits 4.2 s for ...".
fn head_wait(text: &str, head_pid: i32) -> f64 {
    let line = line_with(text, &format!("HEAD pid {head_pid} "));
    let after = &line[line.find(" · waits ").expect("a wait") + " · waits ".len()..];
    after[..after.find(" s for ").expect("seconds")]
        .parse()
        .expect("a number")
}

#[tokio::test(flavor = "multi_thread")]
async fn the_page_shows_incident_000_as_it_grows_and_after_the_policy_clears_it() {
    // The policy cancels the root once the migration has waited 15 s: time
    // for four looks at the page first.
    let policy = Policy::acting(vec![Rule::unblock_migrations(Duration::from_secs(15))]);
    let env = TestEnv::start_full(ClusterOptions::default(), policy).await;
    let (reader_pid, read, migration_pid, migration) = migration_behind_long_read(&env).await;
    let mut app = Vec::new();
    for _ in 0..5 {
        app.push(
            env.spawn_statement("web", "SELECT count(*) FROM orders WHERE customer_id = 7")
                .await
                .1,
        );
    }
    env.wait_until_waiting_count("web", 5).await;
    let url = format!("http://{}/", env.addr());
    // The screenshot for README, in the middle of the incident.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let shot = tempfile::tempdir().unwrap();
    let png = shot.path().join("page.png");
    let args = [
        "--window-size=1280,640".to_string(),
        format!("--screenshot={}", png.display()),
    ];
    let page = url.clone();
    tokio::task::spawn_blocking(move || headless(&page, &[&args[0], &args[1]]))
        .await
        .unwrap();
    let bytes = std::fs::read(&png).expect("a screenshot");
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    if std::env::var_os("LOCKJAM_UPDATE_SCREENSHOT").is_some() {
        std::fs::copy(&png, Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/page.png")).unwrap();
    }

    // A hostile name, for the page to show as text: a table and an
    // application named as HTML, and a query that closes a script. Its
    // queue waits for a SHARE lock, which the rule leaves alone.
    env.admin
        .batch_execute(r#"CREATE TABLE "<img src=x onerror=alert(1)>" (id int)"#)
        .await
        .unwrap();
    let (hostile_pid, _hostile) = env
        .spawn_transaction(
            "<b>bold</b>",
            &[
                r#"INSERT INTO "<img src=x onerror=alert(1)>" VALUES (1)"#,
                "SELECT pg_sleep(600), '</script><script>alert(2)</script>'",
            ],
        )
        .await;
    env.wait_until_holding(
        hostile_pid,
        r#""<img src=x onerror=alert(1)>""#,
        Some("RowExclusiveLock"),
    )
    .await;
    let (index_pid, _index) = env
        .spawn_statement("migrate", r#"CREATE INDEX ON "<img src=x onerror=alert(1)>" (id)"#)
        .await;
    env.wait_until_waiting(index_pid).await;

    let first = dom(&url).await;
    let text = seen(&first);
    let root = line_with(&text, &format!("ROOT pid {reader_pid} "));
    assert!(root.contains("postgres@app analyst from 127.0.0.1"), "{root}");
    assert!(root.contains("holds AccessShareLock on public.orders"), "{root}");
    assert!(text.contains(LONG_READ), "the root's query:\n{text}");
    let heading = line_with(&text, "database app · public.orders · AccessExclusiveLock wanted");
    assert!(heading.contains("6 blocked, chain depth 2"), "{heading}");
    assert!(
        text.contains("5 × SELECT count(*) FROM orders WHERE customer_id = 7 from web (postgres)"),
        "{text}"
    );
    assert!(
        line_with(&text, &format!("HEAD pid {migration_pid} ")).contains("· 5 behind"),
        "{text}"
    );
    assert!(
        line_with(&text, "Policy: rule unblock-migrations cancel_blockers on pid").contains(" in "),
        "{text}"
    );
    assert!(line_with(&text, "policy").contains("live"), "{text}");
    // Hostile names are text, never markup.
    assert!(
        text.contains("database app · public.<img src=x onerror=alert(1)> · ShareLock wanted"),
        "{text}"
    );
    assert!(text.contains("<b>bold</b>"), "{text}");
    assert!(text.contains("'</script><script>alert(2)</script>'"), "{text}");
    assert!(
        !first.contains("<img") && !first.contains("<b>"),
        "no element from a name:\n{first}"
    );
    assert_eq!(
        first.matches("<script>").count(),
        1,
        "only the page's own script:\n{first}"
    );
    let wait_then = head_wait(&text, migration_pid);

    tokio::time::sleep(Duration::from_millis(1500)).await;
    let text = seen(&dom(&url).await);
    let wait_now = head_wait(&text, migration_pid);
    assert!(
        wait_now > wait_then,
        "the head's wait rises: {wait_then} then {wait_now}"
    );
    // The policy cancels the read; the migration and the queue go through.
    let error = read.await.unwrap().unwrap_err();
    assert_eq!(error.code(), Some(&tokio_postgres::error::SqlState::QUERY_CANCELED));
    migration.await.unwrap().expect("the migration finishes");
    for query in app {
        query.await.unwrap().expect("each query finishes");
    }
    wait_until("the incident to close", || async {
        !crate::support::incidents(env.addr()).await.is_empty()
    })
    .await;
    let after = dom(&url).await;
    let text = seen(&after);
    assert!(!text.contains(&format!("ROOT pid {reader_pid} ")), "{text}");
    assert!(
        !text.contains("database app · public.orders"),
        "the queue is gone:\n{text}"
    );
    let did = line_with(&text, &format!("cancel pid {reader_pid}"));
    assert!(did.contains("unblock-migrations") && did.contains("success"), "{did}");
    let incident = line_with(&text, "app · public.orders");
    assert!(
        incident.contains("blocker_signalled") && incident.contains(&reader_pid.to_string()),
        "{incident}"
    );
    // The hostile queue still stands, shown as text.
    assert!(
        text.contains("database app · public.<img src=x onerror=alert(1)> · ShareLock wanted"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_calm_target_is_one_line_and_an_unknown_one_is_named() {
    let env = TestEnv::start().await;
    let text = seen(&dom(&format!("http://{}/targets/it", env.addr())).await);
    let calm = line_with(&text, "Calm: no session waits for a lock (");
    assert!(calm.ends_with("sessions)."), "{calm}");
    assert!(line_with(&text, "policy").contains("off"), "{text}");
    assert!(text.contains("None recorded."), "{text}");
    assert!(!text.contains("blocked, chain depth"), "{text}");
    // The page of a target lockjam does not watch is a plain 404.
    let (status, body) = crate::support::http_get(env.addr(), "/targets/other").await;
    assert_eq!(
        (status, body.as_str()),
        (404, "lockjam watches no target named \"other\"; its targets: it\n")
    );
}

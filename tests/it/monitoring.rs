//! What users see through Prometheus, Alertmanager and Grafana: the shipped
//! rules, Alertmanager route and dashboard, checked with the real tools and
//! proven end to end against a real Prometheus scraping lockjam while
//! incident 000 is replayed.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use lockjam::cluster::{free_port, ClusterOptions};
use lockjam::policy::{Policy, Rule};
use serde_json::Value;
use tokio::task::JoinSet;

use crate::scenes::migration_behind_long_read;
use crate::support::{http_get, wait_until, within, TestEnv, PATIENCE};

const RULES: &str = "deploy/prometheus/lockjam-rules.yml";
const RULE_TESTS: &str = "deploy/prometheus/lockjam-rules.test.yml";
const PROMETHEUS_CONFIG: &str = "deploy/prometheus/prometheus.yml";
const ALERTMANAGER_CONFIG: &str = "deploy/alertmanager/alertmanager.yml";
const DASHBOARD: &str = "grafana/lockjam.json";
const RUNBOOK: &str = "docs/runbook.md";

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read_repo_file(path: &str) -> String {
    std::fs::read_to_string(repo_file(path)).unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
}

/// A Prometheus tool on PATH; its absence fails the test with what to install.
fn tool(name: &str) -> Command {
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file());
    match found {
        Some(path) => Command::new(path),
        None => panic!(
            "{name} is not on PATH: install Debian's prometheus and prometheus-alertmanager \
             packages (scripts/install-deps.sh --test-tools does)"
        ),
    }
}

/// Runs `command`, fails the test with its output unless it succeeds, and
/// returns its standard output.
fn assert_succeeds(mut command: Command) -> String {
    let output = command.output().expect("the tool runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{command:?} failed ({}):\n{stdout}{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// The metric names of the contract, from README's metrics table.
fn contract_metrics() -> BTreeSet<String> {
    let names: BTreeSet<String> = read_repo_file("README.md")
        .lines()
        .filter_map(|line| line.strip_prefix("| `lockjam_"))
        .filter_map(|rest| rest.split_once('`'))
        .map(|(name, _)| format!("lockjam_{name}"))
        .collect();
    assert_eq!(names.len(), 19, "README's metrics table: {names:?}");
    names
}

/// The contract name a series name belongs to (histograms' suffixes off).
fn family_of(name: &str, contract: &BTreeSet<String>) -> String {
    ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|suffix| name.strip_suffix(suffix).filter(|base| contract.contains(*base)))
        .unwrap_or(name)
        .to_string()
}

/// Every `lockjam_*` name in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("lockjam_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        names.push(name);
    }
    names
}

/// Alert names of the rules file, in order.
fn alert_names() -> Vec<String> {
    read_repo_file(RULES)
        .lines()
        .filter_map(|line| line.trim().strip_prefix("- alert: "))
        .map(str::to_string)
        .collect()
}

/// One PromQL expression the dashboard runs, with the panel it feeds.
struct DashboardQuery {
    panel: String,
    legend: String,
    expr: String,
}

/// Every PromQL expression of the dashboard: panel targets and annotations.
fn dashboard_queries(dashboard: &Value) -> Vec<DashboardQuery> {
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            queries.push(DashboardQuery {
                panel: panel["title"].as_str().expect("titled panels").to_string(),
                legend: target["legendFormat"].as_str().unwrap_or_default().to_string(),
                expr: target["expr"].as_str().expect("every target has an expr").to_string(),
            });
        }
    }
    for annotation in dashboard["annotations"]["list"].as_array().expect("annotations") {
        if let Some(expr) = annotation["expr"].as_str() {
            queries.push(DashboardQuery {
                panel: format!("annotation: {}", annotation["name"].as_str().unwrap_or_default()),
                legend: annotation["titleFormat"].as_str().unwrap_or_default().to_string(),
                expr: expr.to_string(),
            });
        }
    }
    queries
}

#[test]
fn prometheus_rules_pass_promtool_checks_and_unit_tests() {
    let mut check = tool("promtool");
    check.args(["check", "rules"]).arg(repo_file(RULES));
    assert_succeeds(check);
    let mut unit_tests = tool("promtool");
    unit_tests.args(["test", "rules"]).arg(repo_file(RULE_TESTS));
    assert!(assert_succeeds(unit_tests).contains("SUCCESS"));
    let mut config = tool("promtool");
    config.args(["check", "config"]).arg(repo_file(PROMETHEUS_CONFIG));
    assert_succeeds(config);

    // promtool passes a rule with no test at all: every alert must be
    // evaluated by some test, and have a runbook section its URL points to.
    let tests = read_repo_file(RULE_TESTS);
    let runbook = read_repo_file(RUNBOOK);
    let rules = read_repo_file(RULES);
    let alerts = alert_names();
    assert_eq!(alerts.len(), 10, "{alerts:?}");
    for alert in &alerts {
        assert!(
            tests.matches(&format!("alertname: {alert}\n")).count() >= 2,
            "{alert} needs a firing and a quiet case in {RULE_TESTS}"
        );
        assert!(
            runbook.contains(&format!("\n## {alert}\n")),
            "{RUNBOOK} has no section for {alert}"
        );
        let url = format!("docs/runbook.md#{}\"", alert.to_lowercase());
        assert!(rules.contains(&url), "{alert}'s runbook_url should end in {url}");
    }
    let contract = contract_metrics();
    for name in metric_names(&rules) {
        assert!(
            contract.contains(&family_of(&name, &contract)),
            "{RULES} uses {name}, which is not in the metrics contract"
        );
    }
}

#[test]
fn alertmanager_config_checks_and_pages_on_lock_queues_only() {
    let mut check = tool("amtool");
    check.args(["check-config"]).arg(repo_file(ALERTMANAGER_CONFIG));
    assert_succeeds(check);
    let route = |labels: &[&str]| {
        let mut command = tool("amtool");
        command
            .args(["config", "routes", "test", "--config.file"])
            .arg(repo_file(ALERTMANAGER_CONFIG))
            .args(labels);
        assert_succeeds(command).trim().to_string()
    };
    assert_eq!(
        route(&[
            "alertname=LockjamLockQueueForming",
            "severity=critical",
            "target=main",
            "relation=public.orders"
        ]),
        "pager"
    );
    assert_eq!(
        route(&["alertname=LockjamTargetDown", "severity=warning", "target=main"]),
        "chat"
    );
}

#[test]
fn dashboard_is_valid_json_using_every_contract_metric_and_no_other() {
    let dashboard: Value = serde_json::from_str(&read_repo_file(DASHBOARD)).expect("the dashboard is JSON");
    assert_eq!(dashboard["__inputs"][0]["name"], "DS_PROMETHEUS");
    let variables: Vec<&str> = dashboard["templating"]["list"]
        .as_array()
        .expect("variables")
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(variables, ["target", "datname"]);
    let contract = contract_metrics();
    let mut used = BTreeSet::new();
    let variable_queries = dashboard["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["query"]["query"].as_str().unwrap().to_string());
    let exprs: Vec<String> = dashboard_queries(&dashboard)
        .into_iter()
        .map(|q| q.expr)
        .chain(variable_queries)
        .collect();
    for expr in &exprs {
        for name in metric_names(expr) {
            let family = family_of(&name, &contract);
            assert!(
                contract.contains(&family),
                "the dashboard uses {name}, not in the contract: {expr}"
            );
            used.insert(family);
        }
    }
    assert_eq!(used, contract, "every metric of the contract has a panel");
    for panel in dashboard["panels"].as_array().unwrap() {
        if panel["type"] != "row" {
            assert_eq!(
                panel["datasource"]["uid"], "${DS_PROMETHEUS}",
                "{} uses the datasource input",
                panel["title"]
            );
        }
    }
}

/// A real Prometheus on loopback, stopped on drop.
struct Prometheus {
    addr: SocketAddr,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts Prometheus scraping `lockjam` every second with `rules`,
    /// evaluated every second.
    async fn start(lockjam: SocketAddr, rules: &str) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("rules.yml"), rules).unwrap();
        std::fs::write(
            dir.path().join("prometheus.yml"),
            format!(
                "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
                 rule_files: [rules.yml]\n\
                 scrape_configs:\n  - job_name: lockjam\n    static_configs: [{{targets: ['{lockjam}']}}]\n"
            ),
        )
        .unwrap();
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port().unwrap()));
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = tool("prometheus")
            .arg(format!("--config.file={}", dir.path().join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("prometheus starts");
        let prometheus = Prometheus { addr, child, _dir: dir };
        wait_until("Prometheus to be ready", || async {
            tokio::net::TcpStream::connect(addr).await.is_ok() && http_get(addr, "/-/ready").await.0 == 200
        })
        .await;
        prometheus
    }

    /// `path` with `params` URL-encoded; the `data` of a successful answer.
    async fn api(&self, path: &str, params: &[(&str, &str)]) -> Value {
        let query: String = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(params)
            .finish();
        let (status, body) = http_get(self.addr, &format!("{path}?{query}")).await;
        assert_eq!(status, 200, "{path} {params:?}: {body}");
        let answer: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(answer["status"], "success", "{body}");
        answer["data"].clone()
    }

    /// The series an instant query returns now.
    async fn query(&self, expr: &str) -> Vec<Value> {
        self.api("/api/v1/query", &[("query", expr)]).await["result"]
            .as_array()
            .unwrap()
            .clone()
    }

    /// The states of the active alerts named `name`.
    async fn alert_states(&self, name: &str) -> Vec<String> {
        self.api("/api/v1/alerts", &[]).await["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|alert| alert["labels"]["alertname"] == name)
            .map(|alert| alert["state"].as_str().unwrap().to_string())
            .collect()
    }

    /// Waits until `expr` returns a series whose value satisfies `check`.
    async fn wait_for_value(&self, what: &str, expr: &str, check: impl Fn(f64) -> bool) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let result = self.query(expr).await;
            if result.iter().any(|series| check(sample_value(&series["value"]))) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {expr} = {result:?}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The number in a `[time, "value"]` pair of the Prometheus API.
fn sample_value(pair: &Value) -> f64 {
    pair[1].as_str().expect("values are strings").parse().expect("a number")
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

/// The rules with every `for:` cut to 3 s, so that a test sees an alert go
/// pending, then fire, within seconds.
fn rules_with_short_for() -> String {
    let rules = read_repo_file(RULES);
    let shortened: Vec<String> = rules
        .lines()
        .map(|line| match line.trim_start().strip_prefix("for: ") {
            Some(_) => format!("{}for: 3s", &line[..line.len() - line.trim_start().len()]),
            None => line.to_string(),
        })
        .collect();
    assert!(shortened.iter().filter(|l| l.trim() == "for: 3s").count() >= 5);
    shortened.join("\n")
}

/// Incident 000 with lockjam's policy on (`cancel_blockers` after 15 s),
/// watched by a real Prometheus with the shipped rules: the queue alert
/// goes pending, then fires, then resolves once the policy has cancelled
/// the long read; every metric of the contract and every dashboard query
/// has data. Prints what each dashboard query showed (docs/dashboard.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prometheus_sees_incident_000_page_and_clear() {
    let policy = Policy::acting(vec![Rule::unblock_migrations(Duration::from_secs(15))]);
    let env = TestEnv::start_full(ClusterOptions::default(), policy).await;
    let prometheus = Prometheus::start(env.addr(), &rules_with_short_for()).await;
    prometheus
        .wait_for_value("lockjam to be scraped", "up{job=\"lockjam\"}", |up| up == 1.0)
        .await;
    let cancel_success = "lockjam_policy_actions_total{target=\"it\",action=\"cancel\",outcome=\"success\"}";
    prometheus
        .wait_for_value("the policy counter declared at 0", cancel_success, |v| v == 0.0)
        .await;

    let incident_start = unix_now();
    let (_reader_pid, read, _migration_pid, alter) = migration_behind_long_read(&env).await;
    let mut selects = JoinSet::new();
    for _ in 0..5 {
        selects.spawn(env.spawn_statement("web", "SELECT count(*) FROM orders").await.1);
    }
    env.wait_until_waiting_count("web", 5).await;

    // The page: pending first, then firing, while the policy still waits
    // for its 15 s.
    let mut seen = Vec::new();
    let deadline = Instant::now() + PATIENCE;
    while seen.last().map(String::as_str) != Some("firing") {
        assert!(Instant::now() < deadline, "the queue alert never fired: {seen:?}");
        let states = prometheus.alert_states("LockjamLockQueueForming").await;
        assert!(states.len() <= 1, "one alert for one queue: {states:?}");
        if let Some(state) = states.into_iter().next() {
            if seen.last() != Some(&state) {
                seen.push(state);
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(seen, ["pending", "firing"]);
    assert!(!read.is_finished(), "the alert fired before the policy acted");
    let firing = prometheus.api("/api/v1/alerts", &[]).await["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|alert| alert["labels"]["alertname"] == "LockjamLockQueueForming")
        .cloned()
        .unwrap();
    assert_eq!(firing["labels"]["relation"], "public.orders");
    assert_eq!(firing["labels"]["mode"], "AccessExclusiveLock");
    assert_eq!(firing["labels"]["severity"], "critical");
    let description = firing["annotations"]["description"].as_str().unwrap();
    assert!(
        description.starts_with(
            "5 sessions are queued on public.orders in database app of it, behind a session \
             waiting for AccessExclusiveLock that has waited "
        ),
        "{description}"
    );

    // The policy cancels the read; the migration and the queue go through.
    let read_result = within("the long read", read).await.unwrap();
    assert!(read_result.is_err(), "the long read was cancelled");
    within("the ALTER", alter).await.unwrap().expect("the ALTER succeeds");
    while let Some(select) = within("the queued SELECTs", selects.join_next()).await {
        select.unwrap().unwrap().expect("every queued SELECT succeeds");
    }
    let deadline = Instant::now() + PATIENCE;
    while !prometheus.alert_states("LockjamLockQueueForming").await.is_empty() {
        assert!(Instant::now() < deadline, "the queue alert did not resolve");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    prometheus
        .wait_for_value("the cancel counted in Prometheus", cancel_success, |v| v == 1.0)
        .await;
    let increase = format!("increase({cancel_success}[1m])");
    prometheus
        .wait_for_value("the counter's increase", &increase, |v| v > 0.0)
        .await;
    // The ended waits reach the histogram, and Prometheus, at the next scrapes.
    prometheus
        .wait_for_value(
            "the ended waits in Prometheus",
            "lockjam_lock_wait_seconds_count{target=\"it\",datname=\"app\"}",
            |count| count == 6.0,
        )
        .await;
    prometheus
        .wait_for_value(
            "the heatmap's increase",
            "increase(lockjam_lock_wait_seconds_count{target=\"it\",datname=\"app\"}[10s])",
            |increase| increase > 0.0,
        )
        .await;
    // The window ends a few scrapes after the drain, so that the 1 s steps
    // of the range queries below include samples taken after it: the
    // policy's bar and annotation show only from the scrape that saw the
    // cancel counted.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let incident_end = unix_now();

    // Every metric of the contract reached Prometheus during the incident.
    let contract = contract_metrics();
    let start = format!("{incident_start}");
    let end = format!("{incident_end}");
    let series = prometheus
        .api(
            "/api/v1/series",
            &[
                ("match[]", "{__name__=~\"lockjam_.+\"}"),
                ("start", &start),
                ("end", &end),
            ],
        )
        .await;
    let names: BTreeSet<String> = series
        .as_array()
        .unwrap()
        .iter()
        .map(|s| family_of(s["__name__"].as_str().unwrap(), &contract))
        .collect();
    assert_eq!(names, contract);

    // promtool lints a real scrape: every family is present by now.
    let (_, metrics_text) = http_get(env.addr(), "/metrics").await;
    let mut lint = tool("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut lint.stdin.take().unwrap(), metrics_text.as_bytes()).unwrap();
    let linted = lint.wait_with_output().unwrap();
    assert!(
        linted.status.success() && linted.stdout.is_empty() && linted.stderr.is_empty(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&linted.stdout),
        String::from_utf8_lossy(&linted.stderr)
    );

    // Every query of the dashboard shows data over the incident, with its
    // variables as Grafana would fill them for this target.
    let dashboard: Value = serde_json::from_str(&read_repo_file(DASHBOARD)).unwrap();
    let mut shown: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for query in dashboard_queries(&dashboard) {
        let expr = query
            .expr
            .replace("$target", "it")
            .replace("$datname", "app")
            .replace("$__rate_interval", "10s");
        let data = prometheus
            .api(
                "/api/v1/query_range",
                &[("query", &expr), ("start", &start), ("end", &end), ("step", "1")],
            )
            .await;
        let result = data["result"].as_array().unwrap();
        assert!(!result.is_empty(), "panel {:?} shows nothing: {expr}", query.panel);
        for series in result {
            let max = series["values"]
                .as_array()
                .unwrap()
                .iter()
                .map(sample_value)
                .fold(f64::NEG_INFINITY, f64::max);
            let mut legend = query.legend.clone();
            for (label, value) in series["metric"].as_object().unwrap() {
                legend = legend.replace(&format!("{{{{{label}}}}}"), value.as_str().unwrap());
            }
            shown
                .entry(query.panel.clone())
                .or_default()
                .push(format!("{legend}: max {max:.3}"));
        }
    }
    for (label, query) in [
        ("target", "lockjam_up"),
        ("datname", "lockjam_sessions{target=~\"it\"}"),
    ] {
        let values = prometheus
            .api(&format!("/api/v1/label/{label}/values"), &[("match[]", query)])
            .await;
        let expected = if label == "target" { "it" } else { "app" };
        assert!(
            values.as_array().unwrap().iter().any(|v| v == expected),
            "variable {label}: {values}"
        );
    }
    println!("dashboard over incident 000 ({:.0} s):", incident_end - incident_start);
    for (panel, lines) in shown {
        println!("- {panel}");
        for line in lines {
            println!("    {line}");
        }
    }
    drop(prometheus);
    env.stop().await;
}

/// A TCP relay to `upstream` that keeps what went each way (the first
/// MiB): what a client really asked and was answered.
struct Tap {
    addr: SocketAddr,
    asked: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    answered: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
}

impl Tap {
    async fn start(upstream: SocketAddr) -> Tap {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tap = Tap {
            addr: listener.local_addr().unwrap(),
            asked: Default::default(),
            answered: Default::default(),
        };
        let (asked, answered) = (tap.asked.clone(), tap.answered.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                    continue;
                };
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                tokio::spawn(Tap::relay(client_read, server_write, asked.clone()));
                tokio::spawn(Tap::relay(server_read, client_write, answered.clone()));
            }
        });
        tap
    }

    async fn relay(
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        seen: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut buffer = vec![0u8; 16 * 1024];
        while let Ok(n @ 1..) = from.read(&mut buffer).await {
            {
                let mut seen = seen.lock().unwrap();
                if seen.len() < 1 << 20 {
                    seen.extend_from_slice(&buffer[..n]);
                }
            }
            if to.write_all(&buffer[..n]).await.is_err() {
                break;
            }
        }
        let _ = to.shutdown().await;
    }

    /// What went one way, as lower-case text (a gzip body as replacement
    /// characters).
    fn text(seen: &std::sync::Mutex<Vec<u8>>) -> String {
        String::from_utf8_lossy(&seen.lock().unwrap()).to_ascii_lowercase()
    }
}

/// `/metrics` answers gzip when asked. Prometheus asks on every scrape:
/// a relay between it and lockjam sees its scraper's `Accept-Encoding:
/// gzip` and lockjam's gzip answer, and Prometheus reads the same values
/// from it. A client that does not ask gets plain text.
#[tokio::test(flavor = "multi_thread")]
async fn metrics_are_gzipped_for_prometheus() {
    let env = TestEnv::start().await;
    let tap = Tap::start(env.addr()).await;
    let prometheus = Prometheus::start(tap.addr, "groups: []\n").await;
    prometheus
        .wait_for_value("lockjam to be scraped", "up{job=\"lockjam\"}", |up| up == 1.0)
        .await;
    prometheus
        .wait_for_value(
            "lockjam_up through the gzip scrape",
            "lockjam_up{target=\"it\"}",
            |up| up == 1.0,
        )
        .await;
    let asked = Tap::text(&tap.asked);
    let answered = Tap::text(&tap.answered);
    assert!(asked.starts_with("get /metrics http/1.1\r\n"), "{asked}");
    assert!(asked.contains("\r\naccept-encoding: gzip\r\n"), "{asked}");
    assert!(answered.starts_with("http/1.1 200 ok\r\n"), "{answered}");
    assert!(answered.contains("\r\ncontent-encoding: gzip\r\n"), "{answered}");
    assert!(
        !answered.contains("lockjam_up{"),
        "no series travels as plain text to Prometheus"
    );
    let url = format!("http://{}/metrics", env.addr());
    let curl = |args: &[&str]| {
        let output = Command::new("curl")
            .args(["-sS"])
            .args(args)
            .arg(&url)
            .output()
            .unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        output.stdout
    };
    let head = String::from_utf8(curl(&["-o", "/dev/null", "-D", "-", "-H", "Accept-Encoding: gzip"])).unwrap();
    assert!(head.to_ascii_lowercase().contains("content-encoding: gzip"), "{head}");
    let plain_head = String::from_utf8(curl(&["-o", "/dev/null", "-D", "-"])).unwrap();
    assert!(
        !plain_head.to_ascii_lowercase().contains("content-encoding"),
        "{plain_head}"
    );
    let zipped = curl(&["-H", "Accept-Encoding: gzip"]);
    assert_eq!(&zipped[..2], b"\x1f\x8b", "a gzip stream");
    let unzipped = String::from_utf8(curl(&["--compressed"])).unwrap();
    let plain = String::from_utf8(curl(&[])).unwrap();
    assert_eq!(
        crate::support::Scrape::parse(&unzipped).value("lockjam_up", &[("target", "it")]),
        Some(1.0)
    );
    assert!(
        zipped.len() * 3 < plain.len(),
        "{} bytes gzipped, {} plain",
        zipped.len(),
        plain.len()
    );
}

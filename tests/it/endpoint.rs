//! lockjam's own HTTP endpoint locked down: HTTPS with a certificate that a
//! reload renews, basic auth and bearer tokens checked by a real client
//! (curl, over OpenSSL), and SIGHUP reloading targets and policy without
//! dropping the listener.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tokio::io::AsyncWriteExt;

use lockjam::config::{BasicAuth, Config, FileSecret, HttpAuth, Secret, TlsFiles};
use lockjam::service::Service;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};

use crate::support::{config_for, start_cluster, wait_until, LockjamRun, Scrape};

/// A CA's certificate, and a certificate for 127.0.0.1 and localhost signed
/// by it, all as PEM files in `dir`.
struct Pki {
    ca: PathBuf,
    files: TlsFiles,
}

fn make_pki(dir: &Path, name: &str) -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, format!("{name} CA"));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    let cert = params.signed_by(&key, &issuer).unwrap();
    let write = |file: &str, text: String| {
        let path = dir.join(format!("{name}-{file}"));
        std::fs::write(&path, text).unwrap();
        path
    };
    Pki {
        ca: write("ca.pem", ca_cert.pem()),
        files: TlsFiles {
            cert_file: write("cert.pem", cert.pem()),
            key_file: write("key.pem", key.serialize_pem()),
        },
    }
}

/// Serves HTTPS with these files, as `tls_cert_file` and `tls_key_file` would.
fn serve_https(config: &mut Config, files: &TlsFiles) {
    config.server.tls_cert_file = Some(files.cert_file.clone());
    config.server.tls_key_file = Some(files.key_file.clone());
}

fn secret_file(dir: &Path, name: &str, secret: &str) -> FileSecret {
    let file = dir.join(name);
    std::fs::write(&file, format!("{secret}\n")).unwrap();
    FileSecret {
        file,
        secret: Secret(secret.to_string()),
    }
}

/// What curl got: the status code (0 when no HTTP answer came) and body.
struct Answer {
    status: u16,
    body: String,
}

/// `curl` with `args` against `url`, trusting `ca`.
fn curl(ca: &Path, url: &str, args: &[&str]) -> Answer {
    let output = Command::new("curl")
        .args(["--silent", "--max-time", "10", "--cacert"])
        .arg(ca)
        .args(["--write-out", "\n%{http_code}"])
        .args(args)
        .arg(url)
        .output()
        .unwrap_or_else(|e| panic!("cannot run curl ({e}): install curl"));
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", &text));
    Answer {
        status: status.trim().parse().unwrap_or(0),
        body: body.to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn https_with_basic_auth_and_bearer_token() {
    let cluster = start_cluster(Default::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let first = make_pki(dir.path(), "first");
    let mut config = config_for(vec![("it", cluster.dsn("postgres"))]);
    serve_https(&mut config, &first.files);
    config.server.auth = HttpAuth {
        basic: Some(BasicAuth {
            user: "prometheus".into(),
            password: secret_file(dir.path(), "password", "correct horse"),
        }),
        bearer_token: Some(secret_file(dir.path(), "token", "s3cret-token")),
    };
    let mut service = Service::start(&config).await.expect("lockjam starts with HTTPS");
    let base = format!("https://127.0.0.1:{}", service.local_addr().port());
    let url = |path: &str| format!("{base}{path}");
    let ca = first.ca.clone();
    let get = move |path: &str, args: &[&str]| {
        let (ca, url, args) = (
            ca.clone(),
            url(path),
            args.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        );
        async move {
            tokio::task::spawn_blocking(move || {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                curl(&ca, &url, &args)
            })
            .await
            .unwrap()
        }
    };

    wait_until("the first sample", || async { get("/readyz", &[]).await.status == 200 }).await;
    let open = get("/healthz", &[]).await;
    assert_eq!(
        (open.status, open.body.as_str()),
        (200, "ok\n"),
        "probes need no credentials"
    );

    // No credentials, wrong ones, a wrong scheme: 401, nothing shown.
    for (what, args) in [
        ("no credentials", vec![]),
        ("a wrong password", vec!["--user", "prometheus:Correct horse"]),
        ("a wrong user", vec!["--user", "grafana:correct horse"]),
        ("an empty password", vec!["--user", "prometheus:"]),
        ("a wrong token", vec!["--oauth2-bearer", "s3cret-tokeN"]),
        ("the password as a token", vec!["--oauth2-bearer", "correct horse"]),
    ] {
        for path in [
            "/",
            "/targets/it",
            "/metrics",
            "/api/v1/snapshot",
            "/api/v1/events",
            "/api/v1/incidents",
            "/api/v1/incidents/1",
            "/api/v1/preflight?relation=public.orders",
        ] {
            let answer = get(path, &args).await;
            assert_eq!(answer.status, 401, "{what} on {path}: {}", answer.body);
            assert!(
                !answer.body.contains("lockjam_up") && !answer.body.contains("targets"),
                "{what}"
            );
        }
    }
    let challenge = Command::new("curl")
        .args(["--silent", "--head", "--cacert"])
        .arg(&first.ca)
        .arg(format!("{base}/metrics"))
        .output()
        .unwrap();
    let head = String::from_utf8_lossy(&challenge.stdout).to_ascii_lowercase();
    assert!(head.contains("www-authenticate: basic realm=\"lockjam\""), "{head}");

    // The right ones, either kind.
    let basic = get("/metrics", &["--user", "prometheus:correct horse"]).await;
    assert_eq!(basic.status, 200);
    assert_eq!(
        Scrape::parse(&basic.body).value("lockjam_up", &[("target", "it")]),
        Some(1.0)
    );
    let bearer = get("/api/v1/snapshot", &["--oauth2-bearer", "s3cret-token"]).await;
    assert_eq!(bearer.status, 200);
    assert!(bearer.body.contains("\"target\":\"it\""), "{}", bearer.body);
    let history = get("/api/v1/incidents", &["--oauth2-bearer", "s3cret-token"]).await;
    assert_eq!((history.status, history.body.as_str()), (200, "{\"incidents\":[]}"));
    // The page, with the basic credentials a browser asks for once.
    let page = get("/targets/it", &["--user", "prometheus:correct horse"]).await;
    assert_eq!(page.status, 200);
    assert!(page.body.starts_with("<!doctype html>"), "{}", page.body);
    let unknown = get("/targets/nope", &["--user", "prometheus:correct horse"]).await;
    assert_eq!(
        (unknown.status, unknown.body.as_str()),
        (404, "lockjam watches no target named \"nope\"; its targets: it\n")
    );

    // Plain HTTP to the HTTPS port gets no HTTP answer.
    let plain = Command::new("curl")
        .args(["--silent", "--max-time", "5", "--write-out", "%{http_code}"])
        .arg(format!("http://127.0.0.1:{}/healthz", service.local_addr().port()))
        .output()
        .unwrap();
    assert_ne!(String::from_utf8_lossy(&plain.stdout), "200");

    // A reload renews the certificate and the credentials on the same
    // listener: the new CA is trusted, the old password is refused.
    let second = make_pki(dir.path(), "second");
    assert_eq!(
        curl(&second.ca, &format!("{base}/healthz"), &[]).status,
        0,
        "not yet trusted"
    );
    let mut renewed = config.clone();
    serve_https(&mut renewed, &second.files);
    renewed.server.auth.basic = Some(BasicAuth {
        user: "prometheus".into(),
        password: secret_file(dir.path(), "password", "battery staple"),
    });
    service.reload(&renewed).await.expect("the renewed files load");
    let second_ca = second.ca.clone();
    let metrics = base.clone() + "/metrics";
    let (renewed_ok, old_ca, old_password) = tokio::task::spawn_blocking(move || {
        (
            curl(&second_ca, &metrics, &["--user", "prometheus:battery staple"]).status,
            curl(&first.ca, &metrics, &["--user", "prometheus:battery staple"]).status,
            curl(&second_ca, &metrics, &["--user", "prometheus:correct horse"]).status,
        )
    })
    .await
    .unwrap();
    assert_eq!((renewed_ok, old_ca, old_password), (200, 0, 401));

    // A reload whose key does not match its certificate changes nothing.
    let mut mismatched = renewed.clone();
    serve_https(
        &mut mismatched,
        &TlsFiles {
            cert_file: second.files.cert_file.clone(),
            key_file: make_pki(dir.path(), "third").files.key_file,
        },
    );
    let error = service.reload(&mismatched).await.unwrap_err().to_string();
    assert!(error.contains("third-key.pem"), "{error}");
    let still = base.clone() + "/metrics";
    let status =
        tokio::task::spawn_blocking(move || curl(&second.ca, &still, &["--user", "prometheus:battery staple"]).status)
            .await
            .unwrap();
    assert_eq!(status, 200, "the renewed certificate and password stay in force");
    service.stop().await;
    tokio::task::spawn_blocking(move || drop(cluster)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unauthenticated_readyz_gives_the_status_but_not_the_reasons() {
    let dir = tempfile::tempdir().unwrap();
    let port = lockjam::cluster::free_port().unwrap();
    let mut config = config_for(vec![(
        "nowhere",
        format!("host=127.0.0.1 port={port} user=lockjam dbname=postgres sslmode=disable"),
    )]);
    config.server.auth.bearer_token = Some(secret_file(dir.path(), "token", "t"));
    let service = Service::start(&config).await.unwrap();
    let addr = service.local_addr();
    let (status, body) = crate::support::http_get(addr, "/readyz").await;
    assert_eq!((status, body.as_str()), (503, "not ready\n"));
    let (status, body) = crate::support::http_request(
        addr,
        "GET /readyz HTTP/1.1\r\nHost: lockjam\r\nAuthorization: Bearer t\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 503);
    assert!(body.contains("target `nowhere`"), "{body}");
    service.stop().await;
}

fn write_config(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

/// `lockjam run` as a process: SIGHUP swaps its targets and turns its
/// policy on without dropping the listener; a bad file is refused with one
/// log line naming the key, and the configuration in force stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sighup_reloads_targets_and_policy_and_refuses_a_bad_file() {
    let cluster = start_cluster(Default::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("lockjam.toml");
    let dsn = cluster.dsn("postgres");
    write_config(&file, &format!("[[targets]]\nname = \"before\"\ndsn = \"{dsn}\"\n"));
    let run = LockjamRun::spawn(&["--config", file.to_str().unwrap()]);
    let scrape_until = |what: &'static str, check: fn(&Scrape) -> bool| {
        let addr = run.addr;
        async move {
            wait_until(what, || async {
                tokio::net::TcpStream::connect(addr).await.is_ok() && check(&crate::support::scrape(addr).await)
            })
            .await
        }
    };
    scrape_until("target before up", |s| {
        s.value("lockjam_up", &[("target", "before")]) == Some(1.0)
    })
    .await;
    let connection = tokio::net::TcpStream::connect(run.addr).await.unwrap();

    write_config(
        &file,
        &format!(
            "[[targets]]\nname = \"after\"\ndsn = \"{dsn}\"\n\
             [policy]\nenabled = true\n[[policy.rules]]\nname = \"unblock-migrations\"\n"
        ),
    );
    run.hangup();
    scrape_until("target after up, leading", |s| {
        s.value("lockjam_up", &[("target", "after")]) == Some(1.0)
            && s.value("lockjam_policy_leader", &[("target", "after")]) == Some(1.0)
            && !s
                .series
                .iter()
                .any(|(_, labels, _)| labels.get("target").map(String::as_str) == Some("before"))
    })
    .await;

    write_config(&file, "[sampler]\nintervall = \"1s\"\n");
    run.hangup();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let scrape = crate::support::scrape(run.addr).await;
    assert_eq!(scrape.value("lockjam_up", &[("target", "after")]), Some(1.0));
    assert_eq!(scrape.value("lockjam_policy_leader", &[("target", "after")]), Some(1.0));
    // The connection opened before both reloads still gets answers: the
    // listener and its connections were never dropped.
    let (status, _) = crate::support::http_over(connection, "/healthz").await;
    assert_eq!(status, 200);

    let (status, log) = run.terminate();
    assert!(status.success(), "{log}");
    let rejected: Vec<&str> = log.lines().filter(|l| l.contains("reload rejected")).collect();
    assert_eq!(rejected.len(), 1, "{log}");
    assert!(
        rejected[0].contains("sampler.intervall: unknown field `intervall`") && rejected[0].contains("lockjam.toml"),
        "{}",
        rejected[0]
    );
    assert_eq!(log.matches("configuration reloaded").count(), 1, "{log}");
    tokio::task::spawn_blocking(move || drop(cluster)).await.unwrap();
}

/// Resident memory of a process, in KiB, and how many descriptors it has open.
fn rss_and_open_files(pid: u32) -> (u64, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|kib| kib.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    let open = std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count();
    (rss, open)
}

/// Whether the server has closed `stream`: a read sees end of file or a reset.
async fn closed_by_server(stream: &mut tokio::net::TcpStream) -> bool {
    use tokio::io::AsyncReadExt;
    let mut byte = [0u8; 1];
    matches!(
        tokio::time::timeout(Duration::from_millis(50), stream.read(&mut byte)).await,
        Ok(Ok(0) | Err(_))
    )
}

/// 3,000 idle connections against a lockjam limited to 1,024 open files
/// (the default `ulimit -n`): surplus connections push out the oldest, idle
/// ones and a slowloris client are closed after `header_timeout`, and a
/// fresh scrape is answered throughout. Before the bounds, the accept loop
/// ran out of descriptors and `/metrics` timed out.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fresh_scrape_answers_through_thousands_of_idle_connections() {
    // LOCKJAM_FLOOD_CONNECTIONS=10000 for the figures in docs/reliability.md.
    let flood: usize = std::env::var("LOCKJAM_FLOOD_CONNECTIONS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(3_000);
    crate::support::raise_open_files_limit(flood as u64 + 512);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("lockjam.toml");
    write_config(
        &file,
        "[server]\nheader_timeout = \"2s\"\nmax_connections = 500\n\n[[targets]]\nname = \"gone\"\n\
         dsn = \"host=127.0.0.1 port=1 dbname=app user=app\"\n",
    );
    let run = LockjamRun::spawn_with_open_files(&["--config", file.to_str().unwrap()], 1024);
    wait_until("lockjam listens", || run.serving()).await;
    let (rss_before, _) = rss_and_open_files(run.pid());

    let mut idle = Vec::with_capacity(flood);
    for _ in 0..flood {
        idle.push(tokio::net::TcpStream::connect(run.addr).await.unwrap());
    }
    let started = std::time::Instant::now();
    let (status, body) = crate::support::within("a fresh scrape", crate::support::http_get(run.addr, "/metrics")).await;
    let latency = started.elapsed();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("lockjam_up{target=\"gone\"} 0"), "{body}");
    // At most the cap, plus the listener, logs and runtime's own, once the
    // pushed-out connections have had their turn to close.
    wait_until("lockjam to hold at most max_connections", || async {
        rss_and_open_files(run.pid()).1 <= 500 + 32
    })
    .await;
    let (rss_flooded, open_flooded) = rss_and_open_files(run.pid());

    // The oldest connections were pushed out to admit the newest.
    let mut oldest_closed = 0;
    for stream in idle.iter_mut().take(100) {
        oldest_closed += usize::from(closed_by_server(stream).await);
    }
    assert_eq!(oldest_closed, 100, "the 100 oldest idle connections are closed");

    // A slowloris client, a request head trickled a line at a time, never
    // completes it: closed after header_timeout.
    let mut slow = tokio::net::TcpStream::connect(run.addr).await.unwrap();
    slow.write_all(b"GET /metrics HTTP/1.1\r\nHost: lockjam\r\n")
        .await
        .unwrap();
    let mut trickled = 0;
    loop {
        if slow.write_all(b"X-Trickle: 1\r\n").await.is_err() || closed_by_server(&mut slow).await {
            break;
        }
        trickled += 1;
        assert!(trickled < 40, "a slowloris client stayed connected for 20 s");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The newest idle connections went quiet past header_timeout too.
    let mut newest_closed = 0;
    for stream in idle.iter_mut().rev().take(100) {
        newest_closed += usize::from(closed_by_server(stream).await);
    }
    assert_eq!(newest_closed, 100, "idle connections outlived header_timeout");
    let (status, _) = crate::support::http_get(run.addr, "/healthz").await;
    assert_eq!(status, 200);
    eprintln!(
        "flood figures: {flood} idle connections; lockjam held {open_flooded} descriptors; RSS {rss_before} KiB \
         before, {rss_flooded} KiB under the flood; fresh scrape answered in {} ms; slowloris closed after {trickled} \
         trickled lines",
        latency.as_millis()
    );
    drop(idle);
    drop(slow);
    wait_until("the flood's connections to close", || async {
        rss_and_open_files(run.pid()).1 <= 32
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (rss_after, open_after) = rss_and_open_files(run.pid());
    eprintln!("after the flood: RSS {rss_after} KiB, {open_after} descriptors");
    let (exit, log) = run.terminate();
    assert!(exit.success(), "{log}");
}

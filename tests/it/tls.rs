//! TLS to PostgreSQL: `sslmode` require, verify-ca and verify-full against
//! a throwaway cluster started with `ssl = on` and a certificate signed by
//! a test CA.

use std::time::Duration;

use lockjam::cluster::{ClusterOptions, ServerTls};
use lockjam::config::SessionSettings;
use lockjam::config::Target;
use lockjam::connect::Connector;
use lockjam::dsn::Dsn;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};

use crate::support::start_cluster;

struct Pki {
    ca_pem: String,
    server: ServerTls,
}

/// A CA and a server certificate for `names`, signed by it.
fn make_pki(names: &[&str]) -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "lockjam test CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let server_key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    params.distinguished_name.push(DnType::CommonName, names[0]);
    let server_cert = params.signed_by(&server_key, &issuer).unwrap();
    Pki {
        ca_pem: ca_cert.pem(),
        server: ServerTls {
            cert_pem: server_cert.pem(),
            key_pem: server_key.serialize_pem(),
        },
    }
}

fn settings() -> SessionSettings {
    SessionSettings {
        statement_timeout: Duration::from_secs(2),
        lock_timeout: Duration::from_millis(500),
        connect_timeout: Duration::from_secs(5),
    }
}

/// Connects as lockjam would and returns whether the session uses TLS, or
/// the connection error.
async fn lockjam_session_ssl(dsn: &str) -> Result<bool, String> {
    let target = Target {
        name: "tls".into(),
        dsn: Dsn::parse(dsn).unwrap(),
        default_user: None,
    };
    let connector = Connector::new(&target, settings()).map_err(|e| e.to_string())?;
    let client = connector.connect(None).await.map_err(|e| e.to_string())?;
    let row = client
        .query_one(
            "SELECT ssl FROM pg_catalog.pg_stat_ssl WHERE pid = pg_catalog.pg_backend_pid()",
            &[],
        )
        .await
        .map_err(|e| e.to_string())?;
    Ok(row.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslmodes_against_a_tls_cluster() {
    let pki = make_pki(&["localhost"]);
    let other = make_pki(&["localhost"]);
    let cluster = start_cluster(ClusterOptions {
        tls: Some(pki.server.clone()),
        ..ClusterOptions::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &pki.ca_pem).unwrap();
    let wrong_ca = dir.path().join("other-ca.pem");
    std::fs::write(&wrong_ca, &other.ca_pem).unwrap();
    let port = cluster.port();
    let dsn = |host: &str, extra: &str| format!("host={host} port={port} user=postgres dbname=postgres {extra}");

    assert_eq!(
        lockjam_session_ssl(&dsn("127.0.0.1", "sslmode=require")).await,
        Ok(true)
    );
    assert_eq!(lockjam_session_ssl(&dsn("127.0.0.1", "sslmode=prefer")).await, Ok(true));
    assert_eq!(
        lockjam_session_ssl(&dsn("127.0.0.1", "sslmode=disable")).await,
        Ok(false)
    );
    assert_eq!(
        lockjam_session_ssl(&dsn(
            "localhost",
            &format!("sslmode=verify-full sslrootcert={}", ca.display())
        ))
        .await,
        Ok(true)
    );
    // verify-ca checks the chain, not the name: 127.0.0.1 is not in the
    // certificate.
    assert_eq!(
        lockjam_session_ssl(&dsn(
            "127.0.0.1",
            &format!("sslmode=verify-ca sslrootcert={}", ca.display())
        ))
        .await,
        Ok(true)
    );
    let wrong_name = lockjam_session_ssl(&dsn(
        "127.0.0.1",
        &format!("sslmode=verify-full sslrootcert={}", ca.display()),
    ))
    .await;
    let message = wrong_name.unwrap_err();
    assert!(
        message.contains("certificate") && message.contains("cannot connect to target `tls`"),
        "{message}"
    );
    let untrusted = lockjam_session_ssl(&dsn(
        "localhost",
        &format!("sslmode=verify-ca sslrootcert={}", wrong_ca.display()),
    ))
    .await;
    assert!(untrusted.unwrap_err().contains("certificate"));
    let missing = lockjam_session_ssl(&dsn("localhost", "sslmode=verify-full sslrootcert=/nonexistent/ca.pem")).await;
    assert!(missing
        .unwrap_err()
        .contains("sslrootcert: cannot read /nonexistent/ca.pem"));
    tokio::task::spawn_blocking(move || drop(cluster)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_fails_clearly_without_server_tls() {
    let cluster = start_cluster(ClusterOptions::default()).await;
    let dsn = format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres sslmode=require",
        cluster.port()
    );
    let prefer = dsn.replace("sslmode=require", "sslmode=prefer");
    assert_eq!(
        lockjam_session_ssl(&prefer).await,
        Ok(false),
        "prefer falls back to plaintext"
    );
    let message = lockjam_session_ssl(&dsn).await.unwrap_err();
    assert!(message.contains("cannot connect to target `tls`"), "{message}");
    assert!(
        message.to_lowercase().contains("tls") || message.contains("ssl"),
        "{message}"
    );
    tokio::task::spawn_blocking(move || drop(cluster)).await.unwrap();
}

//! Opens lockjam's own PostgreSQL sessions: TLS as the DSN's `sslmode`
//! asks, `application_name=lockjam`, and the timeouts that keep lockjam out
//! of every lock queue.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres::Client;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::config::{SessionSettings, Target};
use crate::dsn::{DsnError, TlsMode, TlsSettings};

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("target `{target}`: {source}")]
    Dsn {
        target: String,
        #[source]
        source: DsnError,
    },
    #[error("target `{target}`: TLS setup failed: {message}")]
    Tls { target: String, message: String },
    #[error("cannot connect to target `{target}` ({dsn}): {message}")]
    Connect {
        target: String,
        dsn: String,
        message: String,
    },
    #[error("target `{target}`: connected, but setting up the session failed: {message}")]
    Setup { target: String, message: String },
}

/// Opens sessions to one target (and to its other databases).
pub struct Connector {
    target: Target,
    tls: MakeRustlsConnect,
    settings: SessionSettings,
}

impl Connector {
    pub fn new(target: &Target, settings: SessionSettings) -> Result<Connector, ConnectError> {
        let tls = tls_config(&target.dsn.tls()).map_err(|message| ConnectError::Tls {
            target: target.name.clone(),
            message,
        })?;
        Ok(Connector {
            target: target.clone(),
            tls: MakeRustlsConnect::new(tls),
            settings,
        })
    }

    /// Opens a session to the target's database, or to `dbname` on the
    /// same server.
    pub async fn connect(&self, dbname: Option<&str>) -> Result<Client, ConnectError> {
        let dsn = match dbname {
            Some(name) => self.target.dsn.with_dbname(name),
            None => self.target.dsn.clone(),
        };
        let mut config = dsn
            .pg_config(self.target.default_user.as_deref())
            .map_err(|source| ConnectError::Dsn {
                target: self.target.name.clone(),
                source,
            })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(self.settings.connect_timeout);
        }
        // Pinned in the startup packet, so that they hold before any
        // statement runs and win over ALTER DATABASE/ROLE ... SET: with
        // search_path = pg_catalog, pg_temp, no function or operator a
        // database owner or a role setting put in another schema resolves
        // in lockjam's sessions, which hold pg_signal_backend. The user's
        // own `options` come first; lockjam's, later, win.
        let pinned = format!(
            "-c search_path=pg_catalog,pg_temp -c statement_timeout={} -c lock_timeout={} \
             -c default_transaction_read_only=on",
            self.settings.statement_timeout.as_millis().max(1),
            self.settings.lock_timeout.as_millis().max(1),
        );
        let options = match config.get_options() {
            Some(user) if !user.trim().is_empty() => format!("{user} {pinned}"),
            _ => pinned,
        };
        config.options(&options);
        let connect_error = |message: String| ConnectError::Connect {
            target: self.target.name.clone(),
            dsn: dsn.redacted(),
            message,
        };
        let connecting = config.connect(self.tls.clone());
        let (client, connection) = tokio::time::timeout(self.settings.connect_timeout, connecting)
            .await
            .map_err(|_| connect_error(format!("no answer within {:?}", self.settings.connect_timeout)))?
            .map_err(|e| connect_error(refusal(&e, &config)))?;
        let target = self.target.name.clone();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(target = %target, error = %error_chain(&e), "connection closed");
            }
        });
        // Again as the first statement, for a connection pooler that drops
        // startup options: read-only and bounded (a lockjam session can
        // never hold a lock that others queue behind, nor wait long for
        // one), and no search_path but pg_catalog's.
        let setup = format!(
            "SET search_path = pg_catalog, pg_temp; SET statement_timeout = {}; SET lock_timeout = {}; \
             SET default_transaction_read_only = on",
            self.settings.statement_timeout.as_millis().max(1),
            self.settings.lock_timeout.as_millis().max(1),
        );
        client.batch_execute(&setup).await.map_err(|e| ConnectError::Setup {
            target: self.target.name.clone(),
            message: error_chain(&e),
        })?;
        Ok(client)
    }
}

/// Why the server refused a session, with what to change when the server
/// names the cause: retrying alone never fixes a password or a role.
fn refusal(error: &tokio_postgres::Error, config: &tokio_postgres::Config) -> String {
    use tokio_postgres::error::SqlState;
    let user = config.get_user().unwrap_or("?");
    let dbname = config.get_dbname().unwrap_or(user);
    let message = error_chain(error);
    let hint = match error.code() {
        Some(code) if *code == SqlState::INVALID_PASSWORD => format!(
            "authentication failed for user `{user}`: check the password (the DSN's `password`, `dsn_file` or \
             PGPASSWORD) and the server's pg_hba.conf"
        ),
        Some(code) if *code == SqlState::INVALID_AUTHORIZATION_SPECIFICATION => format!(
            "the server refused user `{user}`: check that the role exists, has LOGIN, and that pg_hba.conf \
             has an entry for it"
        ),
        Some(code) if *code == SqlState::INVALID_CATALOG_NAME => {
            format!("database `{dbname}` does not exist: check the DSN's `dbname`")
        }
        Some(code) if *code == SqlState::TOO_MANY_CONNECTIONS => {
            "the server has no connection slot left: raise max_connections or the role's CONNECTION LIMIT".into()
        }
        _ => return message,
    };
    format!("{hint} ({message})")
}

/// An error and its causes on one line: tokio-postgres puts the useful part
/// (the server's message, the OS error) in the sources.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    message
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls_config(settings: &TlsSettings) -> Result<ClientConfig, String> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    // libpq verifies the chain under `require` only when a root
    // certificate is given; lockjam does the same.
    let verify_chain = match settings.mode {
        TlsMode::Disable | TlsMode::Prefer => false,
        TlsMode::Require => settings.root_cert.is_some(),
        TlsMode::VerifyCa | TlsMode::VerifyFull => true,
    };
    if !verify_chain {
        return Ok(builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate { provider }))
            .with_no_client_auth());
    }
    let roots = Arc::new(root_store(settings)?);
    if settings.mode == TlsMode::VerifyFull {
        return Ok(builder.with_root_certificates(roots).with_no_client_auth());
    }
    let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider)
        .build()
        .map_err(|e| e.to_string())?;
    Ok(builder
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ChainOnly { webpki }))
        .with_no_client_auth())
}

fn root_store(settings: &TlsSettings) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    match &settings.root_cert {
        Some(path) => {
            // Read as a small regular file first: a FIFO or /dev/zero must
            // not hang or exhaust lockjam.
            let text = crate::config::read_small_file(path).map_err(|message| format!("sslrootcert: {message}"))?;
            for certificate in CertificateDer::pem_slice_iter(text.as_bytes()) {
                let certificate = certificate.map_err(|e| format!("bad certificate in {}: {e}", path.display()))?;
                roots
                    .add(certificate)
                    .map_err(|e| format!("unusable certificate in {}: {e}", path.display()))?;
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(native.certs);
        }
    }
    if roots.is_empty() {
        return Err("no trusted root certificate: set sslrootcert to your CA's PEM file".into());
    }
    Ok(roots)
}

/// `sslmode=verify-ca`: the chain must lead to a trusted root; the host
/// name is not checked.
#[derive(Debug)]
struct ChainOnly {
    webpki: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // webpki checks the chain before the name, so a name mismatch means
        // the chain was good.
        match self
            .webpki
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(CertificateError::NotValidForName))
            | Err(rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext { .. })) => {
                Ok(ServerCertVerified::assertion())
            }
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// `sslmode=prefer`/`require` without a root certificate: encrypted, not
/// authenticated (libpq's behaviour). Handshake signatures are still checked.
#[derive(Debug)]
struct AcceptAnyCertificate {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

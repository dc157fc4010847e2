//! HTTPS: the certificate and key, read as small regular files, and
//! swapped on reload for the connections that follow.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::HttpError;
use crate::config::TlsFiles;

/// The HTTPS settings in force; [`TlsReloader::reload`] swaps in a renewed
/// certificate for the connections that follow.
#[derive(Clone)]
pub struct TlsReloader(Arc<std::sync::RwLock<Arc<rustls::ServerConfig>>>);

impl TlsReloader {
    pub fn load(files: &TlsFiles) -> Result<TlsReloader, HttpError> {
        Ok(TlsReloader(Arc::new(std::sync::RwLock::new(tls_server_config(files)?))))
    }

    /// Re-reads the files; on error the certificate in force stays.
    pub fn reload(&self, files: &TlsFiles) -> Result<(), HttpError> {
        let config = tls_server_config(files)?;
        *self.0.write().unwrap_or_else(std::sync::PoisonError::into_inner) = config;
        Ok(())
    }

    pub(super) fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        let config = self.0.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        tokio_rustls::TlsAcceptor::from(config)
    }
}

fn tls_server_config(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>, HttpError> {
    let failed = |file: &std::path::Path, message: String| HttpError::Tls {
        file: file.display().to_string(),
        message,
    };
    // Read as small regular files first: a FIFO or /dev/zero must not hang
    // or exhaust lockjam.
    let read = |file: &std::path::Path| crate::config::read_small_file(file).map_err(|message| failed(file, message));
    let certs = CertificateDer::pem_slice_iter(read(&files.cert_file)?.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| failed(&files.cert_file, format!("{e}; it must hold PEM certificates")))?;
    if certs.is_empty() {
        return Err(failed(&files.cert_file, "no PEM certificate in it".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(read(&files.key_file)?.as_bytes())
        .map_err(|e| failed(&files.key_file, format!("{e}; it must hold a PEM private key")))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| failed(&files.cert_file, e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| failed(&files.key_file, format!("{e}; does the key belong to the certificate?")))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

//! Mutual TLS for the peer link (rustls, ring provider).
//!
//! Both ends present a certificate signed by the cluster's CA (`[peer] tls_ca`) and require the
//! other's: the server with a `WebPkiClientVerifier`, the client by verifying the server against
//! the same CA. The client checks the server's certificate against the *host part of the peer's
//! configured address* (`[[peers]] address`), so each node's certificate must carry that host
//! name or IP address as a subject alternative name. TLS says "a node of this cluster's CA";
//! which node it is, is established by the secret handshake that runs inside TLS and is bound
//! to the TLS session by exported keying material (see `handshake.rs`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use thiserror::Error;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::config::PeerListenConfig;
use crate::pg::SqlState;

/// Label of the keying material exported from a TLS session to bind the handshake to it.
pub(crate) const EXPORTER_LABEL: &[u8] = b"EXPORTER-pgmm-peer-handshake";
pub(crate) const EXPORTER_LEN: usize = 32;

#[derive(Debug, Error)]
pub enum PeerTlsError {
    #[error("peer TLS: {what} {}: {message}", path.display())]
    File {
        what: &'static str,
        path: PathBuf,
        message: String,
    },
    #[error("peer TLS: mutual TLS needs all of [peer] tls_cert, tls_key and tls_ca; {missing} is not set")]
    Incomplete { missing: &'static str },
    #[error("peer TLS configuration: {0}")]
    Config(String),
    #[error("peer TLS: {host:?} (from peer address {addr:?}) is not a valid TLS server name")]
    ServerName { addr: String, host: String },
}

impl SqlState for PeerTlsError {
    /// config_file_error: every one of these is found at start-up from the configuration.
    fn sqlstate(&self) -> &str {
        "F0000"
    }
}

/// The client side: our certificate, and the CA that must have signed the server's.
#[derive(Clone)]
pub struct ClientTls {
    connector: TlsConnector,
}

/// The server side: our certificate, and the CA that must have signed the client's.
#[derive(Clone)]
pub struct ServerTls {
    acceptor: TlsAcceptor,
}

/// Both sides from one `[peer]` section: a node dials and accepts with the same certificate.
#[derive(Clone)]
pub struct PeerTls {
    pub client: ClientTls,
    pub server: ServerTls,
}

impl PeerTls {
    /// `None` when `[peer]` sets no TLS file at all; an error when it sets only some of them.
    pub fn from_config(peer: &PeerListenConfig) -> Result<Option<PeerTls>, PeerTlsError> {
        match (&peer.tls_cert, &peer.tls_key, &peer.tls_ca) {
            (None, None, None) => Ok(None),
            (Some(cert), Some(key), Some(ca)) => Ok(Some(PeerTls::load(cert, key, ca)?)),
            (None, _, _) => Err(PeerTlsError::Incomplete {
                missing: "tls_cert",
            }),
            (_, None, _) => Err(PeerTlsError::Incomplete { missing: "tls_key" }),
            (_, _, None) => Err(PeerTlsError::Incomplete { missing: "tls_ca" }),
        }
    }

    pub fn load(cert: &Path, key: &Path, ca: &Path) -> Result<PeerTls, PeerTlsError> {
        let roots = Arc::new(load_roots(ca)?);
        let certs = load_certs(cert)?;
        let key = load_key(key)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config_err = |e: rustls::Error| PeerTlsError::Config(e.to_string());

        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| PeerTlsError::Config(e.to_string()))?;
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(config_err)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs.clone(), key.clone_key())
            .map_err(config_err)?;
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(config_err)?
            .with_root_certificates(roots)
            .with_client_auth_cert(certs, key)
            .map_err(config_err)?;
        Ok(PeerTls {
            client: ClientTls {
                connector: TlsConnector::from(Arc::new(client)),
            },
            server: ServerTls {
                acceptor: TlsAcceptor::from(Arc::new(server)),
            },
        })
    }
}

impl ClientTls {
    pub(crate) fn connector(&self) -> &TlsConnector {
        &self.connector
    }
}

impl ServerTls {
    pub(crate) fn acceptor(&self) -> &TlsAcceptor {
        &self.acceptor
    }
}

/// The name the server's certificate must carry: the host part of `host:port`, `[v6]:port`,
/// or a bare host.
pub(crate) fn server_name(addr: &str) -> Result<ServerName<'static>, PeerTlsError> {
    let host = if let Some(rest) = addr.strip_prefix('[') {
        rest.split_once(']').map_or(rest, |(host, _)| host)
    } else {
        match addr.rsplit_once(':') {
            // More than one colon without brackets: a bare IPv6 address.
            Some((host, _)) if !host.contains(':') => host,
            _ => addr,
        }
    };
    ServerName::try_from(host.to_owned()).map_err(|_| PeerTlsError::ServerName {
        addr: addr.to_owned(),
        host: host.to_owned(),
    })
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, PeerTlsError> {
    let err = |message: String| PeerTlsError::File {
        what: "certificate",
        path: path.to_path_buf(),
        message,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err("no certificate found in the PEM file".into()));
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, PeerTlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| PeerTlsError::File {
        what: "key",
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

fn load_roots(path: &Path) -> Result<RootCertStore, PeerTlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path).map_err(|e| match e {
        PeerTlsError::File { path, message, .. } => PeerTlsError::File {
            what: "CA",
            path,
            message,
        },
        other => other,
    })? {
        roots.add(cert).map_err(|e| PeerTlsError::File {
            what: "CA",
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    }
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_name_is_the_host_part() {
        let name = |addr: &str| server_name(addr).unwrap().to_str().into_owned();
        assert_eq!(name("node-b.example:7000"), "node-b.example");
        assert_eq!(name("10.0.0.2:7000"), "10.0.0.2");
        assert_eq!(name("[::1]:7000"), "::1");
        assert_eq!(name("::1"), "::1");
        assert_eq!(name("node-b"), "node-b");
        assert!(matches!(
            server_name("bad host:1"),
            Err(PeerTlsError::ServerName { .. })
        ));
    }
}
